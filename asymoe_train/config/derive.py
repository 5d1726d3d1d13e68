"""Numbers derived from a config (no torch, no model): pure functions, plus :func:`resolve`, which writes what is
derived (schedules, layer lists, source mixtures) into the config once it has been validated."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from asymoe_train.config.moe_schema import MoEConfig
from asymoe_train.config.schema import DataConfig, StageConfig, TrainConfig, VisionConfig
from asymoe_train.config.sources import source_parts


def _layer_list(key: str, spec: str | Sequence[int], named: Mapping[str, list[int]], forms: str) -> list[int]:
    """A layer spec as sorted unique indices: a name of ``named``, a comma-separated string or (once resolved) a
    list of indices; a ValueError names ``key`` otherwise."""
    if isinstance(spec, str) and spec in named:
        return list(named[spec])
    try:
        parts = spec.split(",") if isinstance(spec, str) else [spec] if isinstance(spec, int) else list(spec)
        return sorted({int(part) for part in parts if str(part).strip()})
    except (TypeError, ValueError):
        raise ValueError(f"{key}={spec!r} is not {forms} or a comma-separated list of layer indices") from None


def moe_layer_indices(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """0-based decoder layers whose FFN is an MoE slot: ``odd``, ``even``, ``all``, ``"1,3"`` or (as
    :func:`resolve` leaves it) a list of indices."""
    named = {"odd": list(range(1, num_layers, 2)), "even": list(range(0, num_layers, 2)), "all": list(range(num_layers))}
    layers = _layer_list("model.moe.layers", spec, named, "odd|even|all")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(f"model.moe.layers={spec!r} names layers {bad or 'none'}; the LM has layers 0..{num_layers - 1}")
    return layers


def evidence_layer_indices(spec: str | Sequence[int], moe_layers: list[int]) -> list[int]:
    """MoE layers that carry evidence-priority experts: ``all``, ``deep_half`` (the deeper half of the MoE layers),
    comma-separated layer indices or (as :func:`resolve` leaves it) a list; each must be an MoE layer."""
    named = {"all": list(moe_layers), "deep_half": moe_layers[len(moe_layers) // 2 :]}
    layers = _layer_list("model.moe.evidence.layers", spec, named, "all|deep_half")
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


def resolve(cfg: TrainConfig, world_size: int) -> list[str]:
    """Write what is derived from a validated config into it (in place, after
    :func:`~asymoe_train.config.validate.validate`), so every later reader takes plain values and nothing parses a
    spec twice: each stage's ``grad_accum``, ``steps`` and ``warmup_steps``; ``model.moe.layers`` and (with evidence
    pools) ``model.moe.evidence.layers`` as lists of layer indices; every ``data.sources`` value as its mixture
    ``{component: {glob, weight}}`` (a single glob becomes one component named after the source). Returns what
    changed, one ``key: old -> new`` line each."""
    changed = []

    def put(node, key: str, path: str, value) -> None:
        old = node[key] if isinstance(node, dict) else getattr(node, key)
        if old != value:
            changed.append(f"{path}: {old} -> {value}")
            if isinstance(node, dict):
                node[key] = value
            else:
                setattr(node, key, value)

    for name, stage in cfg.curriculum.stages.items():
        accum = stage_grad_accum(stage, world_size)
        steps = stage_steps(stage, cfg.data, world_size)
        assert steps is not None, f"stage {name}: validate() first"
        values = {"grad_accum": accum, "steps": steps, "warmup_steps": stage_warmup(stage, steps)}
        for key, value in values.items():
            put(stage, key, f"curriculum.stages.{name}.{key}", value)
    moe = cfg.model.moe
    layers = moe_layer_indices(moe.layers, cfg.model.lm.num_layers)
    put(moe, "layers", "model.moe.layers", layers)
    if any(pool.expert == "evidence" for pool in moe.pools):
        put(moe.evidence, "layers", "model.moe.evidence.layers", evidence_layer_indices(moe.evidence.layers, layers))
    for name, value in list(cfg.data.sources.items()):
        mixture = {part.name or name: {"glob": part.glob, "weight": part.weight}
                   for part in source_parts(f"data.sources.{name}", value)}
        if mixture != value:  # a mixture as written stays as it is
            cfg.data.sources[name] = mixture
    return changed


def lr_group_of(stage: StageConfig, group: str) -> str:
    """The optimizer group (its ``lr_group`` tag) that the parameters of trainable group ``group`` (a name of
    ``parameter_groups``, e.g. ``experts.text``) join in ``stage``: the ``lr_scale``/``lr_groups`` key that sets
    their lr, the group's own before its family's (``experts.text`` before ``experts``), or ``default``."""
    for key in (group, group.split(".")[0]):
        if key in stage.lr_groups or key in stage.lr_scale:
            return key
    return "default"


def tag_lr(stage: StageConfig, tag: str) -> float:
    """The peak lr of the optimizer group tagged ``tag``: its ``lr_groups`` entry, else ``lr`` times its
    ``lr_scale`` entry (1 for ``default``)."""
    if tag in stage.lr_groups:
        return stage.lr_groups[tag]
    return stage.lr * stage.lr_scale.get(tag, 1.0)
