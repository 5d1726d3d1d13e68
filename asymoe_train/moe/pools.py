"""The registry of expert types a pool can hold (``model.moe.pools.*.expert``) and the pool builder. It sits above
the expert modules, which import only ``moe.experts``'s shared pieces, so the package has no import cycle."""

from __future__ import annotations

from torch import nn

from asymoe_train.config.names import EXPERT_TYPES as EXPERT_TYPE_NAMES
from asymoe_train.moe.evidence import EvidenceExperts
from asymoe_train.moe.experts import WHOLE, Shard, SwiGLUExperts
from asymoe_train.moe.hyperbolic_experts import HyperbolicExperts


def expert_hidden(intermediate: int, width: float) -> int:
    """The hidden units of an expert of ``width`` (``model.moe.pools.*.width``) over an FFN of ``intermediate``."""
    return round(intermediate * width)


def _ffn(pool, moe, hidden: int, intermediate: int, act: str, shard: Shard) -> nn.Module:
    return SwiGLUExperts(pool.num_experts, hidden, expert_hidden(intermediate, pool.width), act, shard)


def _evidence(pool, moe, hidden: int, intermediate: int, act: str, shard: Shard) -> nn.Module:
    ev = moe.evidence
    return EvidenceExperts(pool.num_experts, hidden, expert_hidden(intermediate, pool.width), act,
                           num_heads=ev.num_heads, alpha_init=ev.alpha_init, shard=shard, form=ev.form, score=ev.score)


def _hyperbolic(pool, moe, hidden: int, intermediate: int, act: str, shard: Shard) -> nn.Module:
    hyp = moe.hyperbolic
    kwargs = {"init_scale": hyp.init_scale} if hyp.init_scale > 0 else {}
    return HyperbolicExperts(pool.num_experts, hidden, expert_hidden(intermediate, pool.width), act,
                             geometry=hyp.geometry,
                             curvature_init=hyp.curvature_init, curvature_min=hyp.curvature_min,
                             curvature_max=hyp.curvature_max, learn_curvature=hyp.learn_curvature, shard=shard,
                             **kwargs)


# Expert types a pool can hold, by the name used in config (model.moe.pools.*.expert): builders from
# (pool config, MoE config, hidden size, FFN size, activation, shard).
EXPERT_TYPES = {"ffn": _ffn, "evidence": _evidence, "hyperbolic": _hyperbolic}
assert tuple(EXPERT_TYPES) == EXPERT_TYPE_NAMES, "config.names.EXPERT_TYPES and this registry must list the same types"


def build_pool(pool, moe, hidden: int, intermediate: int, act: str, shard: Shard = WHOLE) -> nn.Module:
    """The expert pool of one pool config; ``shard`` says which of its experts this process holds. Its expert
    matmuls run as ``moe.expert_compute`` says (grouped GEMMs or the per-expert loop)."""
    if pool.expert not in EXPERT_TYPES:
        raise ValueError(f"unknown expert type {pool.expert!r}; expected one of {sorted(EXPERT_TYPES)}")
    module = EXPERT_TYPES[pool.expert](pool, moe, hidden, intermediate, act, shard)
    set_expert_compute(module, moe.expert_compute)
    return module


def set_expert_compute(module: nn.Module, mode: str) -> None:
    """Set how every expert pool under ``module`` runs its expert matmuls (``moe.grouped.COMPUTE_MODES``)."""
    for sub in module.modules():
        if hasattr(sub, "compute"):
            sub.compute = mode
