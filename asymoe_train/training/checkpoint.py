"""Stage checkpoints: the DeepSpeed engine state (for resuming) plus consolidated model weights in safetensors
(what the next stage starts from; safe to load, no pickle)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_model, save_model

WEIGHTS = "model.safetensors"


def stage_dir(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, "checkpoints", stage)


def save_stage(engine, model: torch.nn.Module, run_dir: str, stage: str, rank: int = 0) -> str:
    """Engine checkpoint under ``checkpoints/<stage>/`` and the model's weights beside it (rank 0 writes those)."""
    directory = stage_dir(run_dir, stage)
    engine.save_checkpoint(os.path.join(run_dir, "checkpoints"), tag=stage)
    if rank == 0:
        tmp = os.path.join(directory, WEIGHTS + ".tmp")
        save_model(model, tmp)
        os.replace(tmp, os.path.join(directory, WEIGHTS))  # atomic: a crash never leaves a half-written file
    return directory


def load_stage_weights(model: torch.nn.Module, run_dir: str, stage: str) -> None:
    """Load a previous stage's consolidated weights (strict: the structures must match)."""
    path = os.path.join(stage_dir(run_dir, stage), WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage {stage!r} left no weights at {path}")
    missing, unexpected = load_model(model, path, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
