"""A run on disk: its directory's files, its checkpoints, where its model comes from, its lock, and
the start-up of a multi-process run.

Modules: ``rundir`` (``RunDir``: every file name of a run directory), ``checkpoint`` (Orbax: save,
restore, skip a corrupt step, "which step?"), ``source`` (``ModelSource``: run dir, ``RUN@STEP``, HF
or PEFT directory, parsed once; architecture, tokenizer and parameters of a source), ``adapters``
(the LoRA seam: what a LoRA checkpoint holds and how adapters join their base), ``load``
(``load_model``), ``init_from`` (a run config from ``train.init_from``), ``hf_import`` and
``export`` (runs from and to Hugging Face directories), ``lock`` (one trainer per run directory),
``distributed`` (multi-process start-up). Imports the config, model, data, tokenizer and HF codecs
below it; nothing above it (train, evaluate, experiments).
"""
