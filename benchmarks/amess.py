"""``make amess``: the A-MESS demo (conf/experiment/amess_demo.yaml) with and without semantic synchronization over
seeds, then its table in docs/results.md.

Per seed: one run of stage 1 (align, generation on captions), then one Hydra multirun over the synchronization weight
(``curriculum.stages.classify.losses.sync``: 0 and ``--sync``) whose classify stage starts from that checkpoint
(``init_from``), so the two settings of a seed differ in nothing but the weight. The table (mean ± std over seeds)
replaces the section between ``<!-- amess:begin -->`` and ``<!-- amess:end -->`` of ``--out`` (appended when absent):
accuracy, macro-F1 and weighted-F1 over in-scope questions and out-of-scope F1, on the changing-priors test split
(``cp_test``) and the standard one (``test``, which also chooses the out-of-scope threshold). Each command is printed
before it runs; a failed one stops; rerunning with the same ``--root`` skips finished align runs.

    python benchmarks/amess.py --seeds 0 1 2 --out docs/results.md [-- hydra overrides for every run]
    python benchmarks/amess.py --report-only <root> --out docs/results.md   # the table from finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import datetime, timezone

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ablation import align_then_sweep  # noqa: E402
from paired_report import mean_spread  # noqa: E402

BEGIN, END = "<!-- amess:begin -->", "<!-- amess:end -->"
STAGE = "classify"
COLUMNS = (  # (header, split, metric path in the split's report)
    ("cp_test accuracy", "cp_test", ("accuracy",)),
    ("cp_test macro-F1", "cp_test", ("macro_f1",)),
    ("cp_test weighted-F1", "cp_test", ("weighted_f1",)),
    ("cp_test out-of-scope F1", "cp_test", ("open_set", "oos_f1")),
    ("cp_test in-scope accuracy (open set)", "cp_test", ("open_set", "in_scope_accuracy")),
    ("test accuracy", "test", ("accuracy",)),
    ("test macro-F1", "test", ("macro_f1",)),
    ("test out-of-scope F1", "test", ("open_set", "oos_f1")),
)


def finished_runs(root: str) -> list[dict]:
    """Every run below ``root`` with a classify evaluation: its seed, sync weight, config and per-split results."""
    runs = []
    for directory, _, files in sorted(os.walk(root)):
        report = os.path.join(directory, "eval", f"{STAGE}.json")
        if "config.yaml" not in files or not os.path.isfile(report):
            continue
        with open(os.path.join(directory, "config.yaml"), encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        with open(report, encoding="utf-8") as f:
            splits = json.load(f)["splits"]
        runs.append({"path": directory, "seed": cfg["seed"], "config": cfg, "splits": splits,
                     "sync": float(cfg["curriculum"]["stages"][STAGE]["losses"]["sync"])})
    return runs


def metric(splits: dict, split: str, path: tuple[str, ...]) -> float | None:
    value = splits.get(split, {})
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def verdict(rows: dict[float, list[dict]]) -> str:
    """Whether synchronization helped, per cp_test metric: the difference of the means, called a help (or a harm)
    only when it exceeds the larger of the two standard deviations."""
    if 0.0 not in rows or len(rows) < 2:
        return "Synchronization cannot be judged: the runs lack a setting with losses.sync=0 and one without."
    weight = max(w for w in rows if w)
    parts, helped, hurt = [], 0, 0
    for header, split, path in COLUMNS[:4]:
        with_, without = ([metric(r["splits"], split, path) for r in rows[w]] for w in (weight, 0.0))
        with_, without = [v for v in with_ if v is not None], [v for v in without if v is not None]
        if not with_ or not without:
            continue
        diff = statistics.mean(with_) - statistics.mean(without)
        spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (with_, without))
        helped += diff > spread
        hurt += -diff > spread
        parts.append(f"{header} {diff:+.3f} (spread {spread:.3f})")
    if helped and not hurt:
        call = "it helps here"
    elif hurt and not helped:
        call = "it hurts here"
    else:
        call = "it makes no difference beyond the seed-to-seed spread here" if not helped else "the picture is mixed"
    return (f"With (losses.sync={weight:g}) minus without, mean over seeds: {'; '.join(parts)}. A difference counts "
            f"only when larger than the larger standard deviation of the two settings: {call}.")


def table(runs: list[dict], command: str) -> str:
    """The docs section: the budget, one row per sync weight (mean ± std over seeds), and the verdict."""
    rows: dict[float, list[dict]] = {}
    for r in runs:
        rows.setdefault(r["sync"], []).append(r)
    cfg = runs[0]["config"]
    stages = cfg["curriculum"]["stages"]
    budget = ", ".join(f"{name} {s['steps']} steps x {s['batch_size']} samples (lr {s['lr']})"
                       for name, s in stages.items())
    labels = cfg["data"]["labels"]
    # imports torch: only when writing the report
    from ablation_report import log_stamps  # noqa: PLC0415
    from moe_block import commit, machine  # noqa: PLC0415

    def minutes(path: str) -> float | None:
        stamps = log_stamps(path)
        return (stamps[-1] - stamps[0]).total_seconds() / 60 if len(stamps) > 1 else None

    def align_dir(run: dict) -> str:  # <root>/seed<s>/<job> -> <root>/align-seed<s> (align_then_sweep's layout)
        return os.path.join(os.path.dirname(os.path.dirname(run["path"])), f"align-seed{run['seed']}")

    lines = [
        BEGIN,
        "## A-MESS: classification with anchor fusion and semantic synchronization",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `benchmarks/amess.py` from {len(runs)} runs of "
        f"`{command}` at commit {commit()}, on {machine()}.",
        "",
        f"easy-vqa as classification (`experiment=amess_demo`, variant {cfg['model']['moe']['variant']}, "
        f"`model.fusion={cfg['model']['fusion']}`): image + question -> one of the answers of `{labels}`, two of them "
        "held out as out-of-scope (never trained on). Trained on the changing-priors train split; accuracy, macro-F1 "
        "and weighted-F1 over in-scope questions; out-of-scope F1 with the threshold on "
        f"`{cfg['classify']['oos_score']}` chosen on `{cfg['classify']['oos_split']}`. Budget: {budget}; stage 1 is "
        "shared by both settings of a seed (`init_from`). `a ± b`: mean and standard deviation over seeds. "
        "Minutes: wall time of one training on this machine (first to last line of each run's train.log), stage 1 "
        "(one run per seed) + stage 2 (this setting's run), mean over seeds.",
        "",
        "| losses.sync | seeds | " + " | ".join(h for h, _, _ in COLUMNS) + " | minutes: align + classify |",
        "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |",
    ]
    for weight in sorted(rows):
        group = rows[weight]
        cells = [mean_spread([metric(r["splits"], split, path) for r in group]) for _, split, path in COLUMNS]
        seeds = ", ".join(str(s) for s in sorted(r["seed"] for r in group))
        stage1 = [m for r in group if (m := minutes(align_dir(r))) is not None]
        stage2 = [m for r in group if (m := minutes(r["path"])) is not None]
        wall = (f"{statistics.mean(stage1):.1f} + {statistics.mean(stage2):.1f}" if stage1 and stage2 else "-")
        lines.append(f"| {weight:g} | {seeds} | " + " | ".join(cells) + f" | {wall} |")
    lines += ["", verdict(rows), END]
    return "\n".join(lines)


def write_section(path: str, section: str) -> None:
    """Replace the marked section of ``path`` (append it when absent; create the file when missing)."""
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sync", type=float, default=0.5, help="losses.sync of the 'with' setting")
    parser.add_argument("--root", default=f"outputs/amess/{datetime.now():%Y%m%d-%H%M%S}",
                        help="directory of all the runs (default: outputs/amess/<time>)")
    parser.add_argument("--report-only", metavar="ROOT", help="only write the table from the runs under ROOT")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every run (after --)")
    args = parser.parse_args()
    command = "make amess" + (f" ARGS=\"{' '.join(args.overrides)}\"" if args.overrides else "")
    if args.report_only:
        write_section(args.out, table(finished_runs(os.path.abspath(args.report_only)), command))
        return

    root = os.path.abspath(args.root)
    align_then_sweep("amess_demo", args.seeds, root, args.overrides, STAGE,
                     sweep=(f"curriculum.stages.{STAGE}.losses.sync=0,{args.sync:g}",))
    runs = [r for r in finished_runs(root) if r["seed"] in args.seeds]
    write_section(args.out, table(runs, command))
    print(f"wrote the A-MESS table to {args.out} from {len(runs)} runs under {root}")


if __name__ == "__main__":
    main()
