"""KV-cache decoding equals decoding by full recomputation; beam search finds higher-scoring text."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gf_jax.model import ModelConfig
from gf_jax.model import generate as gen
from gf_jax.model.transformer import Transformer

# init_std 0.5: a random model with confident, prompt-dependent predictions (no near-ties to flip).
CONFIG = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                     max_seq_len=96, init_std=0.5)


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens_BxT, positions_BxT):
    return model(tokens_BxT, positions_BxT=positions_BxT).astype(jnp.float32)


def _reference_greedy(model, prompt, n_new, start=0, width=64):
    """Independent reference: one full forward pass per new token, one prompt at a time.

    The sequence sits in a fixed-width buffer (one compiled program); causal attention makes the
    unused tail irrelevant to the logits read at the last real token.
    """
    seq = list(prompt)
    logprob = 0.0
    positions = start + jnp.arange(width)[None]
    for _ in range(n_new):
        buf = np.zeros((1, width), np.int32)
        buf[0, : len(seq)] = seq
        logits = np.asarray(_forward(model, jnp.asarray(buf), positions)[0, len(seq) - 1], np.float64)
        nxt = int(np.argmax(logits))
        logprob += logits[nxt] - logits.max() - np.log(np.sum(np.exp(logits - logits.max())))
        seq.append(nxt)
    return seq[len(prompt):], logprob


def _continuation_logprobs(model, prompt, continuations):
    """Sum of log-probabilities of each continuation after the prompt, all in one forward pass."""
    seqs = np.array([list(prompt) + list(c) for c in continuations], np.int32)
    positions = jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape)
    logp = np.asarray(jax.nn.log_softmax(_forward(model, jnp.asarray(seqs), positions), axis=-1))
    p = len(prompt)
    cont = seqs[:, p:]
    steps = np.arange(cont.shape[1])
    return logp[:, p - 1 + steps][np.arange(len(seqs))[:, None], steps, cont].sum(axis=1)


def test_cache_equals_recompute_token_for_token(model):
    rng = np.random.default_rng(0)
    lengths = [1, 5, 17, 30, 9, 2, 23]  # several lengths in one batch, incl. a 1-token prompt
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]
    starts = [0, 0, 3, 0, 40, 7, 0]  # prompts cut from the middle of a document keep true positions
    n_new = 12
    out = gen.generate(model, prompts, n_new, start_positions=starts, batch_size=4, length_bucket=16)
    assert out.tokens.shape == (len(prompts), n_new) and out.tokens.dtype == np.int32
    for i, (prompt, start) in enumerate(zip(prompts, starts)):
        expected, logprob = _reference_greedy(model, prompt, n_new, start)
        assert out.tokens[i].tolist() == expected, i
        assert out.logprob[i] == pytest.approx(logprob, abs=1e-3)
    # The in-jit recompute baseline (what the benchmark compares against) agrees as well.
    tokens_BxP, lengths_B = gen.pad_prompts(prompts, 32)
    recomputed, logprob_B = gen.decode_batch_recompute(
        model, tokens_BxP, lengths_B, max_new_tokens=n_new, starts_B=np.array(starts))
    np.testing.assert_array_equal(np.asarray(recomputed), out.tokens)
    np.testing.assert_allclose(np.asarray(logprob_B), out.logprob, atol=1e-3)
    # The outputs depend on the prompt (a broken cache that ignores it would not).
    assert len({tuple(t) for t in out.tokens.tolist()}) > 4


def test_beam_width_one_is_greedy(model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (3, 11)]
    greedy = gen.generate(model, prompts, 8, length_bucket=16)
    beam = gen.decode_batch(model, *gen.pad_prompts(prompts, 16), max_new_tokens=8, beam_width=1)
    np.testing.assert_array_equal(np.asarray(beam[0]), greedy.tokens)


def test_beam_search_is_exact_when_wide_and_beats_greedy():
    # Vocabulary 6, 3 new tokens: width 36 = 6^2 keeps every 2-token prefix, so the search is
    # exhaustive and must return the best of all 216 continuations.
    config = ModelConfig(vocab_size=6, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                         max_seq_len=32, init_std=1.0)
    model = Transformer(config, rngs=nnx.Rngs(3))
    prompts = [[1, 4, 2], [5], [0, 3, 3, 1, 2]]
    exact = gen.generate(model, prompts, 3, beam_width=36, length_bucket=8)
    narrow = gen.generate(model, prompts, 3, beam_width=2, length_bucket=8)
    greedy = gen.generate(model, prompts, 3, length_bucket=8)
    everything = list(itertools.product(range(6), repeat=3))
    for i, prompt in enumerate(prompts):
        scores = dict(zip(everything, _continuation_logprobs(model, prompt, everything).tolist()))
        best = max(scores, key=scores.get)
        assert tuple(exact.tokens[i].tolist()) == best
        assert exact.logprob[i] == pytest.approx(scores[best], abs=1e-4)
        assert narrow.logprob[i] == pytest.approx(scores[tuple(narrow.tokens[i].tolist())], abs=1e-4)
        assert greedy.logprob[i] == pytest.approx(scores[tuple(greedy.tokens[i].tolist())], abs=1e-4)
        assert exact.logprob[i] >= narrow.logprob[i] - 1e-5
        assert narrow.logprob[i] >= greedy.logprob[i] - 1e-5
    assert np.any(exact.logprob > greedy.logprob + 1e-3)  # the search is not just greedy


def test_bad_arguments_are_explained(model):
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="beam_width"):
        gen.generate(model, [[1, 2]], 4, beam_width=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(model, [[1, 2]], 0)
    assert gen.generate(model, [], 4).tokens.shape == (0, 4)


def test_sharded_decoding_equals_single_device(model):
    from gf_jax.model.sharding import MeshConfig, make_mesh

    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (4, 19, 1, 8, 27, 13)]
    single = gen.generate(model, prompts, 10, batch_size=4, length_bucket=32)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # 8 simulated CPU devices
    sharded = gen.generate(model, prompts, 10, batch_size=3, length_bucket=32, mesh=mesh)  # -> 4 rows
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_allclose(sharded.logprob, single.logprob, atol=1e-4)
    beam_single = gen.generate(model, prompts[:2], 6, beam_width=3, length_bucket=32)
    beam_sharded = gen.generate(model, prompts[:2], 6, beam_width=3, length_bucket=32, mesh=mesh)
    np.testing.assert_array_equal(beam_sharded.tokens, beam_single.tokens)
