"""The ablation report: one table and two plots from finished demo runs (``make ablation`` writes them to
docs/results.md and docs/results/).

Reads each run directory's resolved ``config.yaml``, ``eval/<last stage>.json``, ``metrics.jsonl`` and ``train.log``
(what every run writes, see README "Run directory"); a sweep directory (Hydra multirun) stands for its job
directories. Runs of the same variant (e.g. seeds) are averaged, with the spread shown.

    python benchmarks/ablation_report.py outputs/ablation/sweep-20261123-050000 --out docs/results.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
from collections import defaultdict
from datetime import datetime, timezone

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_block import commit, machine  # noqa: E402

FAMILIES = ("all", "family/colour", "family/shape", "family/yes/no")
ACTIVATED = re.compile(r"activated per token ([\d.]+[kMB]?)")
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")


def run_dirs(paths: list[str]) -> list[str]:
    """Run directories among ``paths``: a directory with a config.yaml, or the job directories of a sweep."""
    found = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "config.yaml")):
            found.append(path)
        elif os.path.isdir(path):
            found.extend(run_dirs(sorted(os.path.join(path, d) for d in os.listdir(path)
                                         if os.path.isdir(os.path.join(path, d)))))
    return found


def read_run(path: str) -> dict | None:
    """The facts of one finished run, or None when it has no final evaluation yet."""
    with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    stages = list(cfg["curriculum"]["stages"])
    eval_path = os.path.join(path, "eval", f"{stages[-1]}.json")
    if not os.path.isfile(eval_path):
        return None
    with open(eval_path, encoding="utf-8") as f:
        splits = json.load(f)["splits"]
    # runs whose configs differ in more than seed and run_dir are different settings, never averaged together
    setting = {k: v for k, v in cfg.items() if k not in ("seed", "run_dir")}
    digest = hashlib.sha1(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:6]
    run = {"path": path, "variant": cfg["model"]["moe"]["variant"], "setting": digest, "seed": cfg["seed"],
           "splits": splits,
           "curve": [], "activated": "-", "minutes": None, "tokens_per_s": []}
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("stage") == len(stages) - 1 and "loss/lm" in row:
                    run["curve"].append((row["step"], row["loss/lm"]))
                    run["tokens_per_s"].append(row.get("perf/tokens_per_s", 0.0))
    log_path = os.path.join(path, "train.log")
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        found = [m.group(1) for m in map(ACTIVATED.search, lines) if m]
        run["activated"] = found[-1] if found else "-"
        stamps = [datetime.fromisoformat(m.group(1)) for m in map(STAMP.match, lines) if m]
        if len(stamps) > 1:
            run["minutes"] = (stamps[-1] - stamps[0]).total_seconds() / 60
    return run


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def accuracy(run: dict, split: str, family: str) -> float | None:
    cell = run["splits"].get(split, {}).get("breakdown", {}).get(family)
    return cell["accuracy"] if cell else None


def table(runs_by_variant: dict[str, list[dict]]) -> list[str]:
    lines = ["| variant | runs (seeds) | activated params / token | " + " | ".join(
        f"{split} {family.replace('family/', '')}" for split in ("test", "cp_test") for family in FAMILIES)
        + " | final LM loss | stage-2 tokens/s | minutes |",
        "| --- " * (6 + 2 * len(FAMILIES)) + "|"]
    for variant, runs in runs_by_variant.items():
        cells = []
        for split in ("test", "cp_test"):
            for family in FAMILIES:
                cells.append(mean_spread([a for r in runs if (a := accuracy(r, split, family)) is not None]))
        losses = [r["curve"][-1][1] for r in runs if r["curve"]]
        speeds = [statistics.mean(r["tokens_per_s"]) for r in runs if r["tokens_per_s"]]
        minutes = [r["minutes"] for r in runs if r["minutes"] is not None]
        lines.append(f"| {variant} | {len(runs)} ({', '.join(str(r['seed']) for r in runs)}) | {runs[0]['activated']} | "
                     + " | ".join(cells) + f" | {mean_spread(losses)} | "
                     + (f"{statistics.mean(speeds):,.0f}" if speeds else "-") + " | "
                     + (f"{statistics.mean(minutes):.1f}" if minutes else "-") + " |")
    return lines


def plots(runs_by_variant: dict[str, list[dict]], directory: str) -> list[str]:
    """Stage-2 LM loss curves and test / cp_test accuracy bars; returns the files written (relative names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, runs in runs_by_variant.items():
        for n, run in enumerate(runs):
            if run["curve"]:
                steps, losses = zip(*run["curve"], strict=True)
                ax.plot(steps, losses, color=f"C{list(runs_by_variant).index(variant)}", alpha=0.8,
                        label=variant if n == 0 else None)
    ax.set(xlabel="global step", ylabel="answer-token LM loss (stage 2)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "loss.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    variants = list(runs_by_variant)
    for offset, split in ((-0.2, "test"), (0.2, "cp_test")):
        means = [statistics.mean([a for r in runs_by_variant[v] if (a := accuracy(r, split, "all")) is not None]
                                 or [0.0]) for v in variants]
        ax.bar([i + offset for i in range(len(variants))], means, width=0.4, label=split)
    ax.set_xticks(range(len(variants)), variants)
    ax.set(ylabel="exact-match accuracy (all questions)", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "accuracy.png"), dpi=120)
    plt.close(fig)
    return ["loss.png", "accuracy.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories or sweep directories")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--command", default="make ablation", help="what produced the runs, for the document")
    args = parser.parse_args()

    runs = [r for r in map(read_run, run_dirs(args.runs)) if r is not None]
    if not runs:
        raise SystemExit(f"no finished runs (config.yaml + eval/<last stage>.json) under {args.runs}")
    settings = defaultdict(set)
    for run in runs:
        settings[run["variant"]].add(run["setting"])
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: (r["variant"], r["setting"], r["seed"])):
        # a variant run with several settings is listed once per setting, named by its config digest
        name = run["variant"] if len(settings[run["variant"]]) == 1 else f"{run['variant']} ({run['setting']})"
        by_variant[name].append(run)
    figure_dir = os.path.splitext(args.out)[0]
    figures = plots(by_variant, figure_dir)
    relative = os.path.basename(figure_dir)
    lines = [
        "# Ablation results",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `benchmarks/ablation_report.py` from "
        f"{len(runs)} runs of `{args.command}` at commit {commit()}, on {machine()}.",
        "Each variant trains the demo recipe (experiment=demo) on the changing-priors train split and is evaluated by "
        "exact match on the standard test split (`test`) and the changing-priors test split (`cp_test`), overall "
        "and per question family; `a ± b` is the mean and standard deviation over seeds (runs whose configs differ "
        "in more than the seed are separate rows, named by a digest of their config).",
        "",
        *table(by_variant),
        "",
        *[f"![{name}]({relative}/{name})" for name in figures],
        "",
        "Runs: " + ", ".join(f"`{os.path.relpath(r['path'])}`" for r in runs),
        "",
    ]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(table(by_variant)))
    print(f"wrote {args.out} and {', '.join(os.path.join(figure_dir, n) for n in figures)}")


if __name__ == "__main__":
    main()
