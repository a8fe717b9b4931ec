"""What a run writes about itself while it trains: ``metrics.jsonl`` in the run directory."""

from __future__ import annotations

import json

from gf_jax import rundir


def read_metrics(run_dir: str) -> list[dict]:
    """Every record of ``run_dir``'s ``metrics.jsonl``, in order ([] when the run wrote none)."""
    path = rundir.join(run_dir, "metrics.jsonl")
    if not rundir.exists(path):
        return []
    return [json.loads(line) for line in rundir.read_text(path).splitlines() if line.strip()]
