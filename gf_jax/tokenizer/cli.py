"""``python -m gf_jax.tokenizer train --input data/tinyshakespeare.txt --vocab-size 512 --out /tmp/tok``:
trains a byte-fallback sentencepiece tokenizer on text files (``gf_jax.tokenizer.training``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from gf_jax.tokenizer.sentencepiece_model import SentencePieceTokenizer
from gf_jax.tokenizer.training import train_tokenizer
from gf_jax.util.commands import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gf_jax.tokenizer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-fallback sentencepiece model")
    train.add_argument("--input", nargs="+", required=True, help="text files or folders of .txt files")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output folder (tokenizer.model is written there)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(lambda: _train(args))


def _train(args) -> None:
    missing = [p for p in args.input if not os.path.exists(p)]
    if missing:
        raise ValueError(f"--input {missing[0]} does not exist; pass text files or folders of .txt files.")
    if args.vocab_size < 1:
        raise ValueError(f"--vocab-size must be a positive number of pieces (e.g. 4096), got {args.vocab_size}.")
    path = train_tokenizer(args.input, args.vocab_size, args.out)
    print(f"{path}: {SentencePieceTokenizer.load(path)}")
