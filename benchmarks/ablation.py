"""``make ablation``: the six variants x seeds on one step budget (conf/experiment/ablation.yaml, or
ablation_scenes.yaml with ``--experiment ablation_scenes``: ``make ablation DATA=scenes``), then the report.

Per seed: one run of the dense stage 1 (align), then one Hydra multirun over the variants whose stage 2 starts from
that checkpoint (``init_from``), so the variants of a seed differ in nothing but ``model/moe``; finally
``benchmarks/ablation_report.py`` over all of them writes docs/results.md and its plots. Each command is printed
before it runs; a failed one stops the ablation (rerunning with the same ``--root`` skips the finished align runs).

    python benchmarks/ablation.py [--experiment ablation_scenes] --seeds 0 1 2 --out docs/results.md
        [--reference vanilla asymoe moiie] [-- hydra overrides for every run]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def align_then_sweep(experiment: str, seeds: list[int], root: str, overrides: list[str], last_stage: str,
                     sweep: tuple[str, ...] = ()) -> None:
    """Per seed: one run of every stage but ``last_stage`` (skipped when its checkpoint is complete), then one Hydra
    multirun (its sweep in ``experiment``'s config, plus ``sweep``) of ``last_stage`` from that checkpoint."""
    cli, base = [sys.executable, "-m", "asymoe_train.cli"], [f"experiment={experiment}", "logger.progress=false"]
    for seed in seeds:
        align = os.path.join(root, f"align-seed{seed}")
        checkpoint = os.path.join(align, "checkpoints", "align")
        if not os.path.isfile(os.path.join(checkpoint, "COMPLETE")):
            # the deletion goes last: it must also drop what the overrides set in the last stage
            run([*cli, *base, "hydra.mode=RUN", f"seed={seed}", f"hydra.run.dir={align}", *overrides,
                 f"~curriculum.stages.{last_stage}"])
        run([*cli, "--multirun", *base, f"seed={seed}", f"init_from={checkpoint}", *sweep,
             f"hydra.sweep.dir={os.path.join(root, f'seed{seed}')}", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="ablation",
                        help="the experiment config of every run: ablation (easy-vqa) or ablation_scenes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default=f"outputs/ablation/{datetime.now():%Y%m%d-%H%M%S}",
                        help="directory of all the runs (default: outputs/ablation/<time>)")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--reference", nargs="+", default=["vanilla", "asymoe", "moiie"],
                        help="the report's paired comparisons: every variant against each of these")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every run (after --)")
    args = parser.parse_args()

    root = os.path.abspath(args.root)
    align_then_sweep(args.experiment, args.seeds, root, args.overrides, "instruct")
    command = "make ablation" + (" DATA=scenes" if args.experiment == "ablation_scenes" else "") \
        + (f" ARGS=\"{' '.join(args.overrides)}\"" if args.overrides else "")
    run([sys.executable, os.path.join(HERE, "ablation_report.py"), root, "--out", args.out, "--command", command,
         "--reference", *args.reference])


if __name__ == "__main__":
    main()
