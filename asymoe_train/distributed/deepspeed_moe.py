"""``model.moe.backend=deepspeed``: the vanilla variant on DeepSpeed's own MoE layer (``deepspeed.moe.layer.MoE``, the
layer MoE-LLaVA uses), kept for comparison with the native dropless block.

DeepSpeed's gate, capacity computation and padded all-to-all do the work; the weights are the native block's: the
gate reads the router's weight and the layer's experts are the block's stacked SwiGLU pool. So upcycling, parameter
names, trainable groups, expert parallelism (the same ``ep_size_S`` groups) and checkpoints are the native vanilla
block's, and a checkpoint of either backend loads into the other (evaluation and export read it with the native one).

Configured so uneven token counts cannot crash it (with token dropping, capacities computed per rank give the ranks
different all-to-all buffers: DeepSpeed issue 6809, a gloo abort on CPU, a hang under NCCL): no token dropping (the
capacity is the most assignments any expert gets on any rank of the group, all-reduced), top-k >= 2
(validated), and no noisy second-expert sampling, so training and evaluation route like the native router. Pad tokens
are routed by DeepSpeed's gate (it takes no mask for k >= 2) and cost capacity, but their outputs are zeroed, so they
send no gradient to the experts; its balance loss is DeepSpeed's (over all tokens, pads included), and per rank: it
returns no router statistics, so unlike the native block's it is not formed over the global batch of all ranks.

# T tokens, D model dim, S expert-parallel size, L experts held here, C capacity per expert
"""

from __future__ import annotations

import torch
from torch import nn

from asymoe_train.moe.block import MoEBlock, MoEOutput
from asymoe_train.moe.evidence import TokenContext


class _StackedExperts(nn.Module):
    """DeepSpeed's expert-container interface (``[S, L, C, D]`` in and out) over a stacked pool of L experts."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.__dict__["pool"] = pool  # a reference, not a submodule: the block owns (and names) the pool

    def forward(self, x_SLCD: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.pool.expert(e, x_SLCD[:, e]) for e in range(x_SLCD.shape[1])], dim=1)


class DeepSpeedMoEBlock(MoEBlock):
    """The vanilla MoE block computed by ``deepspeed.moe.layer.MoE`` (module doc). Needs a process group."""

    def __init__(self, cfg, hidden_size: int, intermediate_size: int, act: str, dispatcher=None,
                 skip_pools: tuple[str, ...] = ()):
        super().__init__(cfg, hidden_size, intermediate_size, act, dispatcher, skip_pools)
        from deepspeed.moe.layer import MoE

        if len(self.pools) != 1 or len(self.routers) != 1 or cfg.top_k < 2:
            raise ValueError("model.moe.backend=deepspeed needs the vanilla variant (one pool, one router) and "
                             "top_k >= 2")
        (pool,) = self.pools.values()
        (router,) = self.routers.values()
        moe = MoE(hidden_size, nn.Identity(), num_experts=self.num_experts, ep_size=self.ep_size, k=cfg.top_k,
                  capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False, use_rts=False,
                  top2_2nd_expert_sampling=False)
        moe.deepspeed_moe.experts = _StackedExperts(pool)
        moe.deepspeed_moe.gate.wg.weight = router.weight_RD  # [E, D], as nn.Linear(D, E) holds it
        moe.set_deepspeed_parallelism()  # attaches the ep_size_S group (created here if it does not exist yet)
        self.__dict__["deepspeed_moe"] = moe  # not a submodule: its parameters are the pool's and the router's

    def forward(self, x_TD: torch.Tensor, modality_T: torch.Tensor, ctx: TokenContext | None = None) -> MoEOutput:
        (name,) = self.routers
        keep_T = torch.isin(modality_T, getattr(self, f"codes_{name}"))
        y_TD, balance, counts_E = self.deepspeed_moe(x_TD)
        out = MoEOutput(hidden_TD=y_TD * keep_T.unsqueeze(-1).to(y_TD.dtype))
        if "balance" in self.active_losses:
            out.losses["balance"] = balance
        out.expert_counts[name] = counts_E.detach().long()
        out.router_tokens[name] = keep_T.sum()
        return out


def moe_block_type(backend: str) -> type[MoEBlock]:
    """The block class a model upcycles into for ``model.moe.backend``."""
    return {"native": MoEBlock, "deepspeed": DeepSpeedMoEBlock}[backend]
