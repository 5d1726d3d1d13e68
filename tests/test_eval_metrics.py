"""POPE metrics, the paired bootstrap of the ablation report, and the local lmms-eval task, on cases checked by hand
or against closed forms."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import yaml
from conftest import load_recipe, unload_recipe

from asymoe_train.data.pipeline import qa_turns
from asymoe_train.evaluation.lmms_task import pope_f1, process_results, read_turns, write_task
from asymoe_train.evaluation.paired import accuracy, paired_bootstrap
from asymoe_train.evaluation.paired import pope_f1 as pope_f1_SQ
from asymoe_train.evaluation.pope import pope_metrics
from asymoe_train.evaluation.vqa import Tally


def test_pope_metrics_by_hand():
    # truth: 4 yes, 4 no; predictions: 3 of the yes found (TP 3, FN 1), 2 false alarms (FP 2, TN 2)
    truth = [True] * 4 + [False] * 4
    said = [True, True, True, False, True, True, False, False]
    m = pope_metrics(said, truth)
    assert m["accuracy"] == 5 / 8 and m["precision"] == 3 / 5 and m["recall"] == 3 / 4
    assert m["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4)) and m["yes_ratio"] == 5 / 8
    assert m["count"] == 8
    nothing = pope_metrics([False] * 4, [True, False, True, False])  # never says yes: no precision, no F1
    assert (nothing["precision"], nothing["recall"], nothing["f1"], nothing["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)


def test_tally_reports_pope_per_setting_on_normalised_answers():
    tally = Tally()
    for prediction, answer, setting in [("Yes.", "yes", "random"), ("no", "yes", "random"), (" yes", "no", "random"),
                                        ("no", "no", "popular"), ("blue", "yes", "popular")]:
        tally.add(prediction, answer, {"family": "existence", "pope": setting})
    tally.add("two", "two", {"family": "counting"})  # not a POPE turn
    report = tally.report()
    assert report["pope"]["random"] == pope_metrics([True, False, True], [True, True, False])
    # "blue" is not "yes": it counts as a no, as POPE scores it
    assert report["pope"]["popular"] == pope_metrics([False, False], [False, True])
    assert report["breakdown"]["all"]["count"] == 6 and len(tally.questions) == 6
    assert [q.get("pope") for q in tally.questions] == ["random"] * 3 + ["popular"] * 2 + [None]
    assert [q["correct"] for q in tally.questions] == [True, False, False, True, False, True]


def test_bootstrap_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(1)
    correct = rng.integers(0, 2, (3, 200))
    d = paired_bootstrap(correct, correct.copy(), resamples=300)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0) and not d.significant


def test_bootstrap_of_a_constant_shift_is_that_shift():
    rng = np.random.default_rng(2)
    scores = rng.random((3, 100))
    d = paired_bootstrap(scores + 0.25, scores, resamples=300)
    assert d.mean == pytest.approx(0.25) and d.low == pytest.approx(0.25) and d.high == pytest.approx(0.25)
    assert d.significant


def test_bootstrap_interval_matches_the_closed_form_of_a_one_sided_disagreement():
    # one seed, 400 questions: the variant is right on 40 questions the reference gets wrong and agrees elsewhere, so
    # the per-question difference is 1 w.p. p = 0.1 and the resampled mean difference has sd sqrt(p (1 - p) / Q)
    q, extra = 400, 40
    reference = np.zeros((1, q), dtype=int)
    reference[0, 200:] = 1
    variant = reference.copy()
    variant[0, :extra] = 1
    d = paired_bootstrap(variant, reference, resamples=4000, seed=3)
    sd = math.sqrt(0.1 * 0.9 / q)
    assert d.mean == pytest.approx(0.1)
    assert d.low == pytest.approx(0.1 - 1.96 * sd, abs=0.004) and d.high == pytest.approx(0.1 + 1.96 * sd, abs=0.004)
    assert d.significant
    # 3 wins and 2 losses in 20 questions are within noise: the interval holds 0
    reference, variant = np.zeros((1, 20), dtype=int), np.zeros((1, 20), dtype=int)
    variant[0, :3] = 1
    reference[0, 3:5] = 1
    small = paired_bootstrap(variant, reference, resamples=2000)
    assert small.mean == pytest.approx(0.05) and small.low < 0 < small.high and not small.significant


def test_bootstrap_resamples_seeds_too():
    # per-question outcomes agree within each seed, but the variant wins on seed 0 and loses on seed 1: the mean
    # difference is 0 and the seed draws alone spread the interval to about +-0.5
    variant = np.array([[1] * 50, [0] * 50])
    reference = np.array([[0] * 50, [1] * 50])
    d = paired_bootstrap(variant, reference, resamples=2000)
    assert d.mean == 0.0 and d.low == pytest.approx(-1.0) and d.high == pytest.approx(1.0)


def test_bootstrap_recomputes_f1_on_each_resample():
    said = np.array([[1, 1, 0, 0]])
    truth = np.array([[1, 0, 1, 0]])
    both = np.stack([said, truth], -1)
    assert pope_f1_SQ(both)[0] == pytest.approx(pope_metrics([1, 1, 0, 0], [1, 0, 1, 0])["f1"])
    d = paired_bootstrap(both, both, metric=pope_f1_SQ, resamples=50)
    assert (d.low, d.high) == (0.0, 0.0)
    assert accuracy(np.array([[1, 0, 1, 1]]))[0] == 0.75


@pytest.fixture(scope="module")
def scenes_data(tmp_path_factory):
    module = load_recipe("scenes")
    out = tmp_path_factory.mktemp("scenes") / "scenes"
    module.build(out, train_images=60, test_images=10, pope_images=8)
    unload_recipe(module)
    return out


def test_lmms_task_holds_every_turn_in_evaluation_order(scenes_data, tmp_path):
    pattern = str(scenes_data / "qa-pope_popular-*.tar")
    task = write_task(pattern, str(tmp_path), "scenes_pope_popular", max_questions=20)
    docs = [json.loads(line) for line in open(os.path.join(task, "questions.jsonl"))]
    shards = sorted(str(p) for p in scenes_data.glob("qa-pope_popular-*.tar"))
    turns = list(read_turns(shards))
    # the order and text of the turns the trainer's evaluation reads
    assert [(q, a) for _, _, q, a, _ in turns] == [(q, a) for q, a, _ in qa_turns(shards)]
    assert len(docs) == 20 and [d["question_id"] for d in docs] == list(range(20))
    for doc, (key, png, question, answer, meta) in zip(docs, turns, strict=False):
        assert (doc["question"], doc["answer"], doc["pope"], doc["family"]) == (question, answer, "popular",
                                                                                meta["family"])
        assert "<image>" not in doc["question"] and open(doc["image"], "rb").read() == png
        assert os.path.basename(doc["image"]) == f"{key}.png"
    # the YAML (lmms-eval's !function tags read as plain strings here) names the local file and the task's functions
    yaml.SafeLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.safe_load(open(os.path.join(task, "scenes_pope_popular.yaml")))
    assert config["task"] == "scenes_pope_popular" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == os.path.join(task, "questions.jsonl")
    assert config["output_type"] == "generate_until" and config["process_results"] == "utils.process_results"
    assert "from asymoe_train.evaluation.lmms_task import" in open(os.path.join(task, "utils.py")).read()


def test_lmms_task_scores_as_evaluation_does():
    docs = [{"answer": "yes"}, {"answer": "yes"}, {"answer": "no"}, {"answer": "no"}]
    predictions = ["Yes.", "no", "yes", "No"]
    results = [process_results(doc, [p]) for doc, p in zip(docs, predictions, strict=True)]
    assert [r["exact_match"] for r in results] == [1.0, 0.0, 0.0, 1.0]
    assert [r["yes_ratio"] for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert pope_f1([r["pope_f1"] for r in results]) == pytest.approx(0.5)  # TP 1, FP 1, FN 1
