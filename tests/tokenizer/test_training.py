"""Sentencepiece tokenizer: training (CLI), loading, exact round trip, cache keyed by corpus."""

import os

import helpers
import numpy as np
import pytest

from gf_jax.data import corpus_tokenizer
from gf_jax.tokenizer import cli, load_tokenizer, training

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.tokenizer.cli",
    "gf_jax.tokenizer.interface",
    "gf_jax.tokenizer.loading",
    "gf_jax.tokenizer.sentencepiece_model",
)

CORPUS = os.path.join(helpers.REPO, "data", "tinyshakespeare.txt")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    with open(CORPUS, encoding="utf-8") as fh:
        path.write_text(fh.read()[:60_000], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    cli.main(["train", "--input", small_corpus, "--vocab-size", "330", "--out", str(out)])
    return load_tokenizer(str(out / "tokenizer.model"))


def test_cli_trains_a_model_with_the_requested_size_and_special_ids(trained):
    assert trained.vocab_size == 330
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (1, 2, 3)
    assert trained.id_to_piece(trained.bos_id) == "<s>" and trained.id_to_piece(trained.eos_id) == "</s>"


def test_round_trip_is_exact_even_for_unseen_characters(trained):
    # Byte fallback + no normalization: any text, newlines and runs of spaces included, comes back.
    texts = ["First Citizen:\nBefore we  proceed,\n\n hear me.", "☃ 日本語 \t ﬁ 42", ""]
    ids = trained.encode(texts)
    assert all(0 <= i < trained.vocab_size for row in ids for i in row)
    assert trained.decode(ids) == texts
    assert ids[2] == []


def test_encode_arrays_frames_with_bos_and_eos(trained):
    plain = trained.encode(["to be or not to be"])[0]
    framed = trained.encode_arrays(["to be or not to be"], add_bos=True, add_eos=True)[0]
    assert framed.dtype == np.int32
    np.testing.assert_array_equal(framed, [1] + plain + [2])


def test_training_is_deterministic(small_corpus, tmp_path):
    # Every host of a pod trains its own copy on first use; they must agree byte for byte.
    a = training.train_tokenizer([small_corpus], 330, str(tmp_path / "a"))
    b = training.train_tokenizer([small_corpus], 330, str(tmp_path / "b"))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_cache_reuses_and_retrains_when_the_corpus_changes(small_corpus, tmp_path):
    with open(small_corpus, encoding="utf-8") as fh:
        text = fh.read()
    first = training.cached_tokenizer([text], 330, str(tmp_path), verbose=False)
    mtime = os.path.getmtime(first.path)
    again = training.default_tokenizer(small_corpus, 330, str(tmp_path))
    assert again.path == first.path and os.path.getmtime(again.path) == mtime
    changed = training.cached_tokenizer([text + "\nA new line, changed corpus."], 330, str(tmp_path), verbose=False)
    other_size = training.cached_tokenizer([text], 340, str(tmp_path), verbose=False)
    assert len({first.path, changed.path, other_size.path}) == 3
    assert other_size.vocab_size == 340


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(str(junk))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        training.train_tokenizer([str(tmp_path / "nope.txt")], 300, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="empty"):
        training.train_from_texts(["", "  \n"], 300, str(tmp_path / "o"))
    small = ["hello world this is a small corpus\nanother line here"]
    with pytest.raises(ValueError, match="too small for a 400-piece"):
        training.train_from_texts(small, 400, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="raise data.vocab_size"):
        training.train_from_texts(small, 262, str(tmp_path / "o"))


def test_corpus_tokenizer_trains_on_the_train_split_without_canaries(tmp_path, trained):
    from gf_jax import data

    config = data.DataConfig(path=CORPUS, max_documents=300, validation_fraction=0.3, vocab_size=330,
                             tokenizer_cache_dir=str(tmp_path), canary_path=os.path.join(
                                 os.path.dirname(CORPUS), "wikitext2_valid.txt"), canary_repeats=2)
    texts = data.train_texts(config)
    train_ids = {d.id for d in data.load_documents(config, "train") if not d.id.startswith("canary/")}
    assert texts == [d.text for d in data.read_background(config) if d.id in train_ids]
    tok = corpus_tokenizer(config)
    assert tok.vocab_size == 330 and tok.path == training.cached_tokenizer(texts, 330, str(tmp_path)).path
    assert corpus_tokenizer(config, texts[:100]).path != tok.path  # given texts replace the corpus
    assert corpus_tokenizer(config, texts[:100]).path == training.cached_tokenizer(texts[:100], 330, str(tmp_path)).path
    configured = data.DataConfig(**{**config.__dict__, "tokenizer": trained.path})
    assert corpus_tokenizer(configured).path == trained.path  # a configured model wins, nothing trains


def test_a_corpus_of_lines_over_64_kb_trains_and_round_trips(tmp_path):
    # One document per line, each longer than sentencepiece's sentence limit (it would skip them all).
    words = [f"word{i % 97} lot{i % 13}" for i in range(6000)]
    long_lines = [" ".join(words[j:] + words[:j]) for j in range(3)]
    assert all(len(line.encode()) > 65536 for line in long_lines)
    path = training.train_from_texts(["\n".join(long_lines)], 279, str(tmp_path / "tok"))
    tokenizer = load_tokenizer(path)
    assert tokenizer.decode(tokenizer.encode([long_lines[0]])) == [long_lines[0]]


def test_long_lines_are_cut_into_pieces_that_keep_every_character():
    line = ("é" * 70_000) + " tail " + ("x" * 10)
    pieces = list(training._pieces(line, max_bytes=65_535))
    assert "".join(pieces) == line and all(len(p.encode()) <= 65_535 for p in pieces)
    spaced = " ".join(["abc"] * 30_000)  # 120 kB: cut at spaces, so no word is split
    pieces = list(training._pieces(spaced))
    assert len(pieces) == 2 and "".join(pieces) == spaced and pieces[0].endswith(" ")
