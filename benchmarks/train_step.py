"""End-to-end training throughput of the demo: the real trainer (``asymoe-train experiment=demo``) for a short run per
variant, read back from the run's metrics.jsonl: sequences/s, samples (images)/s, tokens/s, the share of wall time
spent waiting for data and the model TFLOP/s (with ``--peak-tflops``, the MFU against that peak), per stage, the first
logging window (warm-up) left out.

    python benchmarks/train_step.py --variants moiie,asymoe --out docs/benchmarks.md

``--device cuda`` runs the same on one GPU with ``engine=gpu`` (bf16, ZeRO-2) at the size of ``GPU_MODEL``: the demo's
data and recipe with a Llama of 12 layers, width 1536 (MoE blocks in the odd layers) and a SigLIP tower of 6 layers,
width 768, at 224 px (64 image tokens per image after a 2x2 merge), larger batches; about 0.43B activated parameters
per token in stage 2 for moiie and vanilla, 0.54B for asymoe (``asymoe-train plan`` with the same overrides prints
them). The MFU column then uses the GPU's datasheet bf16 peak unless ``--peak-tflops`` is given.

``--shape llava`` trains on synthetic LLaVA-shaped data rendered on the spot (``llava_shape.py``: one image and a
one-turn conversation per sample, text lengths drawn uniformly), packed (``data.packing=true``): on a GPU, 336 px
images (576 image tokens, no merge), 32-1024 text tokens, rows of 4096, and ``LLAVA_GPU_MODEL``, about 1B activated
parameters; on CPU the tiny model with 8-64 text tokens in rows of 256. Its table adds the MFU against the device's
measured matmul peak (a square GEMM timed here), peak GPU memory and the padding share with and without packing.

    python benchmarks/train_step.py --shape llava --device cuda --variants dense,vanilla,moiie,asymoe --out bench.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from llava_shape import write_shards  # noqa: E402
from moe_block import ROOT, commit, emit, machine, mfu  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from asymoe_train.observability.flops import peak_tflops  # noqa: E402

STAGES = ("align", "instruct")
# Samples per step and stage: the demo's on CPU, larger on a GPU.
_DEMO = OmegaConf.load(os.path.join(ROOT, "conf", "experiment", "demo.yaml")).curriculum.stages
BATCH = {"cpu": {s: _DEMO[s].batch_size for s in STAGES}, "cuda": {"align": 64, "instruct": 32}}
# The ~0.5B-activated configuration of ``--device cuda`` (module doc).
GPU_MODEL = (
    "engine=gpu", "model.lm.hidden_size=1536", "model.lm.num_layers=12", "model.lm.num_heads=12",
    "model.lm.num_kv_heads=12", "model.lm.intermediate_size=3072", "model.vision.image_size=224",
    "model.vision.patch_size=14", "model.vision.hidden_size=768", "model.vision.num_layers=6",
    "model.vision.num_heads=12", "model.vision.intermediate_size=3072", "model.vision.merge=2",
    *(f"curriculum.stages.{s}.batch_size={n}" for s, n in BATCH["cuda"].items()),
)
# --shape llava on a GPU: about 1B activated parameters (Llama of 16 layers at width 2048, SigLIP of 12 layers at
# width 1024 on 336 px images, 576 image tokens each), samples per step and the data's shape per device.
LLAVA_GPU_MODEL = (
    "engine=gpu", "model.lm.hidden_size=2048", "model.lm.num_layers=16", "model.lm.num_heads=16",
    "model.lm.num_kv_heads=16", "model.lm.intermediate_size=5632", "model.lm.max_position_embeddings=4096",
    "model.vision.image_size=336", "model.vision.patch_size=14", "model.vision.hidden_size=1024",
    "model.vision.num_layers=12", "model.vision.num_heads=16", "model.vision.intermediate_size=4096",
    "model.vision.merge=1",
)
LLAVA = {  # image size, text tokens per sample, packed row length, samples per step, samples rendered
    "cpu": {"image_size": 64, "text_tokens": (8, 64), "max_length": 256, "batch": 16, "samples": 256},
    "cuda": {"image_size": 336, "text_tokens": (32, 1024), "max_length": 4096, "batch": 16, "samples": 1024},
}
KEYS = ("perf/sequences_per_s", "perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_share", "perf/model_tflops")
LLAVA_KEYS = ("perf/peak_memory_gib", "data/padding_share", "data/padding_share_unpacked")


def llava_overrides(data_root: str, tokenizer: str, device: str) -> list[str]:
    """The ``--shape llava`` run: the demo recipe's two stages on the synthetic shards, packed."""
    shape = LLAVA[device]
    return [
        f"data.root={data_root}", f"data.tokenizer={tokenizer}", "data.split_turns=false", "data.packing=true",
        f"data.max_length={shape['max_length']}", "data.augment=none", "~data.eval_sources.test",
        "~data.eval_sources.cp_test", *(f"data.sources.{name}=llava-*.tar" for name in ("captions", "qa", "cp_qa")),
        *(f"curriculum.stages.{s}.batch_size={shape['batch']}" for s in STAGES),
        *(LLAVA_GPU_MODEL if device == "cuda" else ()),
    ]


