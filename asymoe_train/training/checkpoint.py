"""Stage checkpoints: the DeepSpeed engine state (for resuming) plus consolidated model weights in safetensors
(what the next stage starts from, and what ``asymoe-train export`` reads; safe to load, no pickle)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_model, save_model

from asymoe_train.config.schema import ModelConfig, StageConfig
from asymoe_train.models.vlm import VisionLanguageModel, build_model

WEIGHTS = "model.safetensors"


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


def save_stage(engine, model: torch.nn.Module, run_dir: str, stage: str, rank: int = 0) -> str:
    """Engine checkpoint under ``checkpoints/<stage>/`` and the model's weights beside it (rank 0 writes those)."""
    engine.save_checkpoint(os.path.join(run_dir, "checkpoints"), tag=stage)
    if rank == 0:
        save_stage_weights(model, run_dir, stage)
    return stage_dir(run_dir, stage)


def load_stage_weights(model: torch.nn.Module, run_dir: str, stage: str) -> None:
    """Load a previous stage's consolidated weights (strict: the structures must match)."""
    path = os.path.join(stage_dir(run_dir, stage), WEIGHTS)
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
                     vocab_size: int, pad_token_id: int, seed: int = 0) -> VisionLanguageModel:
    """The model exactly as ``stage`` saved it: built from ``model_cfg``, upcycled if that stage or an earlier one
    upcycled, its weights loaded strictly from ``checkpoints/<stage>/model.safetensors``."""
    model = build_model(model_cfg, vocab_size, pad_token_id, seed)
    if upcycled_after(stages, stage):
        model.upcycle()  # structure only: every upcycled tensor is overwritten by the stage's weights
    load_stage_weights(model, run_dir, stage)
    return model
