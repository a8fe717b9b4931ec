"""``python -m gf_jax.data``: see ``gf_jax.data.cli``."""

import sys

from gf_jax.data.cli import main

sys.exit(main())
