"""Per-layer, per-router (= per-modality group) expert load from the MoE blocks' returned statistics."""

from __future__ import annotations

import torch

from asymoe_train.moe.block import MoEOutput


class ExpertLoad:
    """Accumulates expert assignment counts between log steps."""

    def __init__(self):
        self.counts: dict[tuple[int, str], torch.Tensor] = {}
        self.stat_sums: dict[str, torch.Tensor] = {}  # device tensors until ``metrics`` reads them
        self.stat_counts: dict[str, int] = {}

    def add(self, moe: dict[int, MoEOutput]) -> None:
        for layer, out in moe.items():
            for name, value in out.stats.items():
                key = f"moe/L{layer}/{name}"
                self.stat_sums[key] = self.stat_sums[key] + value if key in self.stat_sums else value.detach().clone()
                self.stat_counts[key] = self.stat_counts.get(key, 0) + 1
            for router, counts in out.expert_counts.items():
                key = (layer, router)
                self.counts[key] = self.counts[key] + counts if key in self.counts else counts.clone()

    def metrics(self) -> dict[str, float]:
        """``moe/L{layer}/{router}/e{i}`` token share, max/mean load and dead experts per layer and router, and the
        blocks' scalar statistics (curvature, gate alpha, mean s_evd, EP share) averaged since the last call."""
        metrics: dict[str, float] = {k: float(v) / self.stat_counts[k] for k, v in self.stat_sums.items()}
        self.stat_sums.clear()
        self.stat_counts.clear()
        for (layer, router), counts in sorted(self.counts.items()):
            total = counts.sum().item()
            if not total:
                continue
            share = counts.float() / total
            prefix = f"moe/L{layer}/{router}"
            for i, value in enumerate(share.tolist()):
                metrics[f"{prefix}/e{i}"] = value
            metrics[f"{prefix}/max_over_mean"] = float(share.max() * len(share))
            metrics[f"{prefix}/dead"] = int((counts == 0).sum())
        self.counts.clear()
        return metrics
