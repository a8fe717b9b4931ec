"""Command-line pieces both protocols share: the common flags, the experiment file they name,
and how a user error ends the command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from gf_jax.config import replace_sections
from gf_jax.experiments.arms import REPO, load_experiment, preset_path
from gf_jax.run.init_from import apply_init_from
from gf_jax.util.commands import run_command


def experiment_parser(prog: str | None, doc: str, kind: str, presets: str) -> argparse.ArgumentParser:
    """A parser with --preset and --config; the protocol adds its flags, then ``add_run_arguments``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help=f"{presets}: configs/experiments/{kind}_<preset>.yaml")
    parser.add_argument("--config", default=None, help="an experiment YAML instead of a preset")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, kind: str, override_example: str) -> None:
    """--out, --init-from, --devices, --fresh and the ``section.key=value`` overrides."""
    parser.add_argument("--out", default=None, help=f"output directory (default: runs/{kind}_<preset>)")
    parser.add_argument("--init-from", default=None,
                        help="start every arm from a pretrained model: an HF directory, RUN_DIR or RUN_DIR@STEP")
    parser.add_argument("--devices", type=int, default=0, help="train on the first N devices (0 = all)")
    parser.add_argument("--fresh", action="store_true", help="retrain arms whose run directories exist")
    parser.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {override_example}")


def resolve_experiment(args, kind: str, aliases: dict[str, str], overrides: Sequence[str], experiment_cls):
    """(experiment file, preset name, experiment settings, base RunConfig, output directory)."""
    path = args.config or preset_path(kind, args.preset, aliases)
    preset = os.path.splitext(os.path.basename(args.config))[0] if args.config else args.preset
    exp, base = load_experiment(path, overrides, experiment_cls)
    base = _with_pretrained(base, args.init_from)
    out = args.out or os.path.join("runs", f"{kind}_{preset}")
    os.makedirs(out, exist_ok=True)
    return path, preset, exp, base, out


def _with_pretrained(base, init_from: str | None):
    """``base`` with the architecture and tokenizer of ``--init-from`` (or ``train.init_from``): the
    documents are cut with the pretrained model's tokenizer before any arm trains."""
    init_from = init_from or base.train.init_from
    if not init_from:
        return base
    return apply_init_from(replace_sections(base, train={"init_from": init_from}))


def script_command() -> str:
    """How this process was started, for the results file: ``python <script relative to the repo>``."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else "?"
    return f"python {os.path.relpath(script, REPO) if script != '?' else script}"


def run_cli(run: Callable[..., dict], argv: Sequence[str] | None, command: str | None) -> None:
    """Runs an experiment; a user error (bad preset, key, path, an arm in use) is one line and exit
    status 2, Ctrl-C one line and 130 (``gf_jax.util.commands``)."""
    run_command(lambda: run(argv, command=command))
