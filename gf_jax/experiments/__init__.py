"""The paper's two memorization experiments, each one command::

    python -m gf_jax.experiments memorization --preset cpu   # the extreme setting (section 4.1)
    python -m gf_jax.experiments canary --preset cpu         # the standard setting (section 4.2)

Every arm of an experiment is a ``gf_jax.config.RunConfig`` with its own goldfish settings,
documents and run directory, trained with ``gf_jax.train.trainer.Trainer`` and evaluated in memory
with ``gf_jax.evaluate``; arms run one after the other in one process.

Modules: ``arms`` (arms, experiment files and presets), ``corpus`` (documents cut to an exact
length, their tokens, rows per pass), ``training`` (training one arm), ``evaluation``
(extraction, membership inference, held-out loss of one arm), ``runner`` (the arm loop),
``tables`` (result files), ``io``, ``cli``, and the two protocols ``memorization`` and ``canary``.
"""
