"""``python -m gf_jax.tokenizer``: see ``gf_jax.tokenizer.cli``."""

from gf_jax.tokenizer.cli import main

main()
