"""``python -m gf_jax.experiments {memorization,canary} [flags]``: runs one experiment."""

from __future__ import annotations

import sys

from gf_jax.experiments import canary, memorization

EXPERIMENTS = {"memorization": memorization.main, "canary": canary.main}
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
    EXPERIMENTS[name](rest, command=f"python -m gf_jax.experiments {name}")


if __name__ == "__main__":
    main()
