"""The ablation report on the scenes data: its accuracy columns come from the runs, the POPE table, and the paired
differences against the reference variant, from run directories written as evaluation writes them (eval/<stage>.json
and eval/<stage>-questions.jsonl) with predictions chosen here, so every number is known in advance."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, load_recipe, unload_recipe
from omegaconf import OmegaConf

from asymoe_train.config.schema import CurriculumConfig, DataConfig, StageConfig, TrainConfig
from asymoe_train.data.pipeline import qa_turns, shard_files
from asymoe_train.evaluation.report import write_report
from asymoe_train.evaluation.vqa import Tally

EVAL = {"test": "qa-test-*.tar", "pope_random": "qa-pope_random-*.tar", "pope_adversarial": "qa-pope_adversarial-*.tar"}


def fake_run(run_dir: str, data: DataConfig, variant: str, seed: int, predict) -> None:
    """A finished run's config.yaml and evaluation, ``predict(split, n, answer)`` answering question n of a split."""
    stages = {"align": StageConfig(source="captions", steps=1), "instruct": StageConfig(source="qa", steps=1)}
    cfg = TrainConfig(experiment="ablation_scenes", seed=seed, run_dir=run_dir, data=data,
                      curriculum=CurriculumConfig(stages=stages))
    cfg.model.moe.variant = variant
    os.makedirs(run_dir)
    OmegaConf.save(OmegaConf.structured(cfg), os.path.join(run_dir, "config.yaml"))
    results, questions = {}, {}
    for split, pattern in EVAL.items():
        tally = Tally()
        for n, (_, answer, meta) in enumerate(qa_turns(shard_files(data, pattern))):
            tally.add(predict(split, n, answer), answer, meta)
        results[split] = {**tally.report(), "num_samples": 0, "skipped": {}}
        questions[split] = tally.questions
    write_report(run_dir, "instruct", {"stage": "instruct", "step": 2, "splits": results}, questions)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    scenes = load_recipe("scenes")
    scenes.build(root / "scenes", train_images=60, test_images=30, pope_images=40)
    unload_recipe(scenes)
    data = DataConfig(name="scenes", root=str(root / "scenes"), template="plain",
                      sources={"captions": "captions-train-*.tar", "qa": "qa-train-*.tar"}, eval_sources=EVAL)

    def half_right(split, n, answer):  # test: every other question right; POPE: always "yes"
        return "yes" if split.startswith("pope") else (answer if n % 2 else "wrong")

    def grounded(split, n, answer):  # the same on test, every POPE question right
        return answer if split.startswith("pope") else half_right(split, n, answer)

    for seed in (0, 1):
        fake_run(str(root / "runs" / f"vanilla-{seed}"), data, "vanilla", seed, half_right)
        fake_run(str(root / "runs" / f"asymoe-{seed}"), data, "asymoe", seed, grounded)
    out = root / "docs" / "results.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ablation_report.py"),
                           str(root / "runs"), "--out", str(out), "--reference", "vanilla", "asymoe"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out.read_text(), root


def chunk(text: str, start: str) -> list[list[str]]:
    """The cells of each row of the markdown table that starts with ``start``."""
    table = next(c for c in text.split("\n\n") if c.startswith(start)).splitlines()
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]


def test_accuracy_columns_come_from_the_runs(report):
    text, _ = report
    header = chunk(text, "| variant | seeds | params")[0]
    assert "test existence" in header and "test position" in header and "cp_test" not in header
    assert "pope" not in header  # POPE splits have a table of their own


def test_pope_table(report):
    text, root = report
    rows = {cells[0]: cells for cells in chunk(text, "| variant | seeds | random f1")}
    header = rows["variant"]
    vanilla, asymoe = rows["vanilla"], rows["asymoe"]
    # always "yes" on half-yes questions: precision 0.5, recall 1, F1 2/3, yes-ratio 1; the grounded one is perfect
    assert vanilla[header.index("random f1")] == "0.667 ± 0.000"
    assert vanilla[header.index("adversarial yes_ratio")] == "1.000 ± 0.000"
    assert asymoe[header.index("adversarial f1")] == "1.000 ± 0.000"
    assert asymoe[header.index("random yes_ratio")] == "0.500 ± 0.000"
    assert (root / "docs" / "results" / "pope.png").stat().st_size > 1000


def test_paired_differences_against_the_reference(report):
    text, _ = report
    header, _, *rows = chunk(text, "| variant | seeds | test all")
    (row,) = [cells for cells in rows if cells[0] == "asymoe"]
    assert row[1] == "2"  # both seeds paired
    # identical predictions on test: exactly zero, not significant
    assert row[header.index("test all")] == "+0.000 [+0.000, +0.000] n.s."
    # POPE F1 2/3 -> 1 on every seed: the difference is 1/3 and significant
    assert row[header.index("random F1")].startswith("**+0.333 [")
    assert "Significant at 95 %: asymoe on random F1 (+0.333); asymoe on adversarial F1 (+0.333)." in text


def test_one_paired_table_per_reference(report):
    text, _ = report
    assert text.count("**Paired differences against `") == 2
    against_asymoe = text.split("**Paired differences against `asymoe`**")[1]
    header, _, *rows = chunk(against_asymoe, "| variant | seeds | test all")
    (row,) = rows  # vanilla, the one other variant, now minus asymoe
    assert row[0] == "vanilla" and row[header.index("random F1")].startswith("**-0.333 [")
    assert "Significant at 95 %: vanilla on random F1 (-0.333); vanilla on adversarial F1 (-0.333)." in against_asymoe
