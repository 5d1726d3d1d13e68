"""Numbers derived from a config (no torch, no model): pure functions, plus :func:`resolve_schedule`, which writes
a stage's derived schedule into the config once it has been validated."""

from __future__ import annotations

import math
from collections.abc import Mapping

from asymoe_train.config.schema import DataConfig, MoEConfig, StageConfig, TrainConfig, VisionConfig


def moe_layer_indices(spec: str, num_layers: int) -> list[int]:
    """0-based decoder layers whose FFN is an MoE slot: ``odd``, ``even``, ``all`` or ``"1,3"``."""
    named = {
        "odd": list(range(1, num_layers, 2)),
        "even": list(range(0, num_layers, 2)),
        "all": list(range(num_layers)),
    }
    if spec in named:
        return named[spec]
    try:
        layers = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ValueError(
            f"model.moe.layers={spec!r} is not odd|even|all or a comma-separated list of layer indices"
        ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(f"model.moe.layers={spec!r} names layers {bad or 'none'}; the LM has layers 0..{num_layers - 1}")
    return layers


def evidence_layer_indices(spec: str, moe_layers: list[int]) -> list[int]:
    """MoE layers that carry evidence-priority experts: ``all``, ``deep_half`` (the deeper half of the MoE layers)
    or comma-separated layer indices (each must be an MoE layer)."""
    if spec == "all":
        return list(moe_layers)
    if spec == "deep_half":
        return moe_layers[len(moe_layers) // 2 :]
    try:
        layers = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"model.moe.evidence.layers={spec!r} is not all|deep_half or a list of layer indices") from None
    bad = [i for i in layers if i not in moe_layers]
    if bad or not layers:
        raise ValueError(f"model.moe.evidence.layers={spec!r}: {bad or 'none'} not among the MoE layers {moe_layers}")
    return layers


def image_tokens_per_image(vision: VisionConfig) -> int:
    """Image tokens the LM sees per image after patch merging."""
    grid = vision.image_size // vision.patch_size
    return (grid // vision.merge) ** 2


def reachable_experts(moe: MoEConfig) -> dict[str, int]:
    """Number of experts each router can reach."""
    sizes = {pool.name: pool.num_experts for pool in moe.pools}
    return {router.name: sum(sizes.get(p, 0) for p in router.pools) for router in moe.routers}


def upcycled_after(stages: Mapping[str, StageConfig], stage: str) -> bool:
    """Whether the weights a stage saves are upcycled: that stage or an earlier one sets ``upcycle``."""
    names = list(stages)
    if stage not in names:
        raise ValueError(f"stage {stage!r} is not in curriculum.stages {names}")
    return any(s.upcycle for s in list(stages.values())[: names.index(stage) + 1])


def stage_grad_accum(stage: StageConfig, world_size: int) -> int:
    """Micro-batches per optimizer step: from ``global_batch_size`` when set (rounded down; validate checks that it
    divides), else ``grad_accum``."""
    if stage.global_batch_size > 0:
        return max(1, stage.global_batch_size // (stage.batch_size * world_size))
    return stage.grad_accum


def global_batch(stage: StageConfig, world_size: int) -> int:
    """Samples (images or conversations) per optimizer step over all ranks."""
    return stage.batch_size * stage_grad_accum(stage, world_size) * world_size


def steps_per_epoch(stage: StageConfig, data: DataConfig, world_size: int) -> int | None:
    """Optimizer steps for one pass over the stage's source, or None when ``data.source_sizes`` does not know it."""
    size = data.source_sizes.get(stage.source)
    return math.ceil(size / global_batch(stage, world_size)) if size else None


def stage_steps(stage: StageConfig, data: DataConfig, world_size: int) -> int | None:
    """Optimizer steps of a stage: ``ceil(epochs * steps_per_epoch)`` when ``epochs`` is set (None if the source size
    is unknown), else ``steps``."""
    if stage.epochs > 0:
        size = data.source_sizes.get(stage.source)
        return math.ceil(stage.epochs * size / global_batch(stage, world_size)) if size else None
    return stage.steps


def stage_warmup(stage: StageConfig, steps: int) -> int:
    """Warm-up steps: ``ceil(warmup_ratio * steps)`` when ``warmup_ratio`` is set, else ``warmup_steps``."""
    return math.ceil(stage.warmup_ratio * steps) if stage.warmup_ratio > 0 else stage.warmup_steps


def resolve_schedule(cfg: TrainConfig, world_size: int) -> list[str]:
    """Write every stage's derived ``grad_accum``, ``steps`` and ``warmup_steps`` into ``cfg`` (in place, after
    :func:`~asymoe_train.config.validate.validate`), so the trainer reads plain numbers; returns what changed."""
    changed = []
    for name, stage in cfg.curriculum.stages.items():
        accum = stage_grad_accum(stage, world_size)
        steps = stage_steps(stage, cfg.data, world_size)
        assert steps is not None, f"stage {name}: validate() first"
        values = {"grad_accum": accum, "steps": steps, "warmup_steps": stage_warmup(stage, steps)}
        for key, value in values.items():
            if getattr(stage, key) != value:
                changed.append(f"curriculum.stages.{name}.{key}: {getattr(stage, key)} -> {value}")
                setattr(stage, key, value)
    return changed
