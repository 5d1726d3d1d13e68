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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from moe_block import ROOT, commit, machine, mfu  # noqa: E402
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
KEYS = ("perf/sequences_per_s", "perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_share", "perf/model_tflops")


def run(variant: str, steps: int, log_every: int, threads: int, run_dir: str, peak_tflops: float,
        gpu: bool) -> dict[str, dict[str, float]]:
    overrides = [
        "experiment=demo", f"model/moe={variant}", f"hydra.run.dir={run_dir}", "logger.mode=disabled",
        "logger.progress=false", f"logger.log_every={log_every}", f"engine.threads={threads}",
        f"logger.peak_tflops={peak_tflops}",
        *(f"curriculum.stages.{s}.{k}" for s in STAGES for k in (f"steps={steps}", "warmup_steps=0", "eval=false")),
        *(GPU_MODEL if gpu else ()),
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
        result[stage] = {key: statistics.mean(r[key] for r in windows) for key in KEYS}
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
    parser.add_argument("--out", help="append the result table to this markdown file")
    args = parser.parse_args()
    device, gpu, batch = torch.device(args.device), args.device == "cuda", BATCH[args.device]
    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA GPU")
    peak = peak_tflops(device, "bf16" if gpu else "fp32", args.peak_tflops) or 0.0
    rows = []
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            result = run(variant, args.steps, args.log_every, args.threads, os.path.join(tmp, "run"), peak, gpu)
        for stage in STAGES:
            r = result[stage]
            rows.append(f"| {variant} | {stage} | {r['perf/sequences_per_s']:.0f} | {r['perf/samples_per_s']:.1f} | "
                        f"{r['perf/tokens_per_s']:,.0f} | {100 * r['perf/data_wait_share']:.1f} % | "
                        f"{r['perf/model_tflops'] * 1e3:.1f}{mfu(r['perf/model_tflops'], peak)} |")
    lines = [
        f"### Demo training step (real trainer, experiment=demo), {'bf16, GPU, ~0.5B activated' if gpu else 'fp32, CPU'}",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}, torch {torch.__version__}; "
        f"{machine(device)} (engine.threads={args.threads}). {args.steps} steps per stage, means "
        f"over logging windows of {args.log_every} steps after the first. align: {batch['align']} caption images "
        f"per step; instruct: {batch['instruct']} images (about 5 questions each) per step"
        f"{'; the GPU_MODEL overrides of benchmarks/train_step.py' if gpu else ''}.",
        f"Command: `python benchmarks/train_step.py {' '.join(sys.argv[1:])}`",
        "",
        "| variant | stage | sequences/s | samples/s | tokens/s | waiting for data | model GFLOP/s (MFU) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
