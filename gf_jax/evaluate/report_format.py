"""Formatting shared by the report's parts: values in tables, Markdown tables, figures written as
PNG to a local path or a URL (matplotlib loaded only when a plot is drawn)."""

from __future__ import annotations

import io
import math

from gf_jax.util import paths


def format_value(value, spec: str) -> str:
    """``format(value, spec)``, or "-" for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def markdown_rows(rows: list[list[str]]) -> str:
    """A Markdown table: the first row is the header, the others the body."""
    header, *body = rows
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines) + "\n"


def save_figure(fig, path: str) -> None:
    """Writes a figure as PNG to a local path or a URL, then frees it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    paths.write_bytes(path, buffer.getvalue())


def pyplot():
    """matplotlib's pyplot, writing files only (never a display)."""
    import matplotlib  # heavy, and only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): the backend is chosen at this import

    return plt
