"""Same as ``python -m gf_jax.experiments canary`` (see gf_jax/experiments/canary.py)."""

from gf_jax.experiments.canary import main

main()
