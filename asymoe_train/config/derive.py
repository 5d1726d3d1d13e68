"""Pure functions that derive numbers from a config (no torch, no model)."""

from __future__ import annotations

from asymoe_train.config.schema import MoEConfig, VisionConfig

MODALITIES = ("text", "image")


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
