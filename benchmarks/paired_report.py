"""The ablation report's POPE table and paired differences against a reference variant (``ablation_report.py``).

POPE: per variant and POPE split (a split whose ``eval/<stage>.json`` entry has ``pope``), F1, accuracy, precision,
recall and yes-ratio, mean ± std over seeds.

Paired differences: per variant, against ``--reference`` (default vanilla), the mean over the seeds both ran of
metric(variant) - metric(reference), with a 95 % interval from a paired bootstrap over seeds and questions
(``asymoe_train.evaluation.paired``), on each run's per-question outcomes (``eval/<stage>-questions.jsonl``). Metrics:
accuracy per non-POPE split, overall and per family, and F1 per POPE split. An interval that holds 0 is reported as no
significant difference.
"""

from __future__ import annotations

import json
import os
import statistics

import numpy as np

POPE_COLUMNS = ("f1", "accuracy", "precision", "recall", "yes_ratio")


def mean_spread(values: list[float | None]) -> str:
    """Mean ± sample standard deviation of the values that are not None, at 3 decimals (the one value alone; "-"
    for none): every table cell of the reports."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def pope_splits(runs: list[dict]) -> list[str]:
    """The POPE splits of the runs, in evaluation order."""
    return list(dict.fromkeys(split for r in runs for split, result in r["splits"].items() if "pope" in result))


def pope_table(runs_by_variant: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: variant x (POPE split, metric), mean ± std over seeds; empty without POPE splits."""
    splits = pope_splits([r for runs in runs_by_variant.values() for r in runs])
    if not splits:
        return []
    columns = [f"{split.removeprefix('pope_')} {metric}" for split in splits for metric in POPE_COLUMNS]
    lines = ["| variant | seeds | " + " | ".join(columns) + " |", "| --- " * (2 + len(columns)) + "|"]
    for variant, runs in runs_by_variant.items():
        cells = []
        for split in splits:
            rows = [row for r in runs for row in r["splits"].get(split, {}).get("pope", {}).values()]
            cells += [mean_spread([row[metric] for row in rows]) for metric in POPE_COLUMNS]
        lines.append(f"| {variant} | {', '.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    return lines


def pope_plot(runs_by_variant: dict[str, list[dict]], path: str) -> bool:
    """POPE F1 and yes-ratio per setting and variant (mean ± std over seeds) to ``path``; False without POPE."""
    splits = pope_splits([r for runs in runs_by_variant.values() for r in runs])
    if not splits:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    width = 0.8 / len(runs_by_variant)
    for ax, metric in zip(axes, ("f1", "yes_ratio"), strict=True):
        for v, (variant, runs) in enumerate(runs_by_variant.items()):
            values = [[row[metric] for r in runs for row in r["splits"].get(split, {}).get("pope", {}).values()]
                      for split in splits]
            means = [statistics.mean(x) if x else 0.0 for x in values]
            errors = [statistics.stdev(x) if len(x) > 1 else 0.0 for x in values]
            ax.bar([i - 0.4 + width * (v + 0.5) for i in range(len(splits))], means, width, yerr=errors, capsize=2,
                   label=variant, color=f"C{v}")
        ax.set_xticks(range(len(splits)), [s.removeprefix("pope_") for s in splits])
        ax.set(title=f"POPE {metric}", ylim=(0, 1))
    axes[1].axhline(0.5, color="k", linestyle="dashed", linewidth=1)  # the share of questions whose answer is yes
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def question_outcomes(run: dict) -> dict[str, list[dict]] | None:
    """The run's per-question records per split (``eval/<last stage>-questions.jsonl``), None if it has none."""
    stage = list(run["config"]["curriculum"]["stages"])[-1]
    path = os.path.join(run["path"], "eval", f"{stage}-questions.jsonl")
    if not os.path.isfile(path):
        return None
    by_split: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            by_split.setdefault(record["split"], []).append(record)
    return by_split


def _outcomes(records: list[dict], metric: str, family: str | None):
    """Per-question arrays of one run and split: 0/1 correct (``accuracy``, over ``family`` or all) or
    (said yes, is yes) pairs (``f1``)."""
    from asymoe_train.evaluation.vqa import normalise

    chosen = [r for r in records if family is None or r["family"] == family]
    if metric == "f1":
        return np.array([[normalise(r["prediction"]) == "yes", normalise(r["answer"]) == "yes"] for r in chosen])
    return np.array([int(r["correct"]) for r in chosen])


def paired_differences(runs_by_variant: dict[str, list[dict]], reference: str, resamples: int = 2000):
    """``(columns, {variant: {column: Difference}}, note)``: every variant against ``reference`` on the seeds both
    ran, for each metric their per-question outcomes allow; ``note`` says why there is nothing, else ""."""
    from asymoe_train.evaluation.paired import accuracy, paired_bootstrap, pope_f1

    if reference not in runs_by_variant:
        return [], {}, f"no runs of the reference variant `{reference}` (--reference)"
    outcomes = {(variant, r["seed"]): question_outcomes(r) for variant, runs in runs_by_variant.items() for r in runs}
    ref_runs = {r["seed"]: outcomes[reference, r["seed"]] for r in runs_by_variant[reference]
                if outcomes[reference, r["seed"]] is not None}
    if not ref_runs:
        return [], {}, f"the `{reference}` runs have no per-question outcomes (eval/<stage>-questions.jsonl)"
    some = next(iter(ref_runs.values()))
    metrics = []  # (column, split, metric, family)
    for split, records in some.items():
        if any("pope" in r for r in records):
            metrics.append((f"{split.removeprefix('pope_')} F1" if split.startswith("pope_") else f"{split} F1",
                            split, "f1", None))
            continue
        metrics.append((f"{split} all", split, "accuracy", None))
        metrics += [(f"{split} {family}", split, "accuracy", family)
                    for family in sorted({r["family"] for r in records})]
    functions = {"accuracy": accuracy, "f1": pope_f1}
    table: dict[str, dict] = {}
    for variant, runs in runs_by_variant.items():
        if variant == reference:
            continue
        seeds = [r["seed"] for r in runs if outcomes[variant, r["seed"]] is not None and r["seed"] in ref_runs]
        if not seeds:
            continue
        table[variant] = {}
        for column, split, metric, family in metrics:
            pairs = [(outcomes[variant, s].get(split), ref_runs[s].get(split)) for s in seeds]
            if any(v is None or r is None or [q["answer"] for q in v] != [q["answer"] for q in r] for v, r in pairs):
                continue  # not the same questions: nothing to pair
            variant_SQ = np.stack([_outcomes(v, metric, family) for v, _ in pairs])
            reference_SQ = np.stack([_outcomes(r, metric, family) for _, r in pairs])
            if variant_SQ.shape[1]:
                table[variant][column] = paired_bootstrap(variant_SQ, reference_SQ, functions[metric], resamples)
    return [m[0] for m in metrics], table, ""


def paired_section(runs_by_variant: dict[str, list[dict]], reference: str) -> list[str]:
    """The markdown section: a table of differences with their intervals, and which are significant, in words."""
    columns, table, note = paired_differences(runs_by_variant, reference)
    title = f"**Paired differences against `{reference}`**"
    if note or not table:
        return [f"{title}: none ({note or 'no variant shares seeds and questions with it'}).", ""]
    lines = [f"{title} (mean over the seeds both ran of variant minus `{reference}`, with a 95 % interval from a "
             "paired bootstrap over seeds and questions; **bold**: the interval excludes 0, n.s.: no significant "
             "difference):", "",
             "| variant | seeds | " + " | ".join(columns) + " |", "| --- " * (2 + len(columns)) + "|"]
    significant = []
    for variant, cells in table.items():
        seeds = next(iter(cells.values())).seeds if cells else 0
        row = []
        for column in columns:
            d = cells.get(column)
            if d is None:
                row.append("-")
            elif d.significant:
                row.append(f"**{d}**")
                significant.append(f"{variant} on {column} ({d.mean:+.3f})")
            else:
                row.append(f"{d} n.s.")
        lines.append(f"| {variant} | {seeds} | " + " | ".join(row) + " |")
    lines += ["", ("Significant at 95 %: " + "; ".join(significant) + ". Every other difference is not significant."
                   if significant else f"No variant differs significantly from `{reference}` on any metric."), ""]
    return lines
