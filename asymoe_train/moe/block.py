"""The one parameterised MoE block: expert pools plus routers with a reach-table, all from config.

Variants (vanilla, modality, moiie, asymoe, ...) are settings of this block, never subclasses. Each router serves the
tokens of its modalities and chooses top-k among the experts of the pools it reaches; all assignments go through one
dispatcher. Pools that need per-token context (evidence experts) prepare dense results before routing; their evidence
score biases the logits of routers that reach them, and each assignment to one of their experts carries its evidence
row through dispatch.

Expert parallelism: the injected dispatcher says which expert-parallel rank this is (``ep_rank`` of ``ep_size``);
every pool then holds its share of experts, and assignments go to dispatch slots (rank-major, see
``asymoe_train.moe.dispatch``). Routers, reach-tables and losses always see the global experts.

# T tokens (flattened batch), D model dim, N tokens of one router, R experts it reaches, K top-k, E experts in block
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch
from torch import nn

from asymoe_train.config.schema import MoEConfig
from asymoe_train.modality import CODES
from asymoe_train.moe.dispatch import LocalDispatcher
from asymoe_train.moe.evidence import TokenContext
from asymoe_train.moe.experts import Shard, build_pool
from asymoe_train.moe.order import order_loss
from asymoe_train.moe.router import TopKRouter, balance_from_stats, z_loss


@dataclass
class MoEOutput:
    """What the block returns: the output, its auxiliary losses and routing statistics (all values, no globals)."""

    hidden_TD: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # balance (sum over routers), z, evd, order
    # router name -> assignments per reachable expert (detached, long), and tokens the router served
    expert_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    router_tokens: dict[str, int] = field(default_factory=dict)
    # router name -> its probabilities summed over its tokens per reachable expert (fp32, with gradient); set when the
    # balance loss is active. With expert_counts, router_tokens and top_k, the statistics of ``losses["balance"]``, so
    # a trainer can form that loss over the global batch of all data-parallel ranks (``training.losses.total_loss``).
    router_prob_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    top_k: int = 1
    stats: dict[str, float] = field(default_factory=dict)  # scalar observability (curvature, alpha, s_evd, ...)


class MoEBlock(nn.Module):
    """Pools of experts and routers over them; replaces the FFN of one decoder layer."""

    def __init__(self, cfg: MoEConfig, hidden_size: int, intermediate_size: int, act: str, dispatcher=None,
                 skip_pools: tuple[str, ...] = ()):
        super().__init__()
        self.cfg = cfg
        self.top_k = cfg.top_k
        self.name = "moe"  # where this block sits (the model names it); dispatch errors report it
        self.dispatcher = dispatcher or LocalDispatcher()
        self.ep_size = self.dispatcher.ep_size
        shard = Shard(self.dispatcher.ep_rank, self.ep_size)
        self.pools = nn.ModuleDict()
        self.pool_offsets: dict[str, int] = {}  # global index of each pool's first expert
        offset = 0
        for pool in cfg.pools:
            if pool.name in skip_pools:
                continue
            self.pools[pool.name] = build_pool(pool, cfg, hidden_size, intermediate_size, act, shard)
            self.pool_offsets[pool.name] = offset
            offset += pool.num_experts
        self.num_experts = offset  # global
        # Dispatch slot of each global expert: rank-major, then pool by pool (identity without expert parallelism).
        held = sum(p.num_experts for p in self.pools.values())
        slot_E, first_local = [0] * self.num_experts, 0
        for name, pool in self.pools.items():
            for j in range(pool.num_global_experts):
                owner, i = divmod(j, pool.num_experts)
                slot_E[self.pool_offsets[name] + j] = owner * held + first_local + i
            first_local += pool.num_experts
        self.register_buffer("slot_E", torch.tensor(slot_E, dtype=torch.long), persistent=False)
        self.routers = nn.ModuleDict()
        self.router_modalities: dict[str, list[int]] = {}
        self.router_context_pools: dict[str, list[tuple[str, int, int]]] = {}  # (pool, first col, num experts)
        for router in cfg.routers:
            pools = [p for p in router.pools if p in self.pools]
            # Global expert index of each router-local expert: the reach-table row as a lookup.
            reach = [self.pool_offsets[p] + i for p in pools for i in range(self.pools[p].num_global_experts)]
            self.routers[router.name] = TopKRouter(hidden_size, len(reach), cfg.top_k, cfg.router_init_std)
            self.register_buffer(f"reach_{router.name}", torch.tensor(reach, dtype=torch.long), persistent=False)
            self.router_modalities[router.name] = [CODES[m] for m in router.modalities]
            # as a buffer, so forward does not build (and copy to the device) a tensor per router per call
            codes = torch.tensor(self.router_modalities[router.name], dtype=torch.long)
            self.register_buffer(f"codes_{router.name}", codes, persistent=False)
            cols, col = [], 0
            for p in pools:
                if getattr(self.pools[p], "needs_context", False):
                    cols.append((p, col, self.pools[p].num_global_experts))
                col += self.pools[p].num_global_experts
            self.router_context_pools[router.name] = cols
        self.active_losses: set[str] = {"balance", "z", "evd", "order"}  # the trainer drops zero-weight terms

    def reach(self, router: str) -> torch.Tensor:
        """Global expert indices a router can reach, in router-local order."""
        return getattr(self, f"reach_{router}")

    def run_experts(self, x_AD: torch.Tensor, counts_E: list[int], extra_AD: torch.Tensor | None) -> torch.Tensor:
        """Run every pool on its contiguous slice of rows sorted by the experts held here (``counts_E``, pool by
        pool); evidence pools also get each row's evidence output (``extra_AD``)."""
        outputs = []
        start, first = 0, 0
        for pool in self.pools.values():
            counts = counts_E[first : first + pool.num_experts]
            first += pool.num_experts
            rows = slice(start, start + sum(counts))
            if getattr(pool, "needs_context", False):
                outputs.append(pool(x_AD[rows], counts, extra_AD[rows]))
            else:
                outputs.append(pool(x_AD[rows], counts))
            start = rows.stop
        return torch.cat(outputs, dim=0)

    def evidence_rows(self, x_TD: torch.Tensor, token_A: torch.Tensor, expert_A: torch.Tensor,
                      preps: dict) -> torch.Tensor | None:
        """Per assignment, the evidence output of its (global) expert for its token; zero rows for experts of
        other pools. None when no pool needs context."""
        if not preps:
            return None
        extra_AD = x_TD.new_zeros(expert_A.shape[0], x_TD.shape[-1])
        for name, prep in preps.items():
            first = self.pool_offsets[name]
            hit_H = ((expert_A >= first) & (expert_A < first + self.pools[name].num_global_experts)).nonzero()[:, 0]
            rows_HD = prep.evidence_ETD[expert_A[hit_H] - first, token_A[hit_H]]
            extra_AD = extra_AD.index_put((hit_H,), rows_HD.to(extra_AD.dtype))
        return extra_AD

    def forward(self, x_TD: torch.Tensor, modality_T: torch.Tensor, ctx: TokenContext | None = None) -> MoEOutput:
        preps = {}
        for name, pool in self.pools.items():
            if getattr(pool, "needs_context", False):
                if ctx is None:
                    raise ValueError(f"MoE pool {name!r} needs token context (context_BT); the model must pass it")
                preps[name] = pool.prepare(x_TD, ctx)
        tokens, experts, weights = [], [], []
        out = MoEOutput(hidden_TD=x_TD, top_k=self.top_k)
        zero = x_TD.new_zeros((), dtype=torch.float32)
        balance, zl, evd = zero, zero, zero
        for name, router in self.routers.items():
            token_N = torch.isin(modality_T, getattr(self, f"codes_{name}")).nonzero(as_tuple=True)[0]
            bias_NR = None
            context_pools = self.router_context_pools[name]
            if context_pools:
                bias_NR = torch.zeros(token_N.numel(), len(self.reach(name)), device=x_TD.device)
                for pool, col, num in context_pools:
                    # detached: s_evd is a read-out of the evidence attention (trained through the evidence branch),
                    # not something routing losses should reshape
                    score = preps[pool].score_T[token_N, None].detach().float()
                    bias_NR[:, col : col + num] = self.cfg.evidence.beta * score
            routing = router(x_TD[token_N], bias_NR)
            tokens.append(token_N.repeat_interleave(self.top_k))
            experts.append(self.reach(name)[routing.experts_NK.reshape(-1)])
            weights.append(routing.weights_NK.reshape(-1))
            counts_R = torch.bincount(routing.experts_NK.reshape(-1), minlength=routing.probs_NR.shape[-1]).detach()
            out.expert_counts[name] = counts_R
            out.router_tokens[name] = int(token_N.numel())
            if "balance" in self.active_losses:
                prob_sum_R = routing.probs_NR.sum(dim=0)
                out.router_prob_sums[name] = prob_sum_R
                balance = balance + balance_from_stats(counts_R, prob_sum_R, out.router_tokens[name], self.top_k)
            if "z" in self.active_losses:
                zl = zl + z_loss(routing)
            for pool, col, num in context_pools:
                score_N = preps[pool].score_T[token_N]
                mass_N = routing.probs_NR[:, col : col + num].sum(-1)
                if "evd" in self.active_losses and self.cfg.evidence.loss_kind == "routing" and token_N.numel():
                    # tokens that draw on evidence should be routed to evidence experts (target detached)
                    evd = evd + nn.functional.binary_cross_entropy(
                        mass_N.clamp(1e-6, 1 - 1e-6), score_N.detach().float().clamp(0, 1)
                    )
                served = max(int(token_N.numel()), 1)
                out.stats[f"{name}/{pool}_share"] = float(counts_R[col : col + num].sum()) / (served * self.top_k)
                out.stats[f"{name}/s_evd_mean"] = float(score_N.detach().float().sum()) / served
        token_A, expert_A = torch.cat(tokens), torch.cat(experts)
        extra_AD = self.evidence_rows(x_TD, token_A, expert_A, preps)
        slot_A = self.slot_E[expert_A] if self.ep_size > 1 else expert_A
        out.hidden_TD = self.dispatcher(x_TD, token_A, slot_A, torch.cat(weights), self.num_experts,
                                        self.run_experts, extra_AD, where=self.name)
        has_context = any(self.router_context_pools.values())
        computed = {"balance": balance, "z": zl, "evd": evd if has_context and self.cfg.evidence.loss_kind == "routing" else None}
        out.losses = {k: v for k, v in computed.items() if k in self.active_losses and v is not None}
        hyp = self.cfg.hyperbolic
        for name, pool in self.pools.items():
            if hasattr(pool, "curvature"):  # hyperbolic pool
                c = pool.curvature()
                out.stats[f"{name}/curvature"] = float(c.detach())
                if "order" in self.active_losses and ctx is not None:
                    scale = pool.log_scale_E.exp().mean()
                    out.losses["order"] = order_loss(x_TD, ctx, scale, c, hyp.cone_parent, hyp.cone_aperture)
            if hasattr(pool, "alpha_E"):  # evidence pool
                for e, alpha in enumerate(pool.alpha_E.detach().tolist()):
                    out.stats[f"{name}/alpha_e{e}"] = alpha
        return out

    @classmethod
    def upcycle(cls, mlp: nn.Module, cfg: MoEConfig, hidden_size: int, intermediate_size: int, act: str,
                dispatcher=None, generator: torch.Generator | None = None,
                skip_pools: tuple[str, ...] = ()) -> MoEBlock:
        """A block whose every expert is a copy of ``mlp`` (sparse upcycling), on the MLP's device and dtype."""
        weight = next(mlp.parameters())
        block = cls(cfg, hidden_size, intermediate_size, act, dispatcher, skip_pools)
        block = block.to(device=weight.device, dtype=weight.dtype)
        for pool in block.pools.values():
            pool.upcycle_from(mlp, cfg.upcycle_noise_std, generator)
        if generator is not None and cfg.router_init_std > 0:  # routers drawn from the generator, not global RNG
            for router in block.routers.values():
                draw = torch.randn(router.weight_RD.shape, generator=generator, dtype=torch.float32)
                router.weight_RD.data.copy_(draw * cfg.router_init_std)
        return block

    def expert_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters split over expert-parallel ranks (dim 0 = the experts held here), named as in the block."""
        return [(f"pools.{name}.{n}", p) for name, pool in self.pools.items() for n, p in pool.expert_parameters()]

    def expert_param_count(self) -> tuple[int, int]:
        """(parameters of all experts held here, parameters of the largest single expert)."""
        total = sum(p.numel() for p in self.pools.parameters())
        largest = max(pool.params_per_expert() for pool in self.pools.values())
        return total, largest


def compile_block(block: MoEBlock) -> None:
    """``torch.compile`` the dense compute of an MoE block in place (``model.compile_moe``): every expert pool (its
    per-expert FFNs; hyperbolic maps and evidence attention are long chains of element-wise ops that fuse) and every
    router (fp32 logits, softmax, top-k, renormalisation). Routing bookkeeping and dispatch (token selection, sort,
    counts, scatter: data-dependent sizes) stay eager, where tracing them would only break graphs. Shapes are
    dynamic, so the token counts that change every step do not recompile. Parameter names do not change."""
    if next(block.parameters()).device.type != "meta":  # meta: counting parameters, nothing will run
        # Checked now: torch.compile is lazy and would fail at the first step with a long inductor trace.
        compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            raise ValueError("model.compile_moe=true: torch.compile needs a C++ compiler (inductor generates C++ on "
                             "CPU and builds Triton's launchers on GPU), but none of $CXX, c++, g++, clang++ is on "
                             "PATH; install one (e.g. apt-get install g++) or set model.compile_moe=false")
    for module in (*block.pools.values(), *block.routers.values()):
        module.compile(dynamic=True)
