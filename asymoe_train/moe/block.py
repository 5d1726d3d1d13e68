"""The one parameterised MoE block: expert pools plus routers with a reach-table, all from config.

Variants (vanilla, modality, moiie, ...) are settings of this block, never subclasses. Each router serves the tokens of
its modalities and chooses top-k among the experts of the pools it reaches; all assignments go through one dispatcher.

# T tokens (flattened batch), D model dim, N tokens of one router, K top-k, E experts in the block
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from asymoe_train.config.schema import MoEConfig
from asymoe_train.modality import CODES
from asymoe_train.moe.dispatch import LocalDispatcher
from asymoe_train.moe.experts import EXPERT_TYPES
from asymoe_train.moe.router import TopKRouter, balance_loss, z_loss


@dataclass
class MoEOutput:
    """What the block returns: the output, its auxiliary losses and routing statistics (all values, no globals)."""

    hidden_TD: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # 'balance' (sum over routers), 'z'
    # router name -> assignments per reachable expert (detached, long), and tokens the router served
    expert_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    router_tokens: dict[str, int] = field(default_factory=dict)


class MoEBlock(nn.Module):
    """Pools of experts and routers over them; replaces the FFN of one decoder layer."""

    def __init__(self, cfg: MoEConfig, hidden_size: int, intermediate_size: int, act: str, dispatcher=None):
        super().__init__()
        self.top_k = cfg.top_k
        self.dispatcher = dispatcher or LocalDispatcher()
        self.pools = nn.ModuleDict()
        self.pool_offsets: dict[str, int] = {}
        offset = 0
        for pool in cfg.pools:
            self.pools[pool.name] = EXPERT_TYPES[pool.expert](pool.num_experts, hidden_size, intermediate_size, act)
            self.pool_offsets[pool.name] = offset
            offset += pool.num_experts
        self.num_experts = offset
        self.routers = nn.ModuleDict()
        self.router_modalities: dict[str, list[int]] = {}
        for router in cfg.routers:
            # Global expert index of each router-local expert: the reach-table row as a lookup.
            reach = [self.pool_offsets[p] + i for p in router.pools for i in range(self.pools[p].num_experts)]
            self.routers[router.name] = TopKRouter(hidden_size, len(reach), cfg.top_k, cfg.router_init_std)
            self.register_buffer(f"reach_{router.name}", torch.tensor(reach, dtype=torch.long), persistent=False)
            self.router_modalities[router.name] = [CODES[m] for m in router.modalities]

    def reach(self, router: str) -> torch.Tensor:
        """Global expert indices a router can reach, in router-local order."""
        return getattr(self, f"reach_{router}")

    def run_experts(self, x_AD: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """Run every pool on its contiguous slice of expert-sorted tokens."""
        outputs = []
        start = 0
        for name, pool in self.pools.items():
            offset = self.pool_offsets[name]
            counts = counts_E[offset : offset + pool.num_experts]
            num = sum(counts)
            outputs.append(pool(x_AD[start : start + num], counts))
            start += num
        return torch.cat(outputs, dim=0)

    def forward(self, x_TD: torch.Tensor, modality_T: torch.Tensor) -> MoEOutput:
        tokens, experts, weights = [], [], []
        out = MoEOutput(hidden_TD=x_TD)
        balance = x_TD.new_zeros((), dtype=torch.float32)
        zl = x_TD.new_zeros((), dtype=torch.float32)
        for name, router in self.routers.items():
            codes = torch.tensor(self.router_modalities[name], device=modality_T.device)
            token_N = torch.isin(modality_T, codes).nonzero(as_tuple=True)[0]
            routing = router(x_TD[token_N])
            tokens.append(token_N.repeat_interleave(self.top_k))
            experts.append(self.reach(name)[routing.experts_NK.reshape(-1)])
            weights.append(routing.weights_NK.reshape(-1))
            balance = balance + balance_loss(routing)
            zl = zl + z_loss(routing)
            out.expert_counts[name] = torch.bincount(
                routing.experts_NK.reshape(-1), minlength=routing.probs_NR.shape[-1]
            ).detach()
            out.router_tokens[name] = int(token_N.numel())
        out.hidden_TD = self.dispatcher(
            x_TD, torch.cat(tokens), torch.cat(experts), torch.cat(weights), self.num_experts, self.run_experts
        )
        out.losses = {"balance": balance, "z": zl}
        return out

    @classmethod
    def upcycle(cls, mlp: nn.Module, cfg: MoEConfig, hidden_size: int, intermediate_size: int, act: str,
                dispatcher=None, generator: torch.Generator | None = None) -> MoEBlock:
        """A block whose every expert is a copy of ``mlp`` (sparse upcycling), on the MLP's device and dtype."""
        weight = mlp.gate_proj.weight
        block = cls(cfg, hidden_size, intermediate_size, act, dispatcher).to(device=weight.device, dtype=weight.dtype)
        for pool in block.pools.values():
            pool.upcycle_from(mlp, cfg.upcycle_noise_std, generator)
        return block

    def expert_param_count(self) -> tuple[int, int]:
        """(parameters of all experts, parameters of the largest single expert)."""
        total = sum(p.numel() for p in self.pools.parameters())
        largest = max(pool.params_per_expert() for pool in self.pools.values())
        return total, largest
