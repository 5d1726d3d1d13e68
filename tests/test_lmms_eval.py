"""Opt-in: ``lmms_eval --model asymoe_train`` on a local task built from the scenes shards, offline.

lmms-eval is too heavy a dependency for the test environment (``pip install -e ".[lmms]"`` pulls torchvision and
with it another torch, datasets, accelerate, and an older wandb: about 2 minutes of pip on 2 CPU cores with a warm
cache), so it lives in an environment of its own::

    python3.11 -m venv .venv-lmms && .venv-lmms/bin/pip install -e ".[lmms]"
    ASYMOE_LMMS_EVAL=1 ASYMOE_LMMS_PYTHON=.venv-lmms/bin/python .venv/bin/python -m pytest tests/test_lmms_eval.py

(``ASYMOE_LMMS_PYTHON`` defaults to the test's own interpreter.) An exported tiny model answers a POPE task through
lmms-eval; every logged response must be the answer ``asymoe_train.generate`` gives to the same image and question,
and lmms-eval's aggregated metrics those of ``asymoe_train.evaluation.pope`` on them. About 30 seconds.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import load_recipe, unload_recipe
from test_train import clean_env

from asymoe_train import generate, load_pretrained
from asymoe_train.evaluation.lmms_task import write_task
from asymoe_train.evaluation.pope import pope_metrics
from asymoe_train.evaluation.vqa import normalise
from asymoe_train.export import export

PYTHON = os.path.abspath(os.environ.get("ASYMOE_LMMS_PYTHON", sys.executable))
TASK = "scenes_pope_adversarial"


def _has_lmms_eval() -> bool:
    return subprocess.run([PYTHON, "-c", "import lmms_eval"], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("ASYMOE_LMMS_EVAL") != "1", reason="opt-in: set ASYMOE_LMMS_EVAL=1"),
]


def test_lmms_eval_runs_the_exported_model_on_a_local_scenes_task(tmp_path):
    if not _has_lmms_eval():
        pytest.skip(f"{PYTHON} cannot import lmms_eval: pip install -e '.[lmms]' there, or set ASYMOE_LMMS_PYTHON")
    from test_export import fake_run

    scenes = load_recipe("scenes")
    data = tmp_path / "scenes"
    scenes.build(data, train_images=120, test_images=20, pope_images=10)
    unload_recipe(scenes)
    run_dir = str(tmp_path / "run")
    fake_run("moiie", str(data), run_dir)
    model_dir = export(run_dir)
    task = write_task(str(data / "qa-pope_adversarial-*.tar"), str(tmp_path / "tasks"), TASK, max_questions=24)

    out = tmp_path / "lmms"
    env = {**clean_env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([PYTHON, "-m", "lmms_eval", "--model", "asymoe_train", "--model_args",
                           f"pretrained={model_dir}", "--tasks", TASK, "--include_path", task, "--batch_size", "1",
                           "--output_path", str(out), "--log_samples"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (samples_file,) = glob.glob(str(out / "**" / f"*samples_{TASK}.jsonl"), recursive=True)
    (results_file,) = glob.glob(str(out / "**" / "*results.json"), recursive=True)
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
    docs = [json.loads(line) for line in open(os.path.join(task, "questions.jsonl"))]
    assert [s["doc_id"] for s in samples] == list(range(len(docs))) and len(docs) == 24

    model, tokenizer, meta = load_pretrained(model_dir)
    answers = [generate(model, tokenizer, meta, doc["image"], doc["question"]) for doc in docs]
    assert [s["filtered_resps"] for s in samples] == answers  # lmms-eval got exactly the model's greedy answers
    said = [normalise(a) == "yes" for a in answers]
    truth = [doc["answer"] == "yes" for doc in docs]
    ours = pope_metrics(said, truth)
    results = json.load(open(results_file))["results"][TASK]
    assert results["pope_f1,none"] == pytest.approx(ours["f1"])
    assert results["yes_ratio,none"] == pytest.approx(ours["yes_ratio"])
    assert results["exact_match,none"] == pytest.approx(
        sum(normalise(a) == normalise(d["answer"]) for a, d in zip(answers, docs, strict=True)) / len(docs))
