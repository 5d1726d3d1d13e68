"""MoE block forward+backward throughput per variant, interleaved in one process with pinned threads.

Every variant is the repo's own `conf/model/moe/<variant>.yaml`, upcycled from one random SwiGLU MLP, on the same
tokens: B sequences of L positions, each [image tokens | prompt | answer] (a quarter image, the last eighth answer),
so modality routers and evidence experts see the structure they see in training. One timed repeat runs every variant
once, in a rotating order, so drift and noise from other processes hit all of them alike; the figure per variant is
the median over repeats. The loss is sum(output^2) plus the block's auxiliary losses.

``--deepspeed-capacity 1.0,1.5`` adds DeepSpeed's ``deepspeed.moe.layer.MoE`` with the vanilla block's experts and
router weights at each capacity factor (``deepspeed_baseline.py``), and the table gives every row's dropped share.
``--router-skew s`` makes the vanilla router unbalanced (see ``skew_routing``).

``--device cuda --dtype bf16`` runs the blocks on a GPU with bf16 weights and activations (the hyperbolic maths
upcasts to fp32 inside, as in training), adds a plain ``torch._grouped_mm`` vanilla layer as a reference row, and
reports each row's peak GPU memory over one forward+backward. Every row also reports its model FLOP/s: three times the forward FLOPs that
``torch.utils.flop_counter`` counts for that row's maths (every expert on the tokens routed to it, the evidence
attention; DeepSpeed's rows and the naive loop do the vanilla block's), over its time; and the MFU against
``--peak-tflops`` or a known GPU's datasheet bf16 peak. DeepSpeed's rows run on CPU only.

    python benchmarks/moe_block.py --tokens 4096 --hidden 256 --variants vanilla,asymoe --out docs/benchmarks.md
    python benchmarks/moe_block.py --tokens 4096 --hidden 512 --experts 4 --variants vanilla \
        --deepspeed-capacity 1.0,1.5 --router-skew 0.33
    python benchmarks/moe_block.py --tokens 16384 --hidden 2048 --device cuda --dtype bf16

# T tokens, D model dim, R experts of the vanilla router, B sequences, L positions
"""

from __future__ import annotations

import argparse
import math
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

from deepspeed_baseline import deepspeed_drops, deepspeed_twin, init_single_process, native_drops  # noqa: E402

from asymoe_train.config.moe_schema import MoEConfig  # noqa: E402
from asymoe_train.modality import IMAGE, TEXT  # noqa: E402
from asymoe_train.moe.block import MoEBlock  # noqa: E402
from asymoe_train.moe.evidence import TokenContext  # noqa: E402
from asymoe_train.moe.grouped import grouped_linear  # noqa: E402
from asymoe_train.moe.router import TopKRouter  # noqa: E402
from asymoe_train.observability.flops import TRAIN_FACTOR, count_flops, peak_tflops  # noqa: E402

