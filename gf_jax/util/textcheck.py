"""Refuses input that is not text before a tokenizer or a model is trained on it.

    check_text_file("data/corpus.txt")   # ValueError (one sentence naming the file) for /bin/ls

A file is text when its first ``sample_bytes`` hold no NUL byte and at most ``max_bad_share`` of
them fail to decode as UTF-8 (a few stray bytes in a scraped corpus are fine; an executable, an
image or a compressed file is not).
"""

from __future__ import annotations

from gf_jax.util import paths

SAMPLE_BYTES = 1 << 20


def check_text_file(path: str, *, what: str = "data.path", max_bad_share: float = 0.01,
                    sample_bytes: int = SAMPLE_BYTES) -> None:
    """Raises ValueError when ``path`` does not look like UTF-8 text (``what`` names the setting)."""
    if paths.is_url(path):
        # URLs only
        from etils import epath

        with epath.Path(path).open("rb") as f:
            sample = f.read(sample_bytes)
    else:
        with open(path, "rb") as f:
            sample = f.read(sample_bytes)
    reason = _not_text(sample, max_bad_share, truncated=len(sample) == sample_bytes)
    if reason:
        raise ValueError(f"{what} {path} is not a text file ({reason}); point it at UTF-8 text or JSONL.")


def _not_text(sample: bytes, max_bad_share: float, truncated: bool) -> str | None:
    nul = sample.find(b"\0")
    if nul >= 0:
        return f"it contains NUL bytes, the first at byte {nul}"
    if not sample:
        return None
    text = sample.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - sample.count("\ufffd".encode())  # replacement characters we made
    if truncated:  # the sample may end inside a multi-byte character
        bad = max(0, bad - 3)
    if bad > max_bad_share * len(sample):
        return f"{bad / len(sample):.0%} of its first {len(sample):,} bytes are not UTF-8"
    return None
