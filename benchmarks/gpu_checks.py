"""Checks of the MoE blocks on a GPU that the CPU test suite cannot make, written as a markdown report.

1. No host synchronisation: a forward+backward of each variant's block under ``torch.cuda.set_sync_debug_mode
   ("error")`` (after warm-up steps, which compile the hyperbolic chains), with model.moe.expert_compute=auto.
2. The grouped path (auto on CUDA) against the per-expert loop, fp32 and bf16: largest error of the outputs and
   the input gradients relative to the loop's largest entry.
3. The hyperbolic experts in bf16 (grouped, tensor-core matmuls, fp32 maps) against the fp32 per-expert reference,
   on unit-RMS tokens, for freshly upcycled experts and for random ones.

    python benchmarks/gpu_checks.py --out gpu_checks.md
    python benchmarks/gpu_checks.py --device cpu   # the same checks on CPU with expert_compute=grouped (no sync mode)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_block import commit, emit, machine, token_layout, variant_config  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

from asymoe_train.data.batch import modality_counts  # noqa: E402
from asymoe_train.moe.block import MoEBlock  # noqa: E402
from asymoe_train.moe.evidence import TokenContext  # noqa: E402
from asymoe_train.moe.hyperbolic_experts import HyperbolicExperts  # noqa: E402
from asymoe_train.moe.pools import set_expert_compute  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def block_and_inputs(name: str, hidden: int, tokens: int, device, dtype, seed: int = 0):
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden))
    cfg = variant_config(name)
    block = MoEBlock.upcycle(mlp, cfg, hidden, 2 * hidden, "silu").to(device, dtype)
    with torch.no_grad():  # move the experts off their upcycled copies so every expert differs
        for pool in block.pools.values():
            for p in pool.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    modality_BL, context_BL = (t.to(device) for t in token_layout(tokens, 128))
    x = torch.randn(modality_BL.numel(), hidden, device=device, dtype=dtype)
    x = x / x.float().square().mean(-1, keepdim=True).sqrt().to(dtype)
    ctx = TokenContext(tuple(modality_BL.shape), context_BL, modality_BL, modality_counts=modality_counts(modality_BL))
    return block, x, modality_BL.reshape(-1), ctx


def step(block, x, modality, ctx):
    xi = x.detach().clone().requires_grad_()
    out = block(xi, modality, ctx)
    loss = out.hidden_TD.float().square().sum() + sum(out.losses.values())
    loss.backward()
    return out.hidden_TD.detach(), xi.grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--variants", default="vanilla,moiie,asymoe")
    p.add_argument("--out")
    a = p.parse_args()
    device = torch.device(a.device)
    on_gpu = device.type == "cuda"
    mode = "auto" if on_gpu else "grouped"
    lines = [f"### GPU checks of the MoE blocks, D={a.hidden}, T={a.tokens}", "",
             f"commit {commit()}, torch {torch.__version__}; {machine(device)}", "",
             "| variant | dtype | sync-free fwd+bwd | output error vs loop | input-gradient error vs loop |",
             "| --- | --- | --- | --- | --- |"]
    for name in a.variants.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            block, x, modality, ctx = block_and_inputs(name, a.hidden, a.tokens, device, dtype)
            set_expert_compute(block, mode)
            try:
                for _ in range(3):
                    step(block, x, modality, ctx)
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    y, dx = step(block, x, modality, ctx)
                    sync_ok = "yes"
                finally:
                    if on_gpu:
                        torch.cuda.set_sync_debug_mode(0)
            except RuntimeError as exn:
                sync_ok = f"no: {str(exn).splitlines()[0][:120]}"
                traceback.print_exc()
                y, dx = step(block, x, modality, ctx)
            loop = copy.deepcopy(block)
            set_expert_compute(loop, "loop")
            y_ref, dx_ref = step(loop, x, modality, ctx)
            lines.append(f"| {name} | {str(dtype)[6:]} | {sync_ok} | {rel(y, y_ref):.1e} | {rel(dx, dx_ref):.1e} |")
            print(lines[-1], flush=True)
    lines += ["", "Hyperbolic experts (Lorentz, E=2), grouped in bf16 against the per-expert fp32 reference, "
              f"D={a.hidden}, F={2 * a.hidden}, unit-RMS tokens:", "",
              "| experts | output error (relative to the largest entry) | median per-token relative error |",
              "| --- | --- | --- |"]
    torch.manual_seed(1)
    mlp = LlamaMLP(LlamaConfig(hidden_size=a.hidden, intermediate_size=2 * a.hidden)).to(device)
    for label in ("upcycled", "random"):
        pool = HyperbolicExperts(2, a.hidden, 2 * a.hidden).to(device)
        if label == "upcycled":
            pool.upcycle_from(mlp)
        x = torch.randn(a.tokens, a.hidden, device=device)
        x = x / x.square().mean(-1, keepdim=True).sqrt()
        counts = torch.tensor([a.tokens // 3, a.tokens - a.tokens // 3], device=device)
        ref = copy.deepcopy(pool)
        set_expert_compute(ref, "loop")
        with torch.no_grad():
            y_ref = ref(x, counts)
            fast = copy.deepcopy(pool).to(torch.bfloat16)
            set_expert_compute(fast, mode)
            y = fast(x.to(torch.bfloat16), counts).float()
        per_token = ((y - y_ref).norm(dim=-1) / y_ref.norm(dim=-1).clamp_min(1e-12)).median()
        lines.append(f"| {label} | {rel(y, y_ref):.1e} | {float(per_token):.1e} |")
        print(lines[-1], flush=True)
    emit(lines, a.out)


if __name__ == "__main__":
    main()
