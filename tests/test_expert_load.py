"""Expert-load logging (observability/moe_metrics.py): counts summed over data-parallel ranks before they are logged,
and experts that stay without tokens reported after ``logger.dead_expert_steps`` log steps."""

from __future__ import annotations

import datetime
import logging
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asymoe_train.moe.block import MoEOutput
from asymoe_train.observability.moe_metrics import ExpertLoad


def output(counts: list[int], curvature: float = 1.0) -> dict[int, MoEOutput]:
    out = MoEOutput(hidden_TD=torch.zeros(1, 1))
    out.expert_counts["text"] = torch.tensor(counts)
    out.stats["hyperbolic/curvature"] = torch.tensor(curvature)
    return {1: out}


def test_dead_experts_are_reported_after_their_streak(caplog):
    load = ExpertLoad(dead_expert_steps=3)
    seen = []
    with caplog.at_level(logging.WARNING, logger="asymoe_train.observability.moe_metrics"):
        for step in range(5):
            load.add(output([4, 0, 2] if step < 4 else [4, 1, 2]))
            load.add(output([3, 0, 0], curvature=3.0))
            seen.append(load.metrics())
    assert [m["moe/dead_streak"] for m in seen] == [0, 0, 1, 1, 0]  # e1: idle 3 and 4 log steps, then it got tokens
    assert seen[0]["moe/L1/text/e0"] == pytest.approx(7 / 9) and seen[0]["moe/L1/text/dead"] == 1
    assert seen[0]["moe/L1/hyperbolic/curvature"] == 2.0  # averaged over the calls since the last log step
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "layer 1, router 'text': expert e1 has received no tokens for 3 log steps" in warnings[0]
    assert "moe/dead_streak" not in ExpertLoad().metrics()  # 0: never
    assert ExpertLoad(dead_expert_steps=3).metrics() == {}  # a dense model logs no MoE metrics


def _rank(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        load = ExpertLoad(dead_expert_steps=1, world_size=2, rank=rank)
        load.add(output([5, 0, 0] if rank == 0 else [0, 0, 3]))
        results[rank] = load.metrics()
    finally:
        dist.destroy_process_group()


def test_expert_load_is_summed_over_ranks():
    """Rank 0 sends every token to e0, rank 1 to e2: the logged shares are the global ones on both ranks, and only
    e1 (idle on both) counts as dead."""
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        context = mp.start_processes(_rank, args=(os.path.join(tmp, "init"), results), nprocs=2, join=False,
                                     start_method="fork")
        for process in context.processes:
            process.join(60)
        alive = [p for p in context.processes if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive and all(p.exitcode == 0 for p in context.processes)
        for rank in (0, 1):
            m = results[rank]
            assert (m["moe/L1/text/e0"], m["moe/L1/text/e1"], m["moe/L1/text/e2"]) == pytest.approx((5 / 8, 0.0, 3 / 8))
            assert m["moe/L1/text/dead"] == 1 and m["moe/dead_streak"] == 1
