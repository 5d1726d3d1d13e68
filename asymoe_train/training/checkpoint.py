"""Checkpoints under ``<run_dir>/checkpoints``.

``<stage>/`` is written when a stage ends (the next stage starts from it, ``asymoe-train export`` reads it) and
``<stage>-step<NNNNNNN>/`` every ``checkpoint.every_steps`` and on SIGTERM/SIGUSR1. Each holds

* ``model.safetensors``: consolidated weights (no pickle);
* ``optim_rank<r>.pt`` / ``rng_rank<r>.pt``: each rank's optimizer + lr-schedule state and RNG states, plain tensors
  and numbers loaded with ``torch.load(weights_only=True)``;
* ``trainer_state.json``: stage, step, data position (logical stream -> shard draw, sample), W&B run id, the resolved
  config and its hash, and the parallel layout;
* ``COMPLETE``: the completion marker.

A checkpoint is written under ``.tmp-<name>`` and published by renaming it once every file and the marker are
there, so a kill at any moment leaves the last complete checkpoint intact; leftovers are ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from asymoe_train.config.schema import ModelConfig, StageConfig
from asymoe_train.models.vlm import VisionLanguageModel, build_model

WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"
MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-"
# Fault injection for crash-safety tests: a process SIGKILLs itself inside the save of the checkpoint named here.
CRASH_ENV = "ASYMOE_CRASH_IN_SAVE"

log = logging.getLogger(__name__)


def stage_dir(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, "checkpoints", stage)


def save_weights(model: torch.nn.Module, path: str) -> None:
    """Write the model's weights to ``path`` atomically: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    save_model(model, tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600; weights are shared like the run's other outputs
    os.replace(tmp, path)


def save_stage_weights(model: torch.nn.Module, run_dir: str, stage: str) -> str:
    """The consolidated weights of a finished stage, ``checkpoints/<stage>/model.safetensors``; returns the path."""
    directory = stage_dir(run_dir, stage)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS)
    save_weights(model, path)
    return path


