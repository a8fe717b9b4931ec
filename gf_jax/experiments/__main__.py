"""``python -m gf_jax.experiments {memorization,canary} [flags]``: runs one experiment."""

from __future__ import annotations

import sys

EXPERIMENTS = ("memorization", "canary")
USAGE = (f"usage: python -m gf_jax.experiments {{{','.join(EXPERIMENTS)}}} [--help] [flags]\n"
         "  memorization  train on a few documents for many epochs, then try to extract them\n"
         "  canary        canaries repeated inside a larger corpus, then try to extract them")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in EXPERIMENTS:
        print(f"error: no experiment {name!r}; use one of {', '.join(EXPERIMENTS)}.\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    command = f"python -m gf_jax.experiments {name}"
    if name == "memorization":
        from gf_jax.experiments.memorization import main as run_experiment
    else:
        from gf_jax.experiments.canary import main as run_experiment
    run_experiment(rest, command=command)


if __name__ == "__main__":
    main()
