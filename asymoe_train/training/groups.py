"""Named trainable groups: stages list group names, never parameter-name substrings.

``experts`` means every pool; ``experts.<pool>`` one pool.
"""

from __future__ import annotations

from torch import nn

from asymoe_train.config.derive import lr_group_of, tag_lr
from asymoe_train.config.names import TRAINABLE_GROUPS as GROUPS
from asymoe_train.config.schema import StageConfig
from asymoe_train.moe.block import MoEBlock

__all__ = ["GROUPS", "optimizer_groups", "parameter_groups", "set_trainable"]


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of a VisionLanguageModel under exactly one group name (``experts.<pool>`` for experts)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}

    def add(group: str, prefix: str, module: nn.Module) -> None:
        for name, param in module.named_parameters(prefix=prefix):
            groups.setdefault(group, []).append((name, param))

    add("vision", "vision", model.vision)
    add("projector", "projector", model.projector)
    lm = model.lm
    add("embeddings", "lm.model.embed_tokens", lm.model.embed_tokens)
    if lm.lm_head.weight is not lm.model.embed_tokens.weight:
        add("embeddings", "lm.lm_head", lm.lm_head)
    add("norms", "lm.model.norm", lm.model.norm)
    for i, layer in enumerate(lm.model.layers):
        prefix = f"lm.model.layers.{i}"
        add("attention", f"{prefix}.self_attn", layer.self_attn)
        add("norms", f"{prefix}.input_layernorm", layer.input_layernorm)
        add("norms", f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm)
        if isinstance(layer.mlp, MoEBlock):
            for pool_name, pool in layer.mlp.pools.items():
                add(f"experts.{pool_name}", f"{prefix}.mlp.pools.{pool_name}", pool)
            add("routers", f"{prefix}.mlp.routers", layer.mlp.routers)
        else:
            add("mlp", f"{prefix}.mlp", layer.mlp)
    if getattr(model, "head", None) is not None:
        add("head", "head", model.head)
    seen = {id(p) for members in groups.values() for _, p in members}
    missing = [name for name, p in model.named_parameters() if id(p) not in seen]
    assert not missing, f"parameters outside every group: {missing[:5]}"
    return groups


def set_trainable(model: nn.Module, trainable: list[str]) -> dict[str, int]:
    """Freeze everything, then unfreeze the named groups; returns trainable parameter counts per group."""
    groups = parameter_groups(model)
    for param in model.parameters():
        param.requires_grad_(False)
    counts: dict[str, int] = {}
    for wanted in trainable:
        matched = [g for g in groups if g == wanted or g.startswith(wanted + ".")]
        for group in matched:
            for _, param in groups[group]:
                param.requires_grad_(True)
            counts[group] = sum(p.numel() for _, p in groups[group])
    return counts


def optimizer_groups(model: nn.Module, stage: StageConfig) -> list[dict]:
    """The optimizer's parameter groups of a stage: the trainable parameters, one group per learning rate
    (``curriculum.stages.<s>.lr_scale`` / ``lr_groups``, by group name), each tagged ``lr_group`` (its key, or
    ``default``) so a checkpoint's groups are matched by tag on any layout. Groups without trainable parameters are
    left out; ``default`` comes first, and each group's ``lr`` is its peak lr (the schedule multiplies it)."""
    by_tag: dict[str, dict] = {}
    for group, members in parameter_groups(model).items():
        params = [p for _, p in members if p.requires_grad]
        if not params:
            continue
        tag = lr_group_of(stage, group)
        entry = by_tag.setdefault(tag, {"name": f"lr_{tag}", "lr_group": tag, "lr": tag_lr(stage, tag),
                                         "params": []})
        entry["params"].extend(params)
    return sorted(by_tag.values(), key=lambda g: (g["lr_group"] != "default", g["lr_group"]))