def load_stage_weights(model: torch.nn.Module, run_dir: str, stage: str, directory: str | None = None) -> None:
    """Load a previous stage's consolidated weights (strict: the structures must match), from
    ``checkpoints/<stage>`` of ``run_dir`` or from ``directory``."""
    path = os.path.join(directory or stage_dir(run_dir, stage), WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage {stage!r} left no weights at {path}")
    missing, unexpected = load_model(model, path, strict=True)
    assert not missing and not unexpected, (missing, unexpected)


def upcycled_after(stages: Mapping[str, StageConfig], stage: str) -> bool:
    """Whether the weights a stage saves are upcycled: that stage or an earlier one sets ``upcycle``."""
    names = list(stages)
    if stage not in names:
        raise ValueError(f"stage {stage!r} is not in curriculum.stages {names}")
    return any(s.upcycle for s in list(stages.values())[: names.index(stage) + 1])


def load_stage_model(model_cfg: ModelConfig, stages: Mapping[str, StageConfig], run_dir: str, stage: str,
                     vocab_size: int, pad_token_id: int, seed: int = 0,
                     directory: str | None = None) -> VisionLanguageModel:
    """The model exactly as ``stage`` saved it: built from ``model_cfg``, upcycled if that stage or an earlier one
    upcycled, its weights loaded strictly from ``checkpoints/<stage>/model.safetensors``."""
    model = build_model(model_cfg, vocab_size, pad_token_id, seed)
    if upcycled_after(stages, stage):
        model.upcycle()  # structure only: every upcycled tensor is overwritten by the stage's weights
    load_stage_weights(model, run_dir, stage, directory)
    return model


# ------------------------------------------------------------------------------------------------ resumable state
@dataclass
class TrainerState:
    """What a checkpoint records besides weights and optimizer state."""

    stage: str
    stage_index: int
    step: int  # optimizer steps done in this stage
    global_step: int
    stage_done: bool
    # logical stream -> (shard draw, samples taken from it, samples in all); see asymoe_train.data.pipeline.StreamSpec
    data_position: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    wandb_id: str = ""
    config: str = ""  # resolved config (YAML)
    config_hash: str = ""
    layout: dict = field(default_factory=dict)  # world_size, ep_size, zero_stage, precision
    saved_at: float = 0.0

    @classmethod
    def load(cls, directory: str) -> TrainerState:
        with open(os.path.join(directory, STATE), encoding="utf-8") as f:
            raw = json.load(f)
        raw["data_position"] = {int(k): tuple(v) for k, v in raw["data_position"].items()}
        return cls(**raw)


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def checkpoint_name(stage: str, step: int, stage_done: bool) -> str:
    return stage if stage_done else f"{stage}-step{step:07d}"


def rng_state() -> dict:
    numpy = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (numpy[0], torch.from_numpy(numpy[1].copy()), *numpy[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(engine, model: torch.nn.Module, run_dir: str, state: TrainerState, rank: int = 0,
                    world_size: int = 1) -> str:
    """Write a complete checkpoint atomically (every rank calls this); returns its directory."""
    root = os.path.join(run_dir, "checkpoints")
    name = checkpoint_name(state.stage, state.step, state.stage_done)
    final, tmp = os.path.join(root, name), os.path.join(root, TMP_PREFIX + name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(world_size)
    torch.save({"optimizer": engine.optimizer.state_dict(), "lr_scheduler": engine.lr_scheduler.state_dict()},
               os.path.join(tmp, f"optim_rank{rank}.pt"))
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        save_weights(model, os.path.join(tmp, WEIGHTS))
        state.saved_at = time.time()
        with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as f:
            json.dump({**state.__dict__, "data_position": {str(k): list(v) for k, v in state.data_position.items()}},
                      f, indent=1)
    _barrier(world_size)
    if os.environ.get(CRASH_ENV) == name:  # fault injection: die with every file written but nothing published
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            f.write(f"{world_size} ranks\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.isdir(final):  # a stage end written again after a resume: swap, then drop the old copy
            old = os.path.join(root, TMP_PREFIX + "old-" + name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    _barrier(world_size)
    return final


def complete_checkpoints(run_dir: str) -> list[tuple[TrainerState, str]]:
    """Complete checkpoints of a run, oldest first; incomplete ones are skipped with a warning."""
    root = os.path.join(run_dir, "checkpoints")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if name.startswith(TMP_PREFIX) or not os.path.isfile(os.path.join(path, MARKER)):
            log.warning("ignoring incomplete checkpoint %s (a save was interrupted)", path)
            continue
        found.append((TrainerState.load(path), path))
    return sorted(found, key=lambda item: (item[0].stage_index, item[0].step, item[0].stage_done))


def prune_checkpoints(run_dir: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` mid-stage checkpoints (stage ends stay); remove interrupted leftovers."""
    root = os.path.join(run_dir, "checkpoints")
    mid = [path for state, path in complete_checkpoints(run_dir) if not state.stage_done]
    for path in mid[: max(0, len(mid) - keep_last)]:
        shutil.rmtree(path)
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(engine, model: torch.nn.Module, directory: str, rank: int = 0, replicated: bool = False) -> None:
    """Restore weights, this rank's optimizer, lr schedule and RNG states (no unpickling of code).

    ``replicated``: every rank holds the whole optimizer state (ZeRO-0), so rank 0's file serves any world size."""
    missing, unexpected = load_model(model, os.path.join(directory, WEIGHTS), strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    path = os.path.join(directory, f"optim_rank{0 if replicated else rank}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no optimizer state for rank {rank}: it was written by fewer ranks")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    engine.optimizer.load_state_dict(saved["optimizer"])
    engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    rng = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.isfile(rng):  # a rank that did not exist when the checkpoint was written keeps its fresh seeds
        set_rng_state(torch.load(rng, weights_only=True))
