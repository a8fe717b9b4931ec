"""LLaMA-style decoder in Flax NNX: RMSNorm pre-norm blocks, RoPE, grouped-query attention, SwiGLU.

Shapes: B batch, T query length, S key length (= T in training, cache slots when decoding),
D d_model, N query heads, K key/value heads, G = N // K query heads per K/V head, H head_dim,
F d_ff, V vocab.

Every parameter carries logical axis names (``"vocab"``, ``"embed"``, ``"heads"``, ``"kv_heads"``,
``"head_dim"``, ``"mlp"``, ``"norm"``) in its ``out_sharding`` metadata; ``gf_jax.model.sharding`` maps them
to mesh axes, so the model itself never mentions a mesh. Parameters are created without eager
sharding, so the model can be built anywhere (plain CPU, ``nnx.eval_shape``, or under ``jax.jit``
with ``out_shardings`` from ``gf_jax.model.sharding.model_shardings``).

Attention. Training attention is causal and restricted to equal segment ids (packed documents);
``gf_jax.model.attention`` holds the implementations (``model.attention``: XLA einsum, cuDNN, Pallas
splash on TPU, Pallas on GPU) and picks one for ``auto``. KV-cache decoding always uses the XLA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gf_jax.model import lora as lora_lib
from gf_jax.model.attention import ATTENTION_OUT, attend, attention_xla
from gf_jax.model.config import ModelConfig
from gf_jax.model.numerics import apply_rope, rms_norm, rope_inv_freq
from gf_jax.model.sharding import constrain

# Name of the saved MLP input for the ``minimal`` remat policy.
_MLP_IN = "mlp_in"
# Logical name of the stacked layer axis (``model.scan_layers``); never sharded.
LAYERS = "layers"
# Logical axes of the residual stream: batch-sharded, replicated along length and d_model. Without
# this hint, propagation may follow the fsdp-sharded weights and split activations along d_model.
_RESIDUAL = ("batch", "length", "act_embed")


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    # eager_sharding=False: the logical names are metadata only; placement happens in
    # gf_jax.model.sharding (jit out_shardings), so no mesh is needed to build a model.
    init = nnx.with_partitioning(init, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, config: ModelConfig):
        init = nnx.with_partitioning(nnx.initializers.ones, ("norm",), eager_sharding=False)
        self.scale = nnx.Param(init(jax.random.key(0), (dim,), config.weight_dtype))
        self.eps = config.norm_eps

    def __call__(self, x_BxTxD, dtype):
        return rms_norm(x_BxTxD, self.scale[...], self.eps, dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = config.d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim
        init, wd = nnx.initializers.normal(config.init_std), config.weight_dtype
        self.config = config
        self.wq = _param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), wd)
        self.wk = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), wd)
        self.wv = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), wd)
        self.wo = _param(rngs, init, (n, h, d), ("heads", "head_dim", "embed"), wd)
        if config.qkv_bias:
            zeros = nnx.initializers.zeros
            self.bq = _param(rngs, zeros, (n, h), ("heads", "head_dim"), wd)
            self.bk = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), wd)
            self.bv = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), wd)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config)
            self.k_norm = RMSNorm(h, config)
        adapters = lora_lib.make_adapters(config, {
            "q": (d, n * h, "embed", "heads"), "k": (d, k * h, "embed", "kv_heads"),
            "v": (d, k * h, "embed", "kv_heads"), "o": (n * h, d, "heads", "embed")}, rngs)
        if adapters is not None:
            self.lora = adapters

    def _qkv(self, x_BxTxD, positions_BxT, dtype, dropout_key=None):
        c = self.config
        q = jnp.einsum("btd,dnh->btnh", x_BxTxD, self.wq[...].astype(dtype))
        k = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.wk[...].astype(dtype))
        v = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.wv[...].astype(dtype))
        q = lora_lib.add_update(self, "q", q, x_BxTxD, c, dropout_key)
        k = lora_lib.add_update(self, "k", k, x_BxTxD, c, dropout_key)
        v = lora_lib.add_update(self, "v", v, x_BxTxD, c, dropout_key)
        if c.qkv_bias:
            q, k, v = q + self.bq[...].astype(dtype), k + self.bk[...].astype(dtype), v + self.bv[...].astype(dtype)
        if c.qk_norm:
            q, k = self.q_norm(q, dtype), self.k_norm(k, dtype)
        inv_freq_Hh = rope_inv_freq(c)
        return (apply_rope(q, positions_BxT, c.rope_theta, inv_freq_Hh),
                apply_rope(k, positions_BxT, c.rope_theta, inv_freq_Hh), v)

    def _out(self, o_BxTxNxH, dtype, dropout_key=None):
        out_BxTxD = jnp.einsum("btnh,nhd->btd", o_BxTxNxH, self.wo[...].astype(dtype))
        return lora_lib.add_update(self, "o", out_BxTxD, o_BxTxNxH, self.config, dropout_key)

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, dtype, dropout_key=None):
        q, k, v = self._qkv(x_BxTxD, positions_BxT, dtype, dropout_key)
        return self._out(attend(self.config, q, k, v, segment_ids_BxT, dtype), dtype, dropout_key)

    def decode(self, x_BxTxD, positions_BxT, layer_cache, cache_index_B, dtype):
        """Write this call's K/V at slots [cache_index, cache_index + T) and attend to the cache."""
        q, k, v = self._qkv(x_BxTxD, positions_BxT, dtype)
        cache_k, cache_v = layer_cache["k"], layer_cache["v"]
        write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))
        cache_k = write(cache_k, k.astype(cache_k.dtype), cache_index_B)
        cache_v = write(cache_v, v.astype(cache_v.dtype), cache_index_B)
        t, s = x_BxTxD.shape[1], cache_k.shape[1]
        # A query in slot i sees slots <= i; slots above it are unwritten (or stale) and masked.
        slot_BxT = cache_index_B[:, None] + jnp.arange(t)[None, :]
        mask_BxTxS = jnp.arange(s)[None, None, :] <= slot_BxT[:, :, None]
        o = attention_xla(q, cache_k.astype(dtype), cache_v.astype(dtype), mask_BxTxS)
        return self._out(o, dtype), {"k": cache_k, "v": cache_v}


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        init, wd = nnx.initializers.normal(config.init_std), config.weight_dtype
        self.w_gate = _param(rngs, init, (d, f), ("embed", "mlp"), wd)
        self.w_up = _param(rngs, init, (d, f), ("embed", "mlp"), wd)
        self.w_down = _param(rngs, init, (f, d), ("mlp", "embed"), wd)
        self.config = config
        adapters = lora_lib.make_adapters(config, {
            "gate": (d, f, "embed", "mlp"), "up": (d, f, "embed", "mlp"), "down": (f, d, "mlp", "embed")}, rngs)
        if adapters is not None:
            self.lora = adapters

    def __call__(self, x_BxTxD, dtype, dropout_key=None):
        c, key = self.config, dropout_key
        gate_BxTxF = lora_lib.add_update(self, "gate", x_BxTxD @ self.w_gate[...].astype(dtype), x_BxTxD, c, key)
        up_BxTxF = lora_lib.add_update(self, "up", x_BxTxD @ self.w_up[...].astype(dtype), x_BxTxD, c, key)
        hidden_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
        down_BxTxD = hidden_BxTxF @ self.w_down[...].astype(dtype)
        return lora_lib.add_update(self, "down", down_BxTxD, hidden_BxTxF, c, key)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model, config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, hidden_BxTxD, positions_BxT, segment_ids_BxT, dropout_key=None):
        """``dropout_key``: this layer's adapter-dropout key (training steps with LoRA dropout only)."""
        dtype = hidden_BxTxD.dtype
        attended_BxTxD = self.attn(self.attn_norm(hidden_BxTxD, dtype), positions_BxT, segment_ids_BxT, dtype,
                                   dropout_key)
        hidden_BxTxD = hidden_BxTxD + attended_BxTxD
        return hidden_BxTxD + self.mlp(checkpoint_name(self.mlp_norm(hidden_BxTxD, dtype), _MLP_IN), dtype, dropout_key)

    def decode(self, hidden_BxTxD, positions_BxT, layer_cache, cache_index_B):
        dtype = hidden_BxTxD.dtype
        a, layer_cache = self.attn.decode(
            self.attn_norm(hidden_BxTxD, dtype), positions_BxT, layer_cache, cache_index_B, dtype
        )
        hidden_BxTxD = hidden_BxTxD + a
        return hidden_BxTxD + self.mlp(self.mlp_norm(hidden_BxTxD, dtype), dtype), layer_cache


