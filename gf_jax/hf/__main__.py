"""``python -m gf_jax.hf``: see ``gf_jax.hf.cli``."""

from gf_jax.hf.cli import main

main()
