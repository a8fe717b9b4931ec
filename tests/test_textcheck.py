"""gf_jax.textcheck: binary input is refused in one sentence naming the file; text is not."""

import pytest

from gf_jax.textcheck import check_text_file


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
