"""DeepSpeed's native MoE layer (``deepspeed.moe.layer.MoE``, what MoE-LLaVA trains with) as a benchmark baseline for
the vanilla block: the same experts and the same router weights, with DeepSpeed's capacity-based token dropping.

The layer comes from the repo's ``model.moe.backend=deepspeed`` block (``DeepSpeedMoEBlock``: ep_size 1, top-k 2,
``use_rts=False`` and no noisy second-expert sampling, so routing is deterministic; its gate reads the router's weight
and its experts are the block's stacked SwiGLU pool) with the vanilla block's state loaded, so it routes every token
to the experts our router picks. That backend is dropless, because per-rank capacities crash expert parallelism
(DeepSpeed issue 6809); one process cannot hit that, so here the gate gets DeepSpeed's defaults back: a capacity of
``ceil(T / E * capacity_factor * k)`` assignments per expert and ``drop_tokens=True``. What still differs from our block
once the routes agree: DeepSpeed drops the assignments over capacity (all first choices are placed before any second
choice, each in token order), renormalises a token's gate weights over the experts it kept (a token that lost one
expert gets weight 1 on the other), runs its experts on the whole padded [E, C, D] buffer, and its balance loss is its
own (top-1 fractions; no z-loss).

# T tokens, D model dim, K top-k, E experts
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asymoe_train.config.schema import EngineConfig
from asymoe_train.moe.block import MoEBlock


def init_single_process() -> str:
    """The 1-process gloo group DeepSpeed's MoE layer needs (the trainer's own initialisation); DeepSpeed's version."""
    import deepspeed

    from asymoe_train.distributed.engine import init_distributed

    init_distributed(EngineConfig())
    return deepspeed.__version__


def deepspeed_twin(vanilla: MoEBlock, hidden: int, intermediate: int, capacity_factor: float) -> MoEBlock:
    """``vanilla``'s weights in DeepSpeed's MoE layer, dropping assignments over ``capacity_factor`` (module doc)."""
    from asymoe_train.distributed.deepspeed_moe import DeepSpeedMoEBlock

    block = DeepSpeedMoEBlock(vanilla.cfg, hidden, intermediate, "silu")
    block.load_state_dict(vanilla.state_dict())  # the gate's weight is the router's parameter: it follows
    gate = block.deepspeed_moe.deepspeed_moe.gate
    gate.capacity_factor = gate.eval_capacity_factor = capacity_factor
    gate.drop_tokens = True
    return block


@dataclass
class Drops:
    """What capacity dropped, as fractions: of the T x K assignments, and of the tokens that lost all K experts."""

    assignments: float
    tokens_all: float

    def __str__(self) -> str:
        return f"{100 * self.assignments:.2f} % ({100 * self.tokens_all:.2f} %)"


def native_drops(block: MoEBlock, x_TD: torch.Tensor, modality_T: torch.Tensor, ctx=None) -> Drops:
    """Our block's drops, from its routing statistics: the assignments it dispatched (``expert_counts``) against the
    K that each token its routers served asked for (tokens that lost all K: 0 when nothing was dropped, else
    unknown from counts)."""
    with torch.no_grad():
        out = block(x_TD, modality_T, ctx)
    asked = sum(out.router_tokens.values()) * block.top_k
    dispatched = sum(int(c.sum()) for c in out.expert_counts.values())
    return Drops(assignments=1 - dispatched / asked, tokens_all=0.0 if dispatched == asked else float("nan"))


def deepspeed_drops(block: MoEBlock, vanilla: MoEBlock, x_TD: torch.Tensor, modality_T: torch.Tensor) -> Drops:
    """Measure what DeepSpeed's gate drops on these tokens, and check it routes as ``vanilla`` does: every route it
    keeps names the expert our router chose for that token and rank, and the tokens that kept all their routes get
    our block's output. Raises RuntimeError otherwise (the rows would not compare like with like)."""
    (router,) = vanilla.routers.values()
    with torch.no_grad():
        # sparse routes: expert per (rank, token), -1 where the capacity dropped it
        expert_KT = block.deepspeed_moe.deepspeed_moe.gate(x_TD, None, True)[3].long()
        ours_KT = router(x_TD).experts_NK.T
        kept_KT = expert_KT >= 0
        if not torch.equal(expert_KT[kept_KT], ours_KT[kept_KT]):
            raise RuntimeError("DeepSpeed's gate routes differently from the vanilla router")
        whole_T = kept_KT.all(dim=0)
        y_TD = block(x_TD, modality_T).hidden_TD[whole_T]
        ref_TD = vanilla(x_TD, modality_T).hidden_TD[whole_T]
        err = float((y_TD - ref_TD).abs().max()) if whole_T.any() else 0.0
        if err > 1e-4 * float(ref_TD.abs().max()) + 1e-6:
            raise RuntimeError(f"DeepSpeed's output differs from the vanilla block's on undropped tokens by {err:.2e}")
    return Drops(assignments=1 - float(kept_KT.float().mean()), tokens_all=float((~kept_KT).all(dim=0).float().mean()))