VANILLA, NAIVE, DENSE = "vanilla", "naive masked loop (vanilla)", "dense (same activated FFN)"
GROUPED_REF = "plain torch._grouped_mm layer (vanilla)"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def variant_config(name: str, num_experts: int | None = None) -> MoEConfig:
    """``conf/model/moe/<name>.yaml``; ``num_experts`` overrides the vanilla variant's pool size."""
    path = os.path.join(ROOT, "conf", "model", "moe", f"{name}.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MoEConfig), OmegaConf.load(path)))
    if num_experts is not None and name == VANILLA:
        cfg.pools[0].num_experts = num_experts
    return cfg


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
    """An MoE block (ours, or DeepSpeed's layer in our block's interface) with the benchmark's call signature."""

    def __init__(self, block: MoEBlock):
        super().__init__()
        self.block = block

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


class GroupedReference(NaiveLoop):
    """A plain vanilla MoE layer on ``torch._grouped_mm`` with the vanilla block's router and experts: router GEMM,
    softmax top-k, argsort, gather, three grouped GEMMs, weighted index_add (no modality routing, padding or losses):
    what the grouped kernels give without the block's bookkeeping. CUDA rows only."""

    def forward(self, x, modality, ctx):
        routing = self.router(x)
        k, e = routing.experts_NK.shape[-1], self.experts.num_experts
        expert_A = routing.experts_NK.reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        token_A = order_A // k
        counts_E = torch.zeros(e, dtype=torch.long, device=x.device).scatter_add_(0, expert_A,
                                                                                  torch.ones_like(expert_A))
        rows = x[token_A]
        pool = self.experts
        h = pool.act(grouped_linear(rows, pool.gate_EFD, counts_E, "grouped")) * grouped_linear(
            rows, pool.up_EFD, counts_E, "grouped")
        y = grouped_linear(h, pool.down_EDF, counts_E, "grouped") * routing.weights_NK.reshape(-1)[order_A, None].to(
            x.dtype)
        return torch.zeros_like(x).index_add_(0, token_A, y), {}


def skew_routing(x_TD: torch.Tensor, router: TopKRouter, skew: float) -> torch.Tensor:
    """Unbalance ``router`` (in place) by ``skew`` nats: router e's logits rise by ``skew * (e / (R - 1) - 1/2)`` on
    average, so the last experts get more tokens than the first; returns the tokens to use.

    Router weights alone cannot unbalance zero-mean tokens much (with R = 2K experts, as here, not at all: x and -x
    are equally likely, and the top K for one are the bottom K for the other), so the tokens get a shared mean
    direction u as large as their noise (decoder hidden states have such directions), renormalised to unit RMS, and
    each router row gets its offset along u in place of its random component there."""
    num_experts, hidden = router.weight_RD.shape
    if num_experts < 2:
        raise ValueError("--router-skew needs a router over at least 2 experts")
    u_D = torch.nn.functional.normalize(torch.randn(hidden, device=x_TD.device, dtype=x_TD.dtype), dim=0)
    x_TD = x_TD + math.sqrt(hidden) * u_D
    x_TD = x_TD / x_TD.square().mean(-1, keepdim=True).sqrt()
    offset_R = skew * (torch.arange(num_experts, device=x_TD.device) / (num_experts - 1) - 0.5).to(x_TD.dtype)
    with torch.no_grad():
        weight_RD = router.weight_RD
        weight_RD -= (weight_RD @ u_D)[:, None] * u_D
        weight_RD += offset_R[:, None] * u_D / (x_TD @ u_D).mean()
    return x_TD


def step(module, x, modality, ctx) -> None:
    y, losses = module(x, modality, ctx)
    loss = y.float().square().sum() + sum(losses.values(), torch.zeros((), device=y.device))
    loss.backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
            sync(x.device)
            start = time.perf_counter()
            step(module, x, modality, ctx)
            sync(x.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(modules: dict, x, modality, ctx) -> dict[str, str]:
    """Peak GPU memory of one forward+backward per row (GiB, over what was allocated before it); "-" on CPU."""
    if x.device.type != "cuda":
        return {name: "-" for name in modules}
    peaks = {}
    for name, module in modules.items():
        module.zero_grad(set_to_none=True)
        x.grad = None
        sync(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        step(module, x, modality, ctx)
        sync(x.device)
        peaks[name] = f"{(torch.cuda.max_memory_allocated(x.device) - base) / 2**30:.2f}"
    return peaks


def machine(device: torch.device | None = None) -> str:
    """The CPU, its cores and torch's threads; and the GPU when ``device`` is one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    host = f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {host}"
    return host


def mfu(tflops: float, peak: float | None) -> str:
    """`` (x %)``: ``tflops`` as a share of the device's ``peak`` TFLOP/s; empty without a peak."""
    return f" ({100 * tflops / peak:.1f} %)" if peak else ""


def emit(lines: list[str], out: str | None) -> None:
    """Print a markdown table and append it to ``out`` (when given), after a blank line."""
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n" + table)


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
    parser.add_argument("--experts", type=int, help="experts of the vanilla variant (default: its YAML's); the "
                        "naive loop and DeepSpeed rows use the vanilla block's")
    parser.add_argument("--deepspeed-capacity", default="", help="comma-separated capacity factors: a row of "
                        "DeepSpeed's MoE layer (vanilla's weights and routing, dropping tokens) for each")
    parser.add_argument("--router-skew", type=float, default=0.0, help="unbalance the vanilla router by this many "
                        "nats between its first and last expert (0: the balanced random router)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="one device's peak TFLOP/s for the MFU column "
                        "(default: a known GPU's datasheet bf16 peak in bf16 runs, else no MFU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="append the result table to this markdown file")
    args = parser.parse_args()
    variants = args.variants.split(",")
    capacities = [float(c) for c in args.deepspeed_capacity.split(",") if c]
    if (capacities or args.router_skew) and VANILLA not in variants:
        raise ValueError("--deepspeed-capacity and --router-skew work on the vanilla block: add vanilla to --variants")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU")
    if capacities and device.type != "cpu":
        raise ValueError("--deepspeed-capacity runs on CPU only (its process group is gloo): drop it, or --device cpu")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, intermediate = args.hidden, int(args.ffn_mult * args.hidden)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate))
    modules, activated, capacity = {}, {}, {}
    for name in variants:
        cfg = variant_config(name, args.experts)
        modules[name] = Block(MoEBlock.upcycle(mlp, cfg, hidden, intermediate, "silu")).to(device, dtype)
        activated[name] = activated_ffn_params(cfg, hidden, intermediate)
        capacity[name] = "dropless"

    modality_BL, context_BL = (t.to(device) for t in token_layout(args.tokens, args.seq_len))
    modality_T = modality_BL.reshape(-1)
    x = torch.randn(modality_BL.numel(), hidden, device=device, dtype=dtype)
    x = x / x.square().mean(-1, keepdim=True).sqrt()  # unit RMS, as after the decoder's norm
    if args.router_skew:
        x = skew_routing(x, modules[VANILLA].block.routers["all"], args.router_skew)
    x.requires_grad_()
    ctx = TokenContext(tuple(modality_BL.shape), context_BL, modality_BL)
    drops = {name: native_drops(module.block, x, modality_T, ctx) for name, module in modules.items()}

    ds_version, ds_rows = "", []
    if VANILLA in modules:
        vanilla = modules[VANILLA].block
        if capacities:
            ds_version = init_single_process()
        for cf in capacities:
            name = f"deepspeed {ds_version} MoE, cf={cf}"
            modules[name] = Block(deepspeed_twin(vanilla, hidden, intermediate, cf))
            drops[name] = deepspeed_drops(modules[name].block, vanilla, x, modality_T)
            activated[name], capacity[name] = activated[VANILLA], str(cf)
            ds_rows.append(name)
        modules[NAIVE] = NaiveLoop(modules[VANILLA])
        activated[NAIVE], capacity[NAIVE] = activated[VANILLA], "dropless"
        if device.type == "cuda":
            modules[GROUPED_REF] = GroupedReference(modules[VANILLA])
            activated[GROUPED_REF], capacity[GROUPED_REF] = activated[VANILLA], "dropless"
    top_k = max(variant_config(n).top_k for n in variants)
    modules[DENSE] = Dense(hidden, intermediate * top_k).to(device, dtype)
    activated[DENSE], capacity[DENSE] = 3 * hidden * intermediate * top_k, "-"
    # Model FLOPs count the maths a row does: DeepSpeed's rows and the naive loop do the vanilla block's (DeepSpeed's
    # padded capacity slots and one-hot dispatch matmuls are its implementation's cost, not the model's).
    flops = {name: TRAIN_FACTOR * count_flops(modules[name], x, modality_T, ctx) for name in [*variants, DENSE]}
    flops.update({name: flops[VANILLA] for name in [*ds_rows, NAIVE, GROUPED_REF] if name in modules})
    peak = peak_tflops(device, args.dtype, args.peak_tflops)

    seconds = time_variants(modules, x, modality_T, ctx, args.repeats, args.warmup)
    memory = peak_memory(modules, x, modality_T, ctx)

    reference = seconds.get(VANILLA)
    routing = f"router skewed by {args.router_skew:g} nats" if args.router_skew else "balanced random router"
    experts = f", E={modules[VANILLA].block.num_experts}" if VANILLA in modules else ""
    lines = [
        f"### MoE block forward+backward, T={args.tokens}, D={hidden}, F={intermediate}{experts}, top-{top_k}, "
        f"{args.dtype}, {'CPU' if device.type == 'cpu' else 'GPU'}, {routing}",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}, torch {torch.__version__}"
        f"{f', deepspeed {ds_version}' if ds_version else ''}; {machine(device)}. Tokens: sequences of {args.seq_len} "
        f"(1/4 image, 1/8 answer); median of {args.repeats} interleaved repeats after {args.warmup} warm-up rounds.",
        f"Command: `python benchmarks/moe_block.py {' '.join(sys.argv[1:])}`",
        "",
        "| block | activated FFN params / token | capacity factor | dropped assignments (tokens losing all k) "
        "| fwd+bwd ms | tokens/s | time vs vanilla | model GFLOP/s (MFU) | peak GPU memory GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in seconds.items():
        ratio = f"{s / reference:.2f}x" if reference else "-"
        gflops = flops[name] / s / 1e9
        lines.append(f"| {name} | {activated[name] / 1e3:.0f}k | {capacity[name]} | {drops.get(name, '-')} | "
                     f"{s * 1e3:.1f} | {args.tokens / s:,.0f} | {ratio} | {gflops:,.1f}"
                     f"{mfu(gflops / 1e3, peak)} | {memory[name]} |")
    if reference:
        summary = [f"{reference / seconds[DENSE]:.2f}x the dense FFN's time"]
        summary += [f"{seconds[n] / reference:.2f}x the tokens/s of {n} (dropping {100 * drops[n].assignments:.2f} %)"
                    for n in ds_rows]
        lines += ["", f"Vanilla block, dropping {100 * drops[VANILLA].assignments:.2f} % of assignments: "
                  f"{'; '.join(summary)}."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
