"""The one parameterised MoE block: expert pools plus routers with a reach-table, all from config.

Variants (vanilla, modality, moiie, asymoe, ...) are settings of this block, never subclasses. Each router serves the
tokens of its modalities and chooses top-k among the experts of the pools it reaches; all assignments go through one
dispatcher. Pools that need per-token context (evidence experts) prepare dense results before routing; their evidence
score biases the logits of routers that reach them, and each assignment to one of their experts carries its evidence
row through dispatch.

Host synchronisation: none on a single device. Every router scores every token and keeps the decisions of the
tokens it serves (a router is a D x R matmul: cheap), so the number of assignments is static (tokens x top-k);
counts, statistics and losses stay device tensors (read on log steps). With several pools, each pool gets a static
region of the expert-sorted rows as large as it could need (tokens x min(top-k, its experts)); its grouped matmuls
run only the rows routed to it.

Expert parallelism: the injected dispatcher says which expert-parallel rank this is (``ep_rank`` of ``ep_size``);
every pool then holds its share of experts, and assignments go to dispatch slots (rank-major, see
``asymoe_train.moe.dispatch``). Routers, reach-tables and losses always see the global experts.

# T tokens (flattened batch), D model dim, N tokens of one router, R experts it reaches, K top-k, E experts in block
"""

from __future__ import annotations

import os
import shutil
from typing import NamedTuple

import torch
from torch import nn

from asymoe_train.config.moe_schema import MoEConfig
from asymoe_train.modality import CODES
from asymoe_train.moe.dispatch import LocalDispatcher
from asymoe_train.moe.evidence import TokenContext
from asymoe_train.moe.experts import Shard
from asymoe_train.moe.grouped import count_of, counts_on_device, expert_of_rows
from asymoe_train.moe.order import order_loss
from asymoe_train.moe.pools import build_pool
from asymoe_train.moe.router import TopKRouter, balance_from_stats, z_loss


class _MoEOutputFields(NamedTuple):
    hidden_TD: torch.Tensor
    losses: dict[str, torch.Tensor]
    expert_counts: dict[str, torch.Tensor]
    router_tokens: dict[str, torch.Tensor]
    router_prob_sums: dict[str, torch.Tensor]
    top_k: int
    stats: dict[str, torch.Tensor]


class MoEOutput(_MoEOutputFields):
    """What the block returns: the output, its auxiliary losses and routing statistics (all values, no globals).

    A named tuple, so module hooks that look for a module's output tensors in tuples and dicts see every one of them
    (ZeRO-3 gathers an MoE block's parameters again for the backward pass through hooks on its outputs).

    - ``losses``: balance (sum over routers), z, evd, order;
    - ``expert_counts``, ``router_tokens``: router name -> assignments per reachable expert (detached, long), and
      tokens the router served (0-d tensor);
    - ``router_prob_sums``: router name -> its probabilities summed over its tokens per reachable expert (fp32, with
      gradient); set when the balance loss is active. With expert_counts, router_tokens and top_k, the statistics of
      ``losses["balance"]``, so a trainer can form that loss over the global batch of all data-parallel ranks
      (``training.losses.total_loss``);
    - ``stats``: scalar observability (curvature, alpha, s_evd, ...) as detached 0-d tensors: read on the host on log
      steps only.
    """

    __slots__ = ()

    def __new__(cls, hidden_TD: torch.Tensor, losses: dict | None = None, expert_counts: dict | None = None,
                router_tokens: dict | None = None, router_prob_sums: dict | None = None, top_k: int = 1,
                stats: dict | None = None):
        return super().__new__(cls, hidden_TD, {} if losses is None else losses,
                               {} if expert_counts is None else expert_counts,
                               {} if router_tokens is None else router_tokens,
                               {} if router_prob_sums is None else router_prob_sums, top_k,
                               {} if stats is None else stats)


