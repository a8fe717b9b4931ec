"""The progress bar of long host loops (decoding, scoring): a tqdm bar on stderr, or none."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(progress: bool | str, total: int | None, default_desc: str, unit: str = "doc"):
    """A tqdm bar (``progress`` a string: its description, True: ``default_desc``), or None when
    ``progress`` is false. ``total`` None: a bar that counts without an end."""
    if not progress:
        return None

    return tqdm(total=total, desc=progress if isinstance(progress, str) else default_desc, unit=unit,
                file=sys.stderr)