def _remat_policy(name: str):
    return {
        "full": None,
        "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        # MaxText's "minimal": keep the attention output (and splash's softmax statistics) and the
        # MLP input; the backward pass recomputes only norms and the weight matmuls around them.
        "minimal": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, _MLP_IN),
    }[name]


def _remat_layer(fn, name: str):
    """``fn`` (one layer of the scan body) under the remat policy ``name`` (``none``: as is).

    Under a scan the forward and the backward pass are separate loops, so XLA cannot fold the
    recomputation back into the forward pass; ``prevent_cse``'s barriers would only cost (as the
    ``jax.checkpoint`` docs say for scans).
    """
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=_remat_policy(name), prevent_cse=False)


def stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    """``config.n_layers`` Blocks as one Block whose every variable has a leading ``L`` axis.

    The layer axis carries the logical name ``"layers"`` (added as ``nnx.vmap`` would), which
    gf_jax.model.sharding maps to no mesh axis: a layer's slice is sharded like an unrolled block's
    weight, so the scan all-gathers one layer at a time under fsdp. The values are the unrolled
    blocks' own draws from ``rngs``, stacked, so a seed gives the same model in both layouts.
    """
    blocks = [Block(config, rngs=rngs) for _ in range(config.n_layers)]
    graphdef, first = nnx.split(blocks[0])
    state_L = jax.tree.map(lambda *layers: jnp.stack(layers), first, *(nnx.state(b) for b in blocks[1:]))
    return nnx.merge(graphdef, nnx.spmd.add_axis(state_L, 0, {nnx.PARTITION_NAME: LAYERS}))


