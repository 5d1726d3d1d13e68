"""End-to-end training throughput of the demo: the real trainer (``asymoe-train experiment=demo``) for a short run per
variant, read back from the run's metrics.jsonl: sequences/s, samples (images)/s, tokens/s, the share of wall time
spent waiting for data and the model TFLOP/s (with ``--peak-tflops``, the MFU against that peak), per stage, the first
logging window (warm-up) left out.

    python benchmarks/train_step.py --variants moiie,asymoe --out docs/benchmarks.md
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

from moe_block import ROOT, commit, machine  # noqa: E402

STAGES = ("align", "instruct")
KEYS = ("perf/sequences_per_s", "perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_share", "perf/model_tflops")


def run(variant: str, steps: int, log_every: int, threads: int, run_dir: str,
        peak_tflops: float) -> dict[str, dict[str, float]]:
    overrides = [
        "experiment=demo", f"model/moe={variant}", f"hydra.run.dir={run_dir}", "logger.mode=disabled",
        "logger.progress=false", f"logger.log_every={log_every}", f"engine.threads={threads}",
        f"logger.peak_tflops={peak_tflops}",
        *(f"curriculum.stages.{s}.{k}" for s in STAGES for k in (f"steps={steps}", "warmup_steps=0", "eval=false")),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-m", "asymoe_train.cli", *overrides], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"perf/' in line]
    result = {}
    for index, stage in enumerate(STAGES):
        windows = [r for r in records if r["stage"] == index][1:]  # the first window holds start-up costs
        result[stage] = {key: statistics.mean(r[key] for r in windows) for key in KEYS}
    return result


def mfu(tflops: float, peak: float) -> str:
    return f" ({100 * tflops / peak:.1f} %)" if peak else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="dense,vanilla,moiie,asymoe")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per stage")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="one device's peak TFLOP/s, for an MFU column")
    parser.add_argument("--out", help="append the result table to this markdown file")
    args = parser.parse_args()
    rows = []
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            result = run(variant, args.steps, args.log_every, args.threads, os.path.join(tmp, "run"),
                         args.peak_tflops)
        for stage in STAGES:
            r = result[stage]
            rows.append(f"| {variant} | {stage} | {r['perf/sequences_per_s']:.0f} | {r['perf/samples_per_s']:.1f} | "
                        f"{r['perf/tokens_per_s']:,.0f} | {100 * r['perf/data_wait_share']:.1f} % | "
                        f"{r['perf/model_tflops'] * 1e3:.1f}{mfu(r['perf/model_tflops'], args.peak_tflops)} |")
    lines = [
        "### Demo training step (real trainer, experiment=demo), fp32, CPU",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}; {machine()} (engine.threads="
        f"{args.threads}). {args.steps} steps per stage, means over logging windows of {args.log_every} steps after "
        "the first. align: 32 caption images per step; instruct: 12 images (about 60 questions) per step.",
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
