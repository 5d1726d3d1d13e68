"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""

from __future__ import annotations

import math

import torch

from asymoe_train.config.derive import tag_lr


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, min_ratio))


def rebase_schedule(scheduler, stage) -> None:
    """Continue a schedule restored from a checkpoint with the peak lrs of ``stage`` (each optimizer group's, by its
    ``lr_group`` tag: ``lr``, ``lr_scale``, ``lr_groups``): its step stays the checkpoint's, its shape (schedule
    length, warm-up, floor) is the one it was built with, and the optimizer's lrs are set for that step now (a
    resumed run may change the stage's lrs and schedule length)."""
    scheduler.base_lrs = [tag_lr(stage, group.get("lr_group", "default")) for group in scheduler.optimizer.param_groups]
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)

