"""``python -m gf_jax.train --config C [overrides]``: see ``gf_jax.train.cli``."""

from gf_jax.train.cli import main

main()
