"""gf_jax.util.textcheck: binary input is refused in one sentence naming the file; text is not."""

import os

import helpers
import pytest

from gf_jax.util.textcheck import check_text_file


def test_text_passes_and_binary_is_refused(tmp_path):
    text = tmp_path / "ok.txt"
    text.write_text("To be, or not to be: that is the question. Ünïcödé — fine.\n" * 100)
    check_text_file(str(text))
    stray = tmp_path / "stray.txt"
    stray.write_bytes(b"mostly text " * 1000 + b"\xff\xfe" + b" and more text" * 100)  # a few bad bytes
    check_text_file(str(stray))

    with pytest.raises(ValueError, match=r"^data\.path .*/bin/ls is not a text file \(it contains NUL bytes"):
        check_text_file("/bin/ls")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café déjà vu à la française ".encode("latin-1") * 200)
    with pytest.raises(ValueError, match=r"latin1\.txt is not a text file \(\d+% of its first .* not UTF-8\)"):
        check_text_file(str(latin1), what="data.canary_path")


def test_small_api_traps_are_refused_in_one_sentence(tmp_path):
    import jax.numpy as jnp

    from gf_jax import GoldfishConfig, loss_fn
    from gf_jax.data import read_jsonl_documents
    from gf_jax.tokenizer import load_tokenizer

    # A plain string would be encoded character by character.
    repo = helpers.REPO
    tok = load_tokenizer(os.path.join(repo, "tests", "fixtures", "hf", "llama2", "tokenizer.model"))
    with pytest.raises(TypeError, match=r"encode takes a list of texts; for one text use encode\(\[text\]\)\[0\]"):
        tok.encode("some text")
    assert tok.encode(["some text"])[0]
    # Target ids >= V give a finite loss that means nothing: refused when the values are known.
    logits_BxTxV = jnp.zeros((1, 3, 5))
    with pytest.raises(ValueError, match=r"holds id 7 but the logits have V=5 ids"):
        loss_fn(logits_BxTxV, jnp.array([[1, 7, 2]]), GoldfishConfig())
    loss, _ = loss_fn(logits_BxTxV, jnp.array([[1, -1, 4]]), GoldfishConfig(strategy="none"))
    assert float(loss) == pytest.approx(float(jnp.log(5.0)))
    # A JSONL field that is a number or null says so.
    path = tmp_path / "d.jsonl"
    for value, kind in ((3, "a number"), (None, "null"), (["a"], "a list")):
        path.write_text('{"text": %s}\n' % ('null' if value is None else repr(value).replace("'", '"')))
        with pytest.raises(ValueError, match=rf"d.jsonl:1: field 'text' is {kind}, not a string"):
            read_jsonl_documents(str(path), "text", None)
