"""The block benchmark (benchmarks/moe_block.py): its model FLOPs are the block's maths, and a bf16 run writes a
complete table with MFU (the path ``make bench`` takes on a GPU, here on CPU at tiny shapes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import moe_block  # noqa: E402

from asymoe_train.moe.block import MoEBlock  # noqa: E402
from asymoe_train.moe.evidence import TokenContext  # noqa: E402
from asymoe_train.observability.flops import count_flops  # noqa: E402


def test_block_flops_are_router_plus_top_k_experts_and_dense_matches_without_router():
    tokens, hidden, intermediate = 256, 32, 96
    cfg = moe_block.variant_config("vanilla", num_experts=4)
    mlp = moe_block.Dense(hidden, intermediate).mlp
    block = moe_block.Block(MoEBlock.upcycle(mlp, cfg, hidden, intermediate, "silu"))
    modality_BL, context_BL = moe_block.token_layout(tokens, 64)
    x = torch.randn(tokens, hidden)
    ctx = TokenContext(tuple(modality_BL.shape), context_BL, modality_BL)
    expert = 3 * 2 * hidden * intermediate  # gate, up and down projections of one token
    assert count_flops(block, x, modality_BL.reshape(-1), ctx) == tokens * (2 * hidden * 4 + cfg.top_k * expert)
    dense = moe_block.Dense(hidden, intermediate * cfg.top_k)
    assert count_flops(dense, x, modality_BL.reshape(-1), ctx) == tokens * cfg.top_k * expert


def test_bf16_block_benchmark_writes_every_row_with_its_mfu(tmp_path):
    out = tmp_path / "bench.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "moe_block.py"), "--tokens", "256", "--hidden", "32",
           "--seq-len", "64", "--variants", "vanilla,asymoe", "--dtype", "bf16", "--peak-tflops", "0.001",
           "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert "top-2, bf16, CPU" in table
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"vanilla", "asymoe", moe_block.NAIVE, moe_block.DENSE}
    for name in ("vanilla", "asymoe", moe_block.NAIVE, moe_block.DENSE):
        ms, gflops_mfu = float(rows[name][4]), rows[name][7]
        gflops, mfu = re.fullmatch(r"([\d.,]+) \(([\d.,]+) %\)", gflops_mfu).groups()
        assert rows[name][8] == "- |"  # peak GPU memory: none on CPU
        gflops, mfu = float(gflops.replace(",", "")), float(mfu.replace(",", ""))
        assert ms > 0 and gflops > 0
        # MFU is the model FLOP/s over --peak-tflops (1 GFLOP/s here), each rounded to 0.1 in the table
        assert abs(mfu / 100 - gflops) <= 0.05 + 1e-3 * gflops


def test_variant_configs_are_the_repo_yamls():
    cfg = moe_block.variant_config("asymoe")
    yaml = OmegaConf.load(os.path.join(ROOT, "conf", "model", "moe", "asymoe.yaml"))
    assert cfg.top_k == yaml.top_k
    assert [p.num_experts for p in cfg.pools] == [p.num_experts for p in yaml.pools]


def test_llava_shaped_training_step_runs_packed_on_cpu(tmp_path, demo_data):
    """``train_step.py --shape llava`` at its CPU size: synthetic LLaVA-shaped shards, the real trainer with packing,
    one table row per stage with tokens/s, MFU against the measured peak and the padding packing saved."""
    out = tmp_path / "bench.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--shape", "llava", "--variants",
           "vanilla", "--steps", "4", "--log-every", "2", "--tokenizer", os.path.join(demo_data, "tokenizer.json"),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert "LLaVA-shaped training step" in table and "packed into rows of 256" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| vanilla |")]
    assert [r[1] for r in rows] == ["align", "instruct"]
    for r in rows:
        assert float(r[4].replace(",", "")) > 0  # tokens/s
        assert 0 < float(r[7].rstrip(" %")) < 100  # of the measured matmul peak
        assert r[8] == "-"  # no GPU memory on CPU
        packed, unpacked = re.fullmatch(r"([\d.]+) % \(([\d.]+) %\) \|", r[9]).groups()
        assert float(packed) < float(unpacked)
