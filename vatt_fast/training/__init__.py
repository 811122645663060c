"""The trainer's parts, split by job as open_clip's ``open_clip_train`` is.

``python -m vatt_fast.train`` (:func:`vatt_fast.train.main`) reads as the table of
contents of a run; each step it names lives here as a public function that
``vatt_fast.eval`` and a fine-tuning entry point can call:

=================== ==========================================================================
``params``          the flags (one table), ``--config`` files, defaults from the preset
``schedule``        VATT's learning-rate schedule (linear warmup, half-cosine)
``precision``       device choice, precision (bf16 autocast), TF32 policy, memory readout
``compute_weights`` bf16 copies of the Linear weights, refreshed once per step (``--bf16-weights``)
``setup``           dataset checks, the model, optimizer, loss and loaders of a run
``resume``          everything about continuing a run: which checkpoint, its arguments, its state
``loop``            the run state, the step, the step loop with logging/eval/checkpoints, evaluation
``run_folder``      the run folder: logging, ``config.yaml``, ``metrics.jsonl`` + TensorBoard,
                    ``summary.json``, ``curves.png``
=================== ==========================================================================

Process-group helpers (DDP/FSDP2 wrapping, global BatchNorm, broadcasts) are in
:mod:`vatt_fast.distributed`; checkpoint files in :mod:`vatt_fast.checkpoint`.
"""
