"""Checkpoints under ``<run_dir>/checkpoints``, by component.

``<stage>/`` is written when a stage ends (the next stage starts from it, ``asymoe-train export`` reads it) and
``<stage>-step<NNNNNNN>/`` every ``checkpoint.every_steps`` and on SIGTERM/SIGUSR1. Each holds

* ``model.safetensors``: consolidated weights (:mod:`.weights`);
* ``optim_rank<r>.pt`` and ``optim_by_name_rank<r>.safetensors``: each rank's optimizer and lr-schedule state, the
  latter by parameter name so that a checkpoint resumes on another layout (:mod:`.optimizer`, through
  :mod:`.deepspeed_optim` for DeepSpeed's optimizers);
* ``rng_rank<r>.pt``: each rank's RNG states (:mod:`.rng`);
* ``trainer_state.json`` and the ``COMPLETE`` marker, written and published atomically (:mod:`.store`).

:mod:`.engine_checkpoint` writes and reads all of them for a DeepSpeed engine.
"""
