"""The ablation report: a table and three plots from finished runs (``make ablation`` writes docs/results.md and
docs/results/).

Reads each run directory's resolved ``config.yaml``, ``eval/<last stage>.json`` (accuracy per split and family, and
the grounding probe when ``eval.grounding_sequences`` is set), ``metrics.jsonl`` and ``train.log`` (what every run
writes, see README "Run directory"); a directory without ``config.yaml`` stands for the run directories below it
(sweeps, one per seed). Runs of the same variant and setting (e.g. seeds) are averaged, with the spread shown. The
blind baseline is computed here from the runs' data: every question gets the answer the training split most often
gives to the same question text (``asymoe_train.evaluation.vqa.question_prior_baseline``), on the same questions.

    python benchmarks/ablation_report.py outputs/ablation/20261123-050000 --out docs/results.md
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
from ablation_diagnostics import diagnostics_plot, diagnostics_tables  # noqa: E402
from moe_block import commit, machine  # noqa: E402
from paired_report import mean_spread, paired_section, pope_plot, pope_splits, pope_table  # noqa: E402

# easy-vqa's; a report takes its splits (POPE splits aside) and families from the runs (accuracy_columns)
FAMILIES = ("all", "family/colour", "family/shape", "family/yes/no")
SPLITS = ("test", "cp_test")
# the trainer's line at the start of each stage ("stage <name>: ... upcycled model: total 3.18M, activated per token
# 2.30M; ..."): the last one is the last stage's
PARAMS = re.compile(r" model: total ([\d.]+[kMB]?), activated per token ([\d.]+[kMB]?)")
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")
BLIND = "blind (question prior)"


def run_dirs(paths: list[str]) -> list[str]:
    """Run directories among ``paths``: a directory with a config.yaml, or the run directories below it."""
    found = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "config.yaml")):
            found.append(path)
        elif os.path.isdir(path):
            found.extend(run_dirs(sorted(os.path.join(path, d) for d in os.listdir(path)
                                         if os.path.isdir(os.path.join(path, d)))))
    return found


def log_stamps(path: str) -> list[datetime]:
    log_path = os.path.join(path, "train.log")
    if not os.path.isfile(log_path):
        return []
    with open(log_path, encoding="utf-8") as f:
        return [datetime.fromisoformat(m.group(1)) for m in map(STAMP.match, f) if m]


def read_run(path: str) -> dict | None:
    """The facts of one finished run, or None when it has no final evaluation (e.g. an align-only run)."""
    with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    stages = list(cfg["curriculum"]["stages"])
    eval_path = os.path.join(path, "eval", f"{stages[-1]}.json")
    if not os.path.isfile(eval_path):
        return None
    with open(eval_path, encoding="utf-8") as f:
        report = json.load(f)
    # runs whose configs differ in more than seed, run_dir and the checkpoint they start from are different settings
    setting = {k: v for k, v in cfg.items() if k not in ("seed", "run_dir", "init_from")}
    digest = hashlib.sha1(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:6]
    run = {"path": path, "config": cfg, "variant": cfg["model"]["moe"]["variant"], "setting": digest,
           "seed": cfg["seed"], "splits": report["splits"],
           "grounding": report.get("grounding", {}).get("image_mass_per_layer"),
           "diagnostics": report.get("diagnostics"),
           "curve": [], "params": ("-", "-"), "minutes": None, "tokens_per_s": []}
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("stage") == len(stages) - 1 and "loss/lm" in row:
                    run["curve"].append((row["step"], row["loss/lm"]))
                    run["tokens_per_s"].append(row.get("perf/tokens_per_s", 0.0))
    if os.path.isfile(os.path.join(path, "train.log")):
        with open(os.path.join(path, "train.log"), encoding="utf-8") as f:
            found = [m.groups() for m in map(PARAMS.search, f) if m]
        run["params"] = found[-1] if found else ("-", "-")
    stamps = log_stamps(path)
    if len(stamps) > 1:
        run["minutes"] = (stamps[-1] - stamps[0]).total_seconds() / 60
    return run


def blind_baseline(run: dict) -> dict:
    """The question-prior baseline on the run's training source (its last stage's) and eval splits and questions."""
    from omegaconf import OmegaConf

    from asymoe_train.config.schema import TrainConfig
    from asymoe_train.data.pipeline import qa_turns, shard_files, stream_spec
    from asymoe_train.evaluation.vqa import question_prior_baseline

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), run["config"]))
    last = list(cfg.curriculum.stages.values())[-1]
    train_urls = stream_spec(cfg.data, cfg.data.sources[last.source], 0).urls
    return {split: question_prior_baseline(qa_turns(train_urls), qa_turns(shard_files(cfg.data, pattern)),
                                           cfg.eval.max_samples)
            for split, pattern in cfg.data.eval_sources.items()}


def accuracy(splits: dict, split: str, family: str) -> float | None:
    cell = splits.get(split, {}).get("breakdown", {}).get(family)
    return cell["accuracy"] if cell else None


def accuracies(runs: list[dict], split: str, family: str) -> list[float]:
    return [a for r in runs if (a := accuracy(r["splits"], split, family)) is not None]


def accuracy_columns(runs: list[dict]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The non-POPE eval splits and the families (``all`` first) the runs report."""
    pope = set(pope_splits(runs))
    splits = tuple(dict.fromkeys(s for r in runs for s in r["splits"] if s not in pope))
    families = {k for r in runs for s in splits for k in r["splits"].get(s, {}).get("breakdown", {})}
    return splits, ("all", *sorted(families - {"all"}))


