"""The package imports with nothing but JAX, as promised to users."""

import subprocess
import sys


def test_core_import_needs_only_jax():
    # Importing the core must not pull in flax, optax, orbax, tfds, sentencepiece or numpy-heavy
    # training modules: users drop it into their own code.
    code = (
        "import sys; from gf_jax import GoldfishConfig, goldfish_mask, loss_fn, chunked_loss_fn; "
        "heavy = [m for m in ('flax', 'optax', 'orbax', 'tensorflow_datasets', 'sentencepiece', "
        "'grain', 'rouge_score', 'yaml') if m in sys.modules]; print(heavy); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