class Transformer(nnx.Module):
    """Decoder-only LLaMA. ``__call__`` returns logits in the compute dtype."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        init, wd = nnx.initializers.normal(config.init_std), config.weight_dtype
        self.embedding = _param(rngs, init, (config.vocab_size, config.d_model), ("vocab", "embed"), wd)
        if config.scan_layers:
            self.layers = stacked_blocks(config, rngs)
        else:
            self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, config)
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, init, (config.d_model, config.vocab_size), ("embed", "vocab"), wd)

    # ---- training / scoring ---------------------------------------------------------------

    def _check_tokens(self, tokens_BxT):
        if tokens_BxT.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got {tokens_BxT.shape}.")
        if tokens_BxT.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens_BxT.shape[1]} exceeds model.max_seq_len="
                f"{self.config.max_seq_len}; raise model.max_seq_len or shorten train.seq_len."
            )

    def embed(self, tokens_BxT):
        """Token embeddings ``hidden_BxTxD`` in the compute dtype."""
        # Gather from a table whole along d_model (fsdp all-gathers it, like every other weight):
        # a gather from a d_model-sharded table into a batch-sharded output has no efficient
        # SPMD partitioning and would be fully rematerialised.
        table_VxD = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table_VxD, tokens_BxT, axis=0).astype(self.config.compute_dtype)

    def hidden(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None, dropout_key=None):
        """Final-normed hidden states ``hidden_BxTxD`` (compute dtype), the input of the output head.

        ``positions_BxT`` (RoPE positions) defaults to ``arange(T)`` per row; ``segment_ids_BxT``
        (None: one segment per row) restricts attention to tokens of the same packed document.
        ``dropout_key``: LoRA adapter dropout is drawn from it (training steps only; None: none),
        one key per layer (``gf_jax.model.lora.layer_keys``).
        """
        self._check_tokens(tokens_BxT)
        b, t = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        keys_L = lora_lib.layer_keys(dropout_key, self.config.n_layers)
        embedded_BxTxD = constrain(self.embed(tokens_BxT), _RESIDUAL)
        run = self._scanned_blocks if self.config.scan_layers else self._unrolled_blocks
        return self.final_norm(run(embedded_BxTxD, positions_BxT, segment_ids_BxT, keys_L), self.config.compute_dtype)

    def _unrolled_blocks(self, hidden_BxTxD, positions_BxT, segment_ids_BxT, keys_L):
        def run_block(block, h, positions, segments, key):
            return block(h, positions, segments, key)

        if self.config.remat != "none":
            run_block = nnx.remat(run_block, policy=_remat_policy(self.config.remat))
        for i, block in enumerate(self.blocks):
            key = None if keys_L is None else keys_L[i]
            hidden_BxTxD = constrain(run_block(block, hidden_BxTxD, positions_BxT, segment_ids_BxT, key), _RESIDUAL)
        return hidden_BxTxD

    def _scanned_blocks(self, hidden_BxTxD, positions_BxT, segment_ids_BxT, keys_L):
        """The stacked blocks as one ``lax.scan``: the residual stream is the carry, layer l's
        variables (and dropout key) the l-th slices; the remat policy applies per layer."""
        graphdef, state_L = nnx.split(self.layers)

        def layer(h, layer_state, key, positions, segments):
            block = nnx.merge(graphdef, layer_state)
            return constrain(block(h, positions, segments, key), _RESIDUAL)

        layer = _remat_layer(layer, self.config.remat)

        def body(h, xs):
            layer_state, key = xs
            return layer(h, layer_state, key, positions_BxT, segment_ids_BxT), None

        hidden_BxTxD, _ = jax.lax.scan(body, hidden_BxTxD, (state_L, keys_L))
        return hidden_BxTxD

    def output_weights(self):
        """``w_DxV`` of the output head in the compute dtype (the embedding transposed if tied)."""
        w = self.embedding[...].T if self.config.tie_embeddings else self.lm_head[...]
        return w.astype(self.config.compute_dtype)

    def __call__(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None, dropout_key=None):
        """Next-token logits ``logits_BxTxV`` in the compute dtype (arguments as :meth:`hidden`)."""
        hidden_BxTxD = self.hidden(tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT,
                              dropout_key=dropout_key)
        return hidden_BxTxD @ self.output_weights()

    # ---- KV-cache decoding ----------------------------------------------------------------

    @property
    def cache_batch_axis(self) -> int:
        """The batch axis of every array of :meth:`init_cache`'s cache (1 under ``scan_layers``)."""
        return 1 if self.config.scan_layers else 0

    def init_cache(self, batch_size: int, max_len: int):
        """Empty cache in the compute dtype: one ``{"k", "v"}`` dict per layer, each
        ``B x S x K x H``; under ``scan_layers`` one dict of stacked ``L x B x S x K x H`` arrays
        (the scan's per-layer slices)."""
        c = self.config
        shape = (batch_size, max_len, c.n_kv_heads, c.resolved_head_dim)
        if c.scan_layers:
            stacked = (c.n_layers, *shape)
            return {"k": jnp.zeros(stacked, c.compute_dtype), "v": jnp.zeros(stacked, c.compute_dtype)}
        return [
            {"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}
            for _ in range(c.n_layers)
        ]

    def decode(self, tokens_BxT, positions_BxT, cache, *, cache_index):
        """Run T new tokens against the cache; returns ``(logits_BxTxV, new_cache)``.

        The new tokens' K/V go to slots ``[cache_index, cache_index + T)`` (``cache_index``: int
        scalar or per-row ``B`` vector) and each attends to the slots at or below its own. Slots
        above a row's cache_index are never visible, so rows of different prompt lengths are
        handled by right-padding the prompts, prefilling, and continuing each row at its own
        length (the padded slots are overwritten before they become visible). The caller keeps
        ``cache_index + T <= max_len`` (``dynamic_update_slice`` would clamp, not fail).
        """
        b, t = tokens_BxT.shape
        cache_index_B = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (b,))
        hidden_BxTxD = self.embed(tokens_BxT)
        if self.config.scan_layers:
            hidden_BxTxD, new_cache = self._decode_scanned(hidden_BxTxD, positions_BxT, cache, cache_index_B)
        else:
            new_cache = []
            for block, layer_cache in zip(self.blocks, cache):
                hidden_BxTxD, layer_cache = block.decode(hidden_BxTxD, positions_BxT, layer_cache, cache_index_B)
                new_cache.append(layer_cache)
        hidden_BxTxD = self.final_norm(hidden_BxTxD, self.config.compute_dtype)
        return hidden_BxTxD @ self.output_weights(), new_cache

    def _decode_scanned(self, hidden_BxTxD, positions_BxT, cache, cache_index_B):
        """Stacked blocks scanned with the stacked cache in the carry: layer l reads its
        ``B x S x K x H`` slices and writes them back in place (as scan outputs, the whole cache
        would be copied at every decoding step)."""
        graphdef, state_L = nnx.split(self.layers)

        def layer(carry, xs):
            h, cache = carry
            index, layer_state = xs
            layer_cache = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, index, keepdims=False), cache)
            h, layer_cache = nnx.merge(graphdef, layer_state).decode(h, positions_BxT, layer_cache, cache_index_B)
            cache = jax.tree.map(lambda c, u: jax.lax.dynamic_update_index_in_dim(c, u, index, 0), cache, layer_cache)
            return (h, cache), None

        xs = (jnp.arange(self.config.n_layers), state_L)
        (hidden_BxTxD, cache), _ = jax.lax.scan(layer, (hidden_BxTxD, cache), xs)
        return hidden_BxTxD, cache


def abstract_model(config: ModelConfig):
    """(graphdef, abstract_state) of ``config``'s Transformer; nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
