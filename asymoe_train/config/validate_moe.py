"""Validation of the MoE block's config (``model.moe``: layers, pools and widths, routers and their reach, the
hyperbolic and evidence-priority experts, the DeepSpeed backend). Called by
:func:`asymoe_train.config.validate.validate`."""

from __future__ import annotations

from asymoe_train.config.checks import choice, positive
from asymoe_train.config.derive import evidence_layer_indices, moe_layer_indices, reachable_experts
from asymoe_train.config.errors import ConfigError
from asymoe_train.config.names import (
    CONE_FORMS,
    CONE_PARENTS,
    EVIDENCE_FORMS,
    EVIDENCE_LOSS_KINDS,
    EVIDENCE_SCORES,
    EXPERT_COMPUTE_MODES,
    EXPERT_TYPES,
    HYPERBOLIC_GEOMETRIES,
    MODALITIES,
    MOE_BACKENDS,
)
from asymoe_train.config.schema import TrainConfig


def validate_moe(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the key and the fix."""
    lm, moe = cfg.model.lm, cfg.model.moe
    try:
        moe_layer_indices(moe.layers, lm.num_layers)
    except ValueError as exn:
        raise ConfigError(str(exn)) from None
    choice("model.moe.backend", moe.backend, MOE_BACKENDS)
    choice("model.moe.expert_compute", moe.expert_compute, EXPERT_COMPUTE_MODES)
    if not moe.pools:
        if moe.routers:
            raise ConfigError("model.moe.routers is set but model.moe.pools is empty; a dense model has neither")
        return
    positive("model.moe.top_k", moe.top_k)
    pool_names = [p.name for p in moe.pools]
    if len(set(pool_names)) != len(pool_names):
        raise ConfigError(f"model.moe.pools has duplicate names {pool_names}")
    for i, pool in enumerate(moe.pools):
        choice(f"model.moe.pools.{i}.expert", pool.expert, EXPERT_TYPES)
        positive(f"model.moe.pools.{i}.num_experts", pool.num_experts)
        validate_width(f"model.moe.pools.{i}.width", pool.width, cfg.model.lm.intermediate_size)
        if pool.num_experts % cfg.engine.ep_size:
            raise ConfigError(
                f"model.moe.pools.{i}.num_experts={pool.num_experts} ({pool.name}) is not divisible by "
                f"engine.ep_size={cfg.engine.ep_size}; make every pool a multiple of the expert-parallel size"
            )
    if not moe.routers:
        raise ConfigError("model.moe.pools is set but model.moe.routers is empty; add a router that reaches the pools")
    served: dict[str, str] = {}
    reached: set[str] = set()
    for i, router in enumerate(moe.routers):
        for modality in router.modalities:
            choice(f"model.moe.routers.{i}.modalities", modality, MODALITIES)
            if modality in served:
                raise ConfigError(
                    f"model.moe.routers.{i}.modalities: {modality!r} tokens are already routed by router "
                    f"{served[modality]!r}; each modality has exactly one router"
                )
            served[modality] = router.name
        for pool in router.pools:
            choice(f"model.moe.routers.{i}.pools", pool, pool_names)
            reached.add(pool)
    missing = [m for m in MODALITIES if m not in served]
    if missing:
        raise ConfigError(f"model.moe.routers: no router serves {missing} tokens; add them to a router's modalities")
    unreached = [p for p in pool_names if p not in reached]
    if unreached:
        raise ConfigError(f"model.moe.pools {unreached} are reached by no router; add them to a router's pools")
    kinds = {p.expert for p in moe.pools}
    if "hyperbolic" in kinds:
        hyp = moe.hyperbolic
        choice("model.moe.hyperbolic.geometry", hyp.geometry, HYPERBOLIC_GEOMETRIES)
        choice("model.moe.hyperbolic.cone_parent", hyp.cone_parent, CONE_PARENTS)
        choice("model.moe.hyperbolic.cone_form", hyp.cone_form, CONE_FORMS)
        if not 0 < hyp.curvature_min <= hyp.curvature_init <= hyp.curvature_max:
            raise ConfigError(
                "model.moe.hyperbolic: need 0 < curvature_min <= curvature_init <= curvature_max, got "
                f"{hyp.curvature_min}, {hyp.curvature_init}, {hyp.curvature_max}"
            )
    if "evidence" in kinds:
        ev = moe.evidence
        choice("model.moe.evidence.loss_kind", ev.loss_kind, EVIDENCE_LOSS_KINDS)
        choice("model.moe.evidence.form", ev.form, EVIDENCE_FORMS)
        choice("model.moe.evidence.score", ev.score, EVIDENCE_SCORES)
        positive("model.moe.evidence.counterfactual_every", ev.counterfactual_every)
        if lm.hidden_size % ev.num_heads:
            raise ConfigError(
                f"model.moe.evidence.num_heads={ev.num_heads} does not divide model.lm.hidden_size={lm.hidden_size}"
            )
        if not 0 < ev.alpha_init < 1:
            raise ConfigError(f"model.moe.evidence.alpha_init={ev.alpha_init} must be in (0, 1)")
        try:
            evidence_layer_indices(ev.layers, moe_layer_indices(moe.layers, lm.num_layers))
        except ValueError as exn:
            raise ConfigError(str(exn)) from None
    for name, num in reachable_experts(moe).items():
        if moe.top_k > num:
            raise ConfigError(
                f"model.moe.top_k={moe.top_k} exceeds the {num} experts router {name!r} can reach; "
                f"lower top_k or enlarge its pools"
            )
    if moe.backend == "deepspeed" and cfg.model.compile_moe:
        raise ConfigError("model.compile_moe=true compiles the native block's pools, which DeepSpeed's MoE layer "
                          "(model.moe.backend=deepspeed) does not call; set model.compile_moe=false or "
                          "model.moe.backend=native")
    if moe.backend == "deepspeed" and cfg.engine.zero_stage == 3:
        raise ConfigError("model.moe.backend=deepspeed with engine.zero_stage=3: DeepSpeed's MoE layer refuses "
                          "ZeRO-3; set model.moe.backend=native (the native block trains under ZeRO-3) or "
                          "engine.zero_stage=2")
    if moe.backend == "deepspeed":
        vanilla = (len(moe.pools) == 1 and moe.pools[0].expert == "ffn" and moe.pools[0].width == 1
                   and len(moe.routers) == 1 and set(moe.routers[0].modalities) == set(MODALITIES))
        if not vanilla:
            raise ConfigError(
                f"model.moe.backend=deepspeed: DeepSpeed's MoE layer holds one pool of ffn experts (width 1) behind "
                f"one router for all tokens, the vanilla variant, not {moe.variant!r}; use model/moe=vanilla or "
                "model.moe.backend=native"
            )
        if moe.top_k < 2:
            raise ConfigError(
                f"model.moe.top_k={moe.top_k} with model.moe.backend=deepspeed: DeepSpeed's top-1 gate caps the "
                "expert capacity by each rank's own token count, so uneven token counts give the ranks different "
                "all-to-all buffers and crash the job; use top_k >= 2 or model.moe.backend=native"
            )


def validate_width(key: str, width: float, intermediate_size: int) -> None:
    """An expert width: a whole multiple of the dense FFN, or one of S equal segments of its hidden units."""
    positive(key, width)
    segments = 1 / width
    if width >= 1 and float(width).is_integer():
        return
    if width < 1 and abs(segments - round(segments)) < 1e-9:
        if intermediate_size and intermediate_size % round(segments):
            raise ConfigError(f"{key}={width}: the FFN's {intermediate_size} hidden units (model.lm.intermediate_size) "
                              f"do not split into {round(segments)} equal segments; choose a width 1/S with S dividing "
                              "them")
        return
    raise ConfigError(f"{key}={width}: expert widths are whole multiples of the FFN (1, 2, ...) or fine-grained "
                      "segments 1/S of it (0.5, 0.25, 0.125, ...)")
