"""MoE block forward+backward throughput per variant, interleaved in one process with pinned threads.

Every variant is the repo's own `conf/model/moe/<variant>.yaml`, upcycled from one random SwiGLU MLP, on the same
tokens: B sequences of L positions, each [image tokens | prompt | answer] (a quarter image, the last eighth answer),
so modality routers and evidence experts see the structure they see in training. One timed repeat runs every variant
once, in a rotating order, so drift and noise from other processes hit all of them alike; the figure per variant is
the median over repeats. The loss is sum(output^2) plus the block's auxiliary losses.

    python benchmarks/moe_block.py --tokens 4096 --hidden 256 --variants vanilla,asymoe --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from asymoe_train.config.schema import MoEConfig  # noqa: E402
from asymoe_train.modality import IMAGE, TEXT  # noqa: E402
from asymoe_train.moe.block import MoEBlock  # noqa: E402
from asymoe_train.moe.evidence import TokenContext  # noqa: E402


def variant_config(name: str) -> MoEConfig:
    path = os.path.join(ROOT, "conf", "model", "moe", f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MoEConfig), OmegaConf.load(path)))


def token_layout(tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """modality [B, L] and context [B, L] (image + prompt positions) of ``tokens // seq_len`` sequences."""
    batch = tokens // seq_len
    modality = torch.full((batch, seq_len), TEXT)
    modality[:, : seq_len // 4] = IMAGE
    context = torch.ones(batch, seq_len, dtype=torch.bool)
    context[:, seq_len - seq_len // 8 :] = False
    return modality, context


def activated_ffn_params(cfg: MoEConfig, hidden: int, intermediate: int) -> int:
    """FFN parameters a token runs through: top_k experts of their width (dense: the one FFN)."""
    if not cfg.pools:
        return 3 * hidden * intermediate
    width = max(p.width for p in cfg.pools)
    return cfg.top_k * 3 * hidden * intermediate * width


class Dense(torch.nn.Module):
    """The dense FFN baseline with the activated FFN parameters of a top-k block: intermediate x k."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate))

    def forward(self, x, modality, ctx):
        return self.mlp(x), {}


class Block(torch.nn.Module):
    def __init__(self, cfg: MoEConfig, mlp: LlamaMLP, hidden: int, intermediate: int):
        super().__init__()
        self.block = MoEBlock.upcycle(mlp, cfg, hidden, intermediate, "silu")

    def forward(self, x, modality, ctx):
        out = self.block(x, modality, ctx)
        return out.hidden_TD, out.losses


class NaiveLoop(torch.nn.Module):
    """The vanilla block's router and experts run the naive way: per expert, a boolean mask over all tokens' top-k
    choices, a gather, the expert, a weighted scatter-add (what the sorted dispatch replaces)."""

    def __init__(self, vanilla: Block):
        super().__init__()
        self.router = vanilla.block.routers["all"]
        self.experts = vanilla.block.pools["experts"]

    def forward(self, x, modality, ctx):
        routing = self.router(x)
        y = torch.zeros_like(x)
        for e in range(self.experts.num_experts):
            token, k = torch.where(routing.experts_NK == e)
            out = self.experts.expert(e, x[token]) * routing.weights_NK[token, k, None].to(x.dtype)
            y = y.index_add(0, token, out)
        return y, {}


def step(module, x, modality, ctx) -> None:
    y, losses = module(x, modality, ctx)
    loss = y.square().sum() + sum(losses.values(), torch.zeros(()))
    loss.backward()


def time_variants(modules: dict, x, modality, ctx, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for module in modules.values():
            step(module, x, modality, ctx)
    times: dict[str, list[float]] = {name: [] for name in modules}
    names = list(modules)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            module = modules[name]
            module.zero_grad(set_to_none=True)
            x.grad = None
            start = time.perf_counter()
            step(module, x, modality, ctx)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn-mult", type=float, default=3.0, help="expert intermediate size = mult x hidden")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--variants", default="vanilla,modality,moiie,asymoe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="append the result table to this markdown file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, intermediate = args.hidden, int(args.ffn_mult * args.hidden)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate))
    modules, activated = {}, {}
    for name in args.variants.split(","):
        cfg = variant_config(name)
        modules[name] = Block(cfg, mlp, hidden, intermediate)
        activated[name] = activated_ffn_params(cfg, hidden, intermediate)
    if "vanilla" in modules:
        modules["naive masked loop (vanilla)"] = NaiveLoop(modules["vanilla"])
        activated["naive masked loop (vanilla)"] = activated["vanilla"]
    top_k = max(variant_config(n).top_k for n in args.variants.split(","))
    modules["dense (same activated FFN)"] = Dense(hidden, intermediate * top_k)
    activated["dense (same activated FFN)"] = 3 * hidden * intermediate * top_k

    modality_BL, context_BL = token_layout(args.tokens, args.seq_len)
    x = torch.randn(modality_BL.numel(), hidden)
    x = (x / x.square().mean(-1, keepdim=True).sqrt()).requires_grad_()  # unit RMS, as after the decoder's norm
    ctx = TokenContext(tuple(modality_BL.shape), context_BL, modality_BL)
    seconds = time_variants(modules, x, modality_BL.reshape(-1), ctx, args.repeats, args.warmup)

    reference = seconds.get("vanilla")
    lines = [
        f"### MoE block forward+backward, T={args.tokens}, D={hidden}, F={intermediate}, fp32, CPU",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}, torch {torch.__version__}; "
        f"{machine()}. Tokens: sequences of {args.seq_len} (1/4 image, 1/8 answer); median of {args.repeats} "
        f"interleaved repeats after {args.warmup} warm-up rounds.",
        f"Command: `python benchmarks/moe_block.py {' '.join(sys.argv[1:])}`",
        "",
        "| block | activated FFN params / token | fwd+bwd ms | tokens/s | time vs vanilla |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in seconds.items():
        ratio = f"{s / reference:.2f}x" if reference else "-"
        lines.append(f"| {name} | {activated[name] / 1e3:.0f}k | {s * 1e3:.1f} | {args.tokens / s:,.0f} | {ratio} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
