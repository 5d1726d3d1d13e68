"""Config of the MoE block (``model.moe``): expert pools, routers with their reach, the hyperbolic and
evidence-priority experts. Part of :class:`asymoe_train.config.schema.ModelConfig`; the string choices are StrEnums of
:mod:`asymoe_train.config.names`, and :mod:`asymoe_train.config.validate_moe` checks the cross-field rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from asymoe_train.config.names import (
    ConeForm,
    ConeParent,
    EvidenceForm,
    EvidenceLossKind,
    EvidenceScore,
    ExpertCompute,
    ExpertType,
    HyperbolicGeometry,
    Modality,
    MoEBackend,
)


@dataclass(kw_only=True)
class PoolConfig:
    """A pool of experts of one type inside every MoE slot."""

    name: str = MISSING
    expert: ExpertType = ExpertType.ffn
    num_experts: int = MISSING
    width: float = 1.0  # hidden width of each expert (its FFN; the memory branch of evidence experts) in multiples of
    # the dense FFN's: a whole number w >= 1, or 1/S (0.5, 0.25, ...) for fine-grained experts. Upcycling a wider
    # expert repeats the FFN's hidden units w times; a 1/S-wide expert takes one of S segments of the FFN's hidden
    # units (expert e takes segment e mod S). Either way the output projection is divided by the width, so a wider
    # expert equals the FFN and the mean of the S segment experts does (moe.experts.copy_mlp)


@dataclass(kw_only=True)
class RouterConfig:
    """A router: which token modalities it serves and which pools it can reach (the reach-table row)."""

    name: str = MISSING
    modalities: list[Modality] = field(default_factory=list)  # subset of [text, image]
    pools: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class HyperbolicConfig:
    """Hyperbolic inter-modality experts (pools with ``expert: hyperbolic``)."""

    geometry: HyperbolicGeometry = HyperbolicGeometry.lorentz  # lorentz (hyperboloid) | poincare (ball)
    init_scale: float = 0.0  # learnable pre-scale before the exp map; 0 = the expert module's default
    curvature_init: float = 1.0  # c of the curvature -c, learnable per layer (stored as log c)
    curvature_min: float = 0.1
    curvature_max: float = 10.0
    learn_curvature: bool = True  # false: c stays at curvature_init (a buffer, not a parameter; the paper fixes 1)
    cone_parent: ConeParent = ConeParent.vision  # entailment cone of L_order: whose pooled point is the parent (vision | text)
    cone_aperture: float = 0.1  # the aperture constant K of either cone form
    # L_order's cone: meru (half-aperture asin(2K / (sqrt(c)|x|)), MERU's exterior angle) | paper (AsyMoE 2026,
    # eqs. 15-17: psi(v) = asin(2K / (1 + K c|v|^2)), xi(v, t) = acos(<v, t>_L / (|v| |t|)), |.| the norm of the
    # space coordinates)
    cone_form: ConeForm = ConeForm.meru


@dataclass(kw_only=True)
class EvidenceConfig:
    """Evidence-priority language experts (pools with ``expert: evidence``)."""

    layers: Any = "all"  # MoE layers that carry EP experts: all | deep_half | "1,3" | [1, 3] (resolve: a list)
    num_heads: int = 4  # heads of the evidence cross-attention
    # How an EP expert fuses its branches: additive = FFN(h) + alpha * W_o Attn(h, c),
    # one learnable alpha per expert, W_o zero at init | paper = alpha(h) * FFN(h) + (1 - alpha(h)) * FFN_evd([h;
    # Attn(h, c)]) (AsyMoE 2026, eqs. 7-9), a per-token gate alpha(h) = sigmoid(w_a . h + b_a) and an evidence FFN of
    # the backbone's MLP form over the concatenation, upcycled with the dense FFN on the h half and zeros on the
    # context half, so a fresh expert equals the FFN whatever alpha is
    form: EvidenceForm = EvidenceForm.additive
    alpha_init: float = 0.5  # initial gate alpha: sigmoid(a) (additive), sigmoid(b_a) with w_a = 0 (paper)
    # The evidence score s_evd: attention_mass = the head-averaged attention mass on
    # context (a read-out, detached from routing) | learned = sigmoid(w_evd . Attn(h, c)) (AsyMoE 2026, eq. 20; w_evd
    # starts at zero, trained through the text router)
    score: EvidenceScore = EvidenceScore.attention_mass
    beta: float = 1.0  # weight of the evidence score s_evd added to the EP experts' router logits
    # L_evd: routing (BCE of EP routed mass vs s_evd) | counterfactual | none (no L_evd whatever the stages'
    # losses.evd: the paper's loss, eq. 21, L_lm + l1 L_order + l2 L_balance)
    loss_kind: EvidenceLossKind = EvidenceLossKind.routing
    counterfactual_every: int = 10  # counterfactual L_evd: every N optimizer steps
    counterfactual_margin: float = 1.0  # hinge margin on the answer log-likelihood gap (real vs masked image)


@dataclass(kw_only=True)
class MoEConfig:
    """The parameterised MoE block that replaces the FFN in MoE layers (variants are settings of this one block)."""

    variant: str = "dense"  # name shown in logs; the behaviour comes from pools and routers
    layers: Any = "odd"  # odd | even | all | 0-based indices "1,3" or [1, 3]; config.derive.resolve makes it a list
    top_k: int = 2  # experts per token (renormalised top-k over the router's reachable experts)
    pools: list[PoolConfig] = field(default_factory=list)  # empty = dense: FFN slots stay the backbone's MLP
    routers: list[RouterConfig] = field(default_factory=list)
    router_init_std: float = 0.02  # routers start N(0, std); 0 = zeros (uniform routing at start)
    upcycle_noise_std: float = 0.0  # relative noise added to upcycled expert weights (0 = exact copies)
    hyperbolic: HyperbolicConfig = field(default_factory=HyperbolicConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    # native: this block with dropless dispatch (local, or all-to-all under expert parallelism) | deepspeed:
    # DeepSpeed's deepspeed.moe.layer.MoE (vanilla variant only, top_k >= 2, drop_tokens=False), for comparison
    backend: MoEBackend = MoEBackend.native
    # How expert pools run their per-expert matmuls (config.names.EXPERT_COMPUTE_MODES): auto (one torch._grouped_mm per matmul for bf16 on CUDA, with
    # the token counts kept on the device; the per-expert loop otherwise) | grouped (the grouped kernel wherever its
    # operands allow it, fp32 and CPU included) | loop (one matmul per expert, the reference). Same numbers either
    # way, to rounding.
    expert_compute: ExpertCompute = ExpertCompute.auto
