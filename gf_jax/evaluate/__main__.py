"""``python -m gf_jax.evaluate``: see ``gf_jax.evaluate.cli``."""

from gf_jax.evaluate.cli import main

main()
