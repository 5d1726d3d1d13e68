"""A model's parameters as each curriculum stage trains them, counted on the meta device (nothing is allocated):
what the trainer prints before a run and ``asymoe-train plan`` reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from asymoe_train.config.schema import ModelConfig, StageConfig
from asymoe_train.models.vlm import build_model
from asymoe_train.training.groups import parameter_groups, set_trainable


@dataclass
class ParamSplit:
    """Parameters of a model as one stage trains it."""

    dense: int  # every parameter outside expert pools (towers, projector, attention, embeddings, routers, ...)
    expert: int  # parameters of all expert pools, all experts
    dense_trainable: int
    expert_trainable: int


@dataclass
class StageParams:
    name: str
    upcycled: bool
    total: int
    activated: int  # per token (top_k experts, not all)
    params: ParamSplit


def stage_params(model_cfg: ModelConfig, stages: Mapping[str, StageConfig],
                 vocab_size: int) -> tuple[int, list[StageParams]]:
    """The dense model's parameter count, and each stage's counts: the model built as the trainer builds it (dense,
    upcycled from the stage that sets ``upcycle``) with the stage's trainable groups."""
    with torch.device("meta"):
        model = build_model(model_cfg, vocab_size, pad_token_id=0)
    dense_total, _ = model.parameter_counts()
    described = []
    for name, stage in stages.items():
        if stage.upcycle:
            with torch.device("meta"):
                model.upcycle()
        set_trainable(model, stage.trainable)
        expert = [p for group, members in parameter_groups(model).items() if group.startswith("experts")
                  for _, p in members]
        total, activated = model.parameter_counts()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        expert_total = sum(p.numel() for p in expert)
        expert_trainable = sum(p.numel() for p in expert if p.requires_grad)
        split = ParamSplit(total - expert_total, expert_total, trainable - expert_trainable, expert_trainable)
        described.append(StageParams(name, model.is_upcycled, total, activated, split))
    return dense_total, described


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
