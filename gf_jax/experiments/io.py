"""What an experiment writes besides run directories: result JSON, document files, provenance,
console lines; and which devices it trains on."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Sequence

import jax

from gf_jax.evaluate.report import jsonable
from gf_jax.run.distributed import is_main_process
from gf_jax.util import paths


def say(line: str) -> None:
    """Prints on process 0 only: every process of a multi-host run runs the same experiment."""
    if is_main_process():
        print(line, flush=True)


def select_devices(n: int):
    """The first ``n`` devices (0 = all)."""
    devices = jax.devices()
    if n < 0 or n > len(devices):
        raise ValueError(f"--devices {n} but {len(devices)} devices are visible; use 0 (all) or 1..{len(devices)}.")
    return devices[:n] if n else devices


def write_json(obj, path: str) -> str:
    """Writes ``obj`` as JSON (NaN as null), atomically: a reader never sees half a results file."""
    paths.write_text(path, json.dumps(jsonable(obj), indent=1))
    return path


def write_documents_jsonl(docs, path: str, *, id_key: str = "id", text_key: str = "text") -> str:
    """Writes ``gf_jax.data.Document``s as JSONL, atomically (every host of a pod may write the
    same file); read back with ``data.id_field=id_key``, ``data.text_field=text_key``."""
    paths.makedirs(os.path.dirname(path) or ".")
    # ASCII escapes: the file is the same bytes whatever the locale's encoding, and reads back exactly.
    lines = [json.dumps({id_key: d.id, text_key: d.text}) + "\n" for d in docs]
    paths.write_text(path, "".join(lines))
    return path


def provenance(command: str, argv: Sequence[str]) -> dict:
    """Date, machine and command of a run, for the results file (every figure keeps its command)."""
    device = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([command, *argv]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {jax.device_count()} x {device.device_kind} "
                   f"({device.platform}), jax {jax.__version__}",
    }