def measured_peak_tflops(device: torch.device) -> float:
    """The device's achievable matmul peak: a square GEMM (bf16 8192 on a GPU, fp32 1024 on CPU), best of 5."""
    gpu = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(6):
        if gpu:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if gpu:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def run(variant: str, steps: int, log_every: int, threads: int, run_dir: str, peak_tflops: float,
        gpu: bool, extra: list[str] = (), keys: tuple[str, ...] = KEYS) -> dict[str, dict[str, float]]:
    overrides = [
        "experiment=demo", f"model/moe={variant}", f"hydra.run.dir={run_dir}", "logger.mode=disabled",
        "logger.progress=false", f"logger.log_every={log_every}", f"engine.threads={threads}",
        f"logger.peak_tflops={peak_tflops}",
        *(f"curriculum.stages.{s}.{k}" for s in STAGES for k in (f"steps={steps}", "warmup_steps=0", "eval=false")),
        *(GPU_MODEL if gpu and not extra else ()), *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cuda" if gpu else "cpu",
           "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-m", "asymoe_train.cli", *overrides], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"perf/' in line]
    result = {}
    for index, stage in enumerate(STAGES):
        windows = [r for r in records if r["stage"] == index][1:]  # the first window holds start-up costs
        result[stage] = {key: statistics.mean(r[key] for r in windows) for key in keys if key in windows[0]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="dense,vanilla,moiie,asymoe")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per stage")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: one GPU, bf16, the ~0.5B-activated GPU_MODEL (module doc)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="one device's peak TFLOP/s, for an MFU column "
                        "(on a GPU, default: its datasheet bf16 peak where known)")
    parser.add_argument("--shape", choices=("demo", "llava"), default="demo",
                        help="llava: synthetic LLaVA-shaped data, packed, at ~1B activated on a GPU (module doc)")
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "easy_vqa", "tokenizer.json"),
                        help="--shape llava: the tokenizer (default: the demo's, from make data)")
    parser.add_argument("--out", help="append the result table to this markdown file")
    args = parser.parse_args()
    device, gpu, batch = torch.device(args.device), args.device == "cuda", BATCH[args.device]
    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA GPU")
    peak = peak_tflops(device, "bf16" if gpu else "fp32", args.peak_tflops) or 0.0
    llava = args.shape == "llava"
    measured = measured_peak_tflops(device) if llava else 0.0
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        extra = []
        if llava:
            shape = LLAVA[args.device]
            write_shards(data_dir, args.tokenizer, shape["samples"], shape["image_size"], shape["text_tokens"])
            extra = llava_overrides(data_dir, os.path.abspath(args.tokenizer), args.device)
        for variant in args.variants.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                result = run(variant, args.steps, args.log_every, args.threads, os.path.join(tmp, "run"), peak,
                             gpu, extra, KEYS + LLAVA_KEYS if llava else KEYS)
            for stage in STAGES:
                r = result[stage]
                row = (f"| {variant} | {stage} | {r['perf/sequences_per_s']:.0f} | {r['perf/samples_per_s']:.1f} | "
                       f"{r['perf/tokens_per_s']:,.0f} | {100 * r['perf/data_wait_share']:.1f} % | "
                       f"{r['perf/model_tflops'] * 1e3:.1f}{mfu(r['perf/model_tflops'], peak)} |")
                if llava:
                    memory = f"{r['perf/peak_memory_gib']:.1f}" if "perf/peak_memory_gib" in r else "-"
                    row += (f" {100 * r['perf/model_tflops'] / measured:.1f} % | {memory} | "
                            f"{100 * r['data/padding_share']:.1f} % ({100 * r['data/padding_share_unpacked']:.1f} %) |")
                rows.append(row)
    if llava:
        shape = LLAVA[args.device]
        title = (f"### LLaVA-shaped training step (real trainer, synthetic data, packed), "
                 f"{'bf16, GPU, ~1B activated' if gpu else 'fp32, CPU, tiny model'}")
        about = (f"{shape['image_size']} px images, {shape['text_tokens'][0]}-{shape['text_tokens'][1]} text tokens per "
                 f"sample, packed into rows of {shape['max_length']}; {shape['batch']} samples per step"
                 f"{'; the LLAVA_GPU_MODEL overrides of benchmarks/train_step.py' if gpu else ''}. Measured matmul peak "
                 f"{measured:,.1f} TFLOP/s.")
        header = ("| variant | stage | sequences/s | samples/s | tokens/s | waiting for data | model GFLOP/s (MFU) "
                  "| of measured peak | peak GPU memory GiB | padding (unpacked) |")
        rule = "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    else:
        title = (f"### Demo training step (real trainer, experiment=demo), "
                 f"{'bf16, GPU, ~0.5B activated' if gpu else 'fp32, CPU'}")
        about = (f"align: {batch['align']} caption images per step; instruct: {batch['instruct']} images (about 5 "
                 f"questions each) per step{'; the GPU_MODEL overrides of benchmarks/train_step.py' if gpu else ''}.")
        header = "| variant | stage | sequences/s | samples/s | tokens/s | waiting for data | model GFLOP/s (MFU) |"
        rule = "| --- | --- | --- | --- | --- | --- | --- |"
    lines = [
        title,
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}, torch {torch.__version__}; "
        f"{machine(device)} (engine.threads={args.threads}). {args.steps} steps per stage, means "
        f"over logging windows of {args.log_every} steps after the first. {about}",
        f"Command: `python benchmarks/train_step.py {' '.join(sys.argv[1:])}`",
        "",
        header,
        rule,
        *rows,
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