def table(runs_by_variant: dict[str, list[dict]], blind: dict, splits=SPLITS, families=FAMILIES) -> list[str]:
    columns = [f"{split} {family.replace('family/', '')}" for split in splits for family in families]
    lines = ["| variant | seeds | params: activated / total | " + " | ".join(columns)
             + " | final LM loss | stage-2 tokens/s | stage-2 minutes |",
             "| --- " * (6 + len(columns)) + "|"]
    for variant, runs in runs_by_variant.items():
        cells = [mean_spread(accuracies(runs, split, family)) for split in splits for family in families]
        losses = [r["curve"][-1][1] for r in runs if r["curve"]]
        speeds = [statistics.mean(r["tokens_per_s"]) for r in runs if r["tokens_per_s"]]
        minutes = [r["minutes"] for r in runs if r["minutes"] is not None]
        total, activated = runs[0]["params"]
        lines.append(f"| {variant} | {', '.join(str(r['seed']) for r in runs)} | {activated} / {total} | "
                     + " | ".join(cells) + f" | {mean_spread(losses)} | "
                     + (f"{statistics.mean(speeds):,.0f}" if speeds else "-") + " | "
                     + (f"{statistics.mean(minutes):.1f}" if minutes else "-") + " |")
    cells = [f"{a:.3f}" if (a := accuracy(blind, split, family)) is not None else "-"
             for split in splits for family in families]
    lines.append(f"| {BLIND} | - | - | " + " | ".join(cells) + " | - | - | - |")
    return lines


