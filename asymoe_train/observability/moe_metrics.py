"""Per-layer, per-router (= per-modality group) expert load from the MoE blocks' returned statistics.

Counts and statistics stay device tensors between log steps; :meth:`ExpertLoad.metrics` sums the counts over all
data-parallel ranks (one all-reduce; every rank calls it on log steps) and reads everything on the host once.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from asymoe_train.moe.block import MoEOutput

log = logging.getLogger(__name__)


class ExpertLoad:
    """Accumulates expert assignment counts between log steps, and notices experts that stay without tokens for
    ``dead_expert_steps`` consecutive log steps (0 = never): a warning on rank 0, and ``moe/dead_streak``."""

    def __init__(self, dead_expert_steps: int = 0, world_size: int = 1, rank: int = 0):
        self.dead_expert_steps, self.world_size, self.rank = dead_expert_steps, world_size, rank
        self.counts: dict[tuple[int, str], torch.Tensor] = {}
        self.stat_sums: dict[str, torch.Tensor] = {}  # device tensors until ``metrics`` reads them
        self.stat_counts: dict[str, int] = {}
        self.idle_logs: dict[tuple[int, str], torch.Tensor] = {}  # consecutive log steps without tokens, per expert

    def add(self, moe: dict[int, MoEOutput]) -> None:
        for layer, out in moe.items():
            for name, value in out.stats.items():
                key = f"moe/L{layer}/{name}"
                self.stat_sums[key] = self.stat_sums[key] + value if key in self.stat_sums else value.detach().clone()
                self.stat_counts[key] = self.stat_counts.get(key, 0) + 1
            for router, counts in out.expert_counts.items():
                key = (layer, router)
                self.counts[key] = self.counts[key] + counts if key in self.counts else counts.clone()

    def global_counts(self) -> dict[tuple[int, str], torch.Tensor]:
        """The counts since the last log step, summed over all ranks (every rank has the same layers and routers,
        so one all-reduce of their concatenation does it), on the host."""
        keys = sorted(self.counts)
        if not keys:
            return {}
        flat = torch.cat([self.counts[k] for k in keys])
        if self.world_size > 1:
            dist.all_reduce(flat)
        # one copy to the host for all of them
        return dict(zip(keys, flat.cpu().split([len(self.counts[k]) for k in keys]), strict=True))

    def metrics(self) -> dict[str, float]:
        """``moe/L{layer}/{router}/e{i}`` token share (over all ranks), max/mean load and dead experts per layer and
        router, the blocks' scalar statistics (curvature, gate alpha, mean s_evd, EP share; this rank's) averaged
        since the last call, and ``moe/dead_streak``."""
        metrics: dict[str, float] = {k: float(v) / self.stat_counts[k] for k, v in self.stat_sums.items()}
        self.stat_sums.clear()
        self.stat_counts.clear()
        streak = 0
        for (layer, router), counts in sorted(self.global_counts().items()):
            idle = self.idle_logs.get((layer, router), torch.zeros_like(counts))
            idle = torch.where(counts == 0, idle + 1, 0)
            self.idle_logs[layer, router] = idle
            if self.dead_expert_steps:
                streak += int((idle >= self.dead_expert_steps).sum())
                for e in (idle == self.dead_expert_steps).nonzero()[:, 0].tolist():
                    if self.rank == 0:
                        log.warning(f"MoE layer {layer}, router {router!r}: expert e{e} has received no tokens for "
                                    f"{self.dead_expert_steps} log steps; raise the balance loss weight "
                                    "(losses.balance) or the router's init noise if this persists")
            total = counts.sum().item()
            if not total:
                continue
            share = counts.float() / total
            prefix = f"moe/L{layer}/{router}"
            for i, value in enumerate(share.tolist()):
                metrics[f"{prefix}/e{i}"] = value
            metrics[f"{prefix}/max_over_mean"] = float(share.max() * len(share))
            metrics[f"{prefix}/dead"] = int((counts == 0).sum())
        if self.dead_expert_steps and self.idle_logs:  # a model with routers
            metrics["moe/dead_streak"] = streak
        self.counts.clear()
        return metrics
