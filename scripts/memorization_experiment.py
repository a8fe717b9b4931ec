"""Same as ``python -m gf_jax.experiments memorization`` (see gf_jax/experiments/memorization.py)."""

from gf_jax.experiments.memorization import main

main()