def plots(runs_by_variant: dict[str, list[dict]], blind: dict, directory: str, splits=SPLITS,
          families=FAMILIES) -> list[str]:
    """Accuracy (overall per split, and the last split per family) with the blind baseline, the grounding probe per
    layer, the stage-2 LM loss curves, and POPE F1 when there are POPE splits; returns the files written (relative
    names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    variants = list(runs_by_variant)
    written = []

    def stats(runs, split, family):
        values = accuracies(runs, split, family) or [0.0]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    groups = [("overall", [(split, "all") for split in splits]),
              (f"{splits[-1]} per family", [(splits[-1], family) for family in families[1:]])]
    for ax, (title, cells) in zip(axes, groups, strict=True):
        width = 0.8 / len(variants)
        for v, variant in enumerate(variants):
            mean_err = [stats(runs_by_variant[variant], split, family) for split, family in cells]
            ax.bar([i - 0.4 + width * (v + 0.5) for i in range(len(cells))], [m for m, _ in mean_err], width,
                   yerr=[e for _, e in mean_err], capsize=2, label=variant, color=f"C{v}")
        for i, (split, family) in enumerate(cells):
            if (a := accuracy(blind, split, family)) is not None:
                ax.hlines(a, i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                          label=BLIND if i == 0 else None)
        ax.set_xticks(range(len(cells)), [f"{s} {f.replace('family/', '')}" for s, f in cells])
        ax.set(title=title, ylim=(0, 1))
    axes[0].set_ylabel("exact-match accuracy (mean ± std over seeds)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "accuracy.png"), dpi=120)
    plt.close(fig)
    written.append("accuracy.png")

    probed = {v: [r["grounding"] for r in runs if r["grounding"]] for v, runs in runs_by_variant.items()}
    if any(probed.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for v, (variant, curves) in enumerate(probed.items()):
            if curves:
                layers = range(len(curves[0]))
                means = [statistics.mean(c[i] for c in curves) for i in layers]
                errors = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in layers]
                ax.errorbar(list(layers), means, yerr=errors, marker="o", capsize=3, label=variant, color=f"C{v}")
        ax.set(xlabel="decoder layer", ylabel="attention mass on image tokens",
               title="grounding probe: answer-predicting positions")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "grounding.png"), dpi=120)
        plt.close(fig)
        written.append("grounding.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for v, (variant, runs) in enumerate(runs_by_variant.items()):
        for n, run in enumerate(runs):
            if run["curve"]:
                steps, losses = zip(*run["curve"], strict=True)
                ax.plot(steps, losses, color=f"C{v}", alpha=0.8, label=variant if n == 0 else None)
    ax.set(xlabel="global step", ylabel="answer-token LM loss (stage 2)", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "loss.png"), dpi=120)
    plt.close(fig)
    written.append("loss.png")
    if pope_plot(runs_by_variant, os.path.join(directory, "pope.png")):
        written.append("pope.png")
    return written


def grounding_table(runs_by_variant: dict[str, list[dict]]) -> list[str]:
    probed = {v: [r["grounding"] for r in runs if r["grounding"]] for v, runs in runs_by_variant.items()}
    probed = {v: c for v, c in probed.items() if c}
    if not probed:
        return []
    layers = len(next(iter(probed.values()))[0])
    lines = ["| variant | " + " | ".join(f"layer {i}" for i in range(layers)) + " |", "| --- " * (layers + 1) + "|"]
    for variant, curves in probed.items():
        lines.append(f"| {variant} | " + " | ".join(mean_spread([c[i] for c in curves]) for i in range(layers)) + " |")
    return lines


def data_description(run: dict, splits: tuple[str, ...]) -> str:
    """What the runs train on and are scored on, from the config."""
    cfg = run["config"]
    if cfg["data"]["name"] == "easy_vqa":
        return ("Each variant is trained on the easy-vqa changing-priors train split and evaluated by exact match on "
                "the standard test split (`test`) and the changing-priors test split (`cp_test`, where the answer "
                "priors of training no longer hold), overall and per question family.")
    source = list(cfg["curriculum"]["stages"].values())[-1]["source"]
    return (f"Each variant is trained on the {cfg['data']['name']} `{source}` source and evaluated by exact match on "
            + ", ".join(f"`{s}`" for s in splits) + ", overall and per question family.")


def budget(run: dict) -> str:
    """The step budget of a run, in words, from its config."""
    cfg = run["config"]
    stages = ", ".join(f"{name} {s['steps']} steps x {s['batch_size']} samples (lr {s['lr']})"
                       for name, s in cfg["curriculum"]["stages"].items())
    ev = cfg["eval"]
    questions = f"the first {ev['max_samples']} questions of each split" if ev["max_samples"] else "every question"
    probe = (f"; grounding probe on the first {ev['grounding_sequences']} labelled sequences of the first split"
             if ev.get("grounding_sequences") else "")
    return f"{stages}; evaluation on {questions}{probe}"


def kept_sections(path: str) -> list[str]:
    """Sections other reports own in ``path`` (``make amess``'s, between its markers), to keep when rewriting it."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    begin, end = "<!-- amess:begin -->", "<!-- amess:end -->"
    if begin not in text or end not in text:
        return []
    return [text[text.index(begin): text.index(end) + len(end)], ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, or directories holding them")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--command", default="make ablation", help="what produced the runs, for the document")
    parser.add_argument("--reference", nargs="+", default=["vanilla"],
                        help="the variants every other is compared with, paired over seeds and questions (one table "
                             "each)")
    args = parser.parse_args()

    all_dirs = run_dirs(args.runs)
    runs = [r for r in map(read_run, all_dirs) if r is not None]
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
    blind = blind_baseline(runs[0])
    stamps = sorted(s for d in all_dirs for s in log_stamps(d))
    wall = (stamps[-1] - stamps[0]).total_seconds() / 60 if len(stamps) > 1 else None
    aligned = sorted({r["config"].get("init_from") for r in runs if r["config"].get("init_from")})
    figure_dir = os.path.splitext(args.out)[0]
    splits, families = accuracy_columns(runs)
    figures = plots(by_variant, blind, figure_dir, splits, families)
    figures += diagnostics_plot(by_variant, figure_dir)
    relative = os.path.basename(figure_dir)
    lines = [
        "# Ablation results",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `benchmarks/ablation_report.py` from "
        f"{len(runs)} runs of `{args.command}` at commit {commit()}, on {machine()}"
        + (f"; the whole command took {wall:.0f} minutes (first log line to last)." if wall else "."),
        "",
        data_description(runs[0], splits) + " `a ± b` is the mean and standard deviation over "
        "seeds; runs whose configs differ in more than the seed are separate rows, named by a digest of their config. "
        f"The `{BLIND}` row answers every question with the training split's most common answer to the same question "
        "text (the family's for a text never seen), without the image: what answer priors alone earn.",
        "",
        f"**Step budget** (every run): {budget(runs[0])}."
        + (f" The stage before the last is trained once per seed and shared by every variant of that seed "
           f"(`init_from`, {len(aligned)} such runs): the variants differ in nothing but `model/moe`."
           if aligned else ""),
        "",
        *table(by_variant, blind, splits, families),
        "",
        *[f"![{name}]({relative}/{name})" for name in figures],
        "",
    ]
    probe = grounding_table(by_variant)
    if probe:
        lines += ["**Grounding probe** (per decoder layer: the attention mass that answer-predicting positions put on "
                  "image tokens, mean over heads and positions; `asymoe_train/evaluation/probe.py`):", "", *probe, ""]
    diagnostics = diagnostics_tables(by_variant)
    if diagnostics:
        lines += ["**The AsyMoE paper's diagnostics** (`asymoe_train/evaluation/diagnostics.py`; teacher-forced on "
                  "the first split's labelled sequences): per MoE layer and expert, F(E_k) = the share of the attention "
                  "mass of the tokens routed to it that lands on evidence (image and prompt) rather than memory "
                  "(special and answer) positions; R_k = (f_intact - f_blanked) / (f_intact + f_blanked), f its share "
                  "of its router's assignments with the image intact and blanked (positive: chosen more when there "
                  "is evidence); and the attention entropy per decoder layer:", "", *diagnostics, ""]
    pope = pope_table(by_variant)
    if pope:
        lines += ["**POPE** (yes/no existence questions on held-out images, half about objects that are there; the absent "
                  "ones sampled at random, among the most frequent training objects (popular), or among those that "
                  "co-occur most in training with the image's objects (adversarial); positive class: yes; mean ± std "
                  "over seeds):", "", *pope, ""]
    for reference in args.reference:
        lines += paired_section(by_variant, reference)
    lines += ["Runs: " + ", ".join(f"`{os.path.relpath(r['path'])}`" for r in runs), ""]
    lines += kept_sections(args.out)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(table(by_variant, blind, splits, families)))
    print(f"wrote {args.out} and {', '.join(os.path.join(figure_dir, n) for n in figures)}")


if __name__ == "__main__":
    main()
