"""Command line of the data pipeline: prepare (or check) a run config's tokenized store.

    python -m gf_jax.data prepare --config configs/tiny.yaml [--workers 8] [data.path=...]

Prints the store's folder and counts. Every later run with the same data settings and
``data.store`` on (or auto above its size) memory-maps it instead of reading and tokenizing the corpus.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gf_jax.config import load_config
from gf_jax.data.prepare import ensure_store
from gf_jax.data.tasks import corpus_tokenizer
from gf_jax.util.commands import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gf_jax.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize the configured corpus into a tokenized store")
    prep.add_argument("--config", required=True, help="run config (YAML); its data section is used")
    prep.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: data.store_workers, "
                      "else every core)")
    prep.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=corpus/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _prepare(args))


def _prepare(args) -> int:
    config = load_config(args.config, args.overrides).data
    # One process, whatever the host is part of: this command prepares; runs then wait for nothing.
    store = ensure_store(config, corpus_tokenizer(config), workers=args.workers, process_index=0, process_count=1)
    m = store.manifest
    print(f"{store.path}: {m['documents']:,} documents, {m['tokens']:,} tokens ({m['dtype']}) in "
          f"{len(m['shards'])} shard(s); prepared in {m['prepare_seconds']} s with {m['workers']} worker(s)")
    return 0