class MoEBlock(nn.Module):
    """Pools of experts and routers over them; replaces the FFN of one decoder layer."""

    def __init__(self, cfg: MoEConfig, hidden_size: int, intermediate_size: int, act: str, dispatcher=None,
                 skip_pools: tuple[str, ...] = ()):
        super().__init__()
        self.cfg = cfg
        self.top_k = cfg.top_k
        self.name = "moe"  # where this block sits (the model names it); dispatch errors report it
        self.dispatcher = dispatcher or LocalDispatcher()
        self.compute = cfg.expert_compute  # the pools' too; moe.pools.set_expert_compute changes all of them
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
        # Per context pool, the modality codes of the tokens whose routers reach it (static: derived once), as a tuple
        # for the pool's queries and as a buffer for the per-token mask its logged gate averages over.
        self.pool_query_codes: dict[str, tuple[int, ...]] = {}
        for name, pool in self.pools.items():
            if getattr(pool, "needs_context", False):
                codes = sorted({code for router, cols in self.router_context_pools.items()
                                if any(p == name for p, *_ in cols) for code in self.router_modalities[router]})
                self.pool_query_codes[name] = tuple(codes)
                self.register_buffer(f"asks_{name}", torch.tensor(codes, dtype=torch.long), persistent=False)
        self.active_losses: set[str] = {"balance", "z", "evd", "order"}  # the trainer drops zero-weight terms

    def query_codes(self, pool: str) -> tuple[int, ...]:
        """The modality codes of the tokens whose routers reach ``pool`` (a context pool)."""
        return self.pool_query_codes[pool]

    def reach(self, router: str) -> torch.Tensor:
        """Global expert indices a router can reach, in router-local order."""
        return getattr(self, f"reach_{router}")

    def run_experts(self, x_AD: torch.Tensor, counts_E: torch.Tensor | list[int],
                    extra_AD: torch.Tensor | None) -> torch.Tensor:
        """Run every pool on its rows of ``x_AD``, sorted by the experts held here (``counts_E``, pool by pool;
        rows after the last expert's are padding); evidence pools also get each row's evidence output
        (``extra_AD``). Host counts (a list, or pools that read them anyway) slice contiguously; device counts give
        every pool a static region (module doc)."""
        pools = list(self.pools.values())
        sizes = [pool.num_experts for pool in pools]
        host = isinstance(counts_E, list) or not counts_on_device(x_AD, self.compute)
        if host and not isinstance(counts_E, list):
            counts_E = counts_E.tolist()  # once per block: the pools then slice by Python ints
        if len(pools) == 1:
            return self._run_pool(pools[0], x_AD, counts_E, extra_AD)
        if host:
            counts = counts_E
            outputs, start, first = [], 0, 0
            for pool, size in zip(pools, sizes):
                rows = slice(start, start + sum(counts[first : first + size]))
                outputs.append(self._run_pool(pool, x_AD[rows], counts[first : first + size],
                                              None if extra_AD is None else extra_AD[rows]))
                start, first = rows.stop, first + size
            if start < x_AD.shape[0]:
                outputs.append(x_AD.new_zeros(x_AD.shape[0] - start, outputs[0].shape[-1]))
            return torch.cat(outputs, dim=0)
        # Static regions: pool p's rows move to [region_p, region_p + bound_p) of a buffer whose last row is zeros.
        num_rows, tokens = x_AD.shape[0], x_AD.shape[0] // self.top_k
        bounds = [tokens * min(self.top_k, pool.num_global_experts) for pool in pools]
        region_P = torch.tensor([0, *bounds], device=x_AD.device).cumsum(0)
        pool_counts = counts_E.split(sizes)
        rows_P = torch.stack([c.sum() for c in pool_counts])
        pool_A = expert_of_rows(rows_P, num_rows)  # len(pools) for padding rows
        starts_P = torch.cat([rows_P.new_zeros(1), rows_P.cumsum(0)])  # [pools + 1]
        dest_A = region_P[pool_A] + torch.arange(num_rows, device=x_AD.device) - starts_P[pool_A]
        dest_A = torch.where(pool_A < len(pools), dest_A, region_P[-1])  # padding: the zero row
        source_B = torch.full((int(sum(bounds)) + 1,), num_rows, dtype=torch.long, device=x_AD.device)
        source_B = source_B.scatter(0, dest_A, torch.arange(num_rows, device=x_AD.device))
        source_B[-1] = num_rows

        def regions(t_AX: torch.Tensor) -> torch.Tensor:
            return torch.cat([t_AX, t_AX.new_zeros(1, t_AX.shape[-1])])[source_B]

        x_BD = regions(x_AD)
        extra_BD = None if extra_AD is None else regions(extra_AD)
        outputs, at = [], 0
        for pool, bound, counts in zip(pools, bounds, pool_counts):
            part = slice(at, at + bound)
            outputs.append(self._run_pool(pool, x_BD[part], counts, None if extra_BD is None else extra_BD[part]))
            at += bound
        y_BD = torch.cat([*outputs, outputs[0].new_zeros(1, outputs[0].shape[-1])])
        return y_BD[dest_A]

    @staticmethod
    def _run_pool(pool: nn.Module, x_ND: torch.Tensor, counts, extra_ND: torch.Tensor | None) -> torch.Tensor:
        if getattr(pool, "needs_context", False):
            return pool(x_ND, counts, extra_ND)
        return pool(x_ND, counts)

    def evidence_rows(self, x_TD: torch.Tensor, token_A: torch.Tensor, expert_A: torch.Tensor,
                      preps: dict) -> torch.Tensor | None:
        """Per assignment, the evidence output of its (global) expert for its token; zero rows for experts of
        other pools. None when no pool needs context. Gathers for every assignment (static sizes, no host read)."""
        if not preps:
            return None
        extra_AD = None
        for name, prep in preps.items():
            num = self.pools[name].num_global_experts
            local_A = expert_A - self.pool_offsets[name]
            hit_A1 = ((local_A >= 0) & (local_A < num)).unsqueeze(-1)
            rows_AD = prep.evidence_ETD[local_A.clamp(0, num - 1), token_A].to(x_TD.dtype)
            rows_AD = torch.where(hit_A1, rows_AD, 0)
            extra_AD = rows_AD if extra_AD is None else extra_AD + rows_AD
        return extra_AD

    def forward(self, x_TD: torch.Tensor, modality_T: torch.Tensor, ctx: TokenContext | None = None) -> MoEOutput:
        preps = {}
        for name, pool in self.pools.items():
            if getattr(pool, "needs_context", False):
                if ctx is None:
                    raise ValueError(f"MoE pool {name!r} needs token context (context_BT); the model must pass it")
                preps[name] = pool.prepare(x_TD, ctx, self.query_codes(name))
        num_tokens, k = x_TD.shape[0], self.top_k
        # every token starts on the padding slot with weight 0; each router fills in the tokens it serves
        expert_TK = torch.full((num_tokens, k), self.num_experts, dtype=torch.long, device=x_TD.device)
        weight_TK = x_TD.new_zeros((num_tokens, k), dtype=torch.float32)
        out = MoEOutput(hidden_TD=x_TD, top_k=k)
        zero = x_TD.new_zeros((), dtype=torch.float32)
        balance, zl, evd = zero, zero, zero
        for name, router in self.routers.items():
            served_T = torch.isin(modality_T, getattr(self, f"codes_{name}"))
            served_f_T = served_T.float()
            num_served = served_T.sum()
            denom = num_served.clamp_min(1).float()
            bias_TR = None
            context_pools = self.router_context_pools[name]
            if context_pools:
                bias_TR = x_TD.new_zeros((num_tokens, len(self.reach(name))), dtype=torch.float32)
                for pool, col, num in context_pools:
                    # the attention mass is a read-out of the evidence attention (trained through the evidence
                    # branch), detached so routing losses do not reshape it; a learned score (sigmoid(w_evd . Attn))
                    # is trained through the router, its only consumer
                    score_T1 = preps[pool].score_T[:, None].float()
                    if self.cfg.evidence.score != "learned":
                        score_T1 = score_T1.detach()
                    bias_TR[:, col : col + num] = self.cfg.evidence.beta * score_T1
            routing = router(x_TD, bias_TR)
            expert_TK = torch.where(served_T[:, None], self.reach(name)[routing.experts_NK], expert_TK)
            weight_TK = torch.where(served_T[:, None], routing.weights_NK, weight_TK)
            num_reach = routing.probs_NR.shape[-1]
            counts_R = count_of(routing.experts_NK.reshape(-1), num_reach, served_T.repeat_interleave(k)).detach()
            out.expert_counts[name] = counts_R
            out.router_tokens[name] = num_served
            if "balance" in self.active_losses:
                prob_sum_R = (routing.probs_NR * served_f_T[:, None]).sum(dim=0)
                out.router_prob_sums[name] = prob_sum_R
                balance = balance + balance_from_stats(counts_R, prob_sum_R, num_served, k)
            if "z" in self.active_losses:
                zl = zl + z_loss(routing, served_T)
            for pool, col, num in context_pools:
                score_T = preps[pool].score_T
                mass_T = routing.probs_NR[:, col : col + num].sum(-1)
                if "evd" in self.active_losses and self.cfg.evidence.loss_kind == "routing":
                    # tokens that draw on evidence should be routed to evidence experts (target detached)
                    bce_T = nn.functional.binary_cross_entropy(
                        mass_T.clamp(1e-6, 1 - 1e-6), score_T.detach().float().clamp(0, 1), reduction="none")
                    evd = evd + (bce_T * served_f_T).sum() / denom
                out.stats[f"{name}/{pool}_share"] = counts_R[col : col + num].sum() / (denom * k)
                out.stats[f"{name}/s_evd_mean"] = (score_T.detach().float() * served_f_T).sum() / denom
        token_A = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(k)
        expert_A = expert_TK.reshape(-1)
        extra_AD = self.evidence_rows(x_TD, token_A, expert_A, preps)
        if self.ep_size > 1:  # the padding slot (tokens no router serves) stays last
            slot_A = torch.where(expert_A < self.num_experts, self.slot_E[expert_A.clamp_max(self.num_experts - 1)],
                                 self.num_experts)
        else:
            slot_A = expert_A
        hidden_TD = self.dispatcher(x_TD, token_A, slot_A, weight_TK.reshape(-1), self.num_experts,
                                    self.run_experts, extra_AD, where=self.name)
        has_context = any(self.router_context_pools.values())
        computed = {"balance": balance, "z": zl, "evd": evd if has_context and self.cfg.evidence.loss_kind == "routing" else None}
        out = out._replace(hidden_TD=hidden_TD, losses={k: v for k, v in computed.items()
                                                        if k in self.active_losses and v is not None})
        hyp = self.cfg.hyperbolic
        for name, pool in self.pools.items():
            if hasattr(pool, "curvature"):  # hyperbolic pool
                c = pool.curvature()
                out.stats[f"{name}/curvature"] = c.detach()
                if "order" in self.active_losses and ctx is not None:
                    scale = pool.log_scale_E.exp().mean()
                    out.losses["order"] = order_loss(x_TD, ctx, scale, c, hyp.cone_parent, hyp.cone_aperture,
                                                   hyp.cone_form)
            if hasattr(pool, "mean_alpha"):  # evidence pool: its gate (paper form: the mean over its routers' tokens)
                alpha_E = pool.mean_alpha(x_TD, torch.isin(modality_T, getattr(self, f"asks_{name}")))
                for e in range(alpha_E.shape[0]):
                    out.stats[f"{name}/alpha_e{e}"] = alpha_E[e]
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
        """(parameters of all experts held here, expert parameters one token activates at most): for each router,
        its top_k largest reachable experts (pools of unequal widths and types differ in size), the largest such
        sum over routers."""
        total = sum(p.numel() for p in self.pools.parameters())
        sizes = {name: pool.params_per_expert() for name, pool in self.pools.items()}
        per_token = 0
        for router in self.cfg.routers:
            reached = sorted((sizes[name] for name in router.pools if name in sizes
                              for _ in range(self.pools[name].num_global_experts)), reverse=True)
            per_token = max(per_token, sum(reached[: self.top_k]))
        return total, per_token


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
