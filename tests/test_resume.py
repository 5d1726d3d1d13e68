"""Checkpoints you can trust: real training processes are SIGKILLed mid-step, mid-save and right after a stage
boundary, resumed with ``resume=auto``, and must continue exactly: same loss at every step (1e-6), same samples,
none skipped or seen twice. SIGTERM saves at the next step boundary and exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from test_train import clean_env

from asymoe_train.checkpoint.store import CRASH_ENV, MARKER, TrainerState, complete_checkpoints

RUN = [
    "experiment=demo", "curriculum.stages.align.steps=4", "curriculum.stages.align.warmup_steps=1",
    "curriculum.stages.instruct.steps=8", "curriculum.stages.instruct.warmup_steps=2",
    "curriculum.stages.align.batch_size=4", "curriculum.stages.instruct.batch_size=2",
    "eval.max_samples=8", "logger.log_every=1", "logger.progress=false", "checkpoint.every_steps=2",
    "checkpoint.keep_last=2", "data.record_keys=true", "data.augment=dihedral",
]
TIMEOUT = 240


DATA_ROOT: list[str] = []  # data.root of the demo shards, set by the ``data_root`` fixture


@pytest.fixture(autouse=True, scope="module")
def data_root(demo_data):
    DATA_ROOT[:] = [demo_data]


def command(run_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "asymoe_train.cli", *RUN, f"data.root={DATA_ROOT[0]}", f"hydra.run.dir={run_dir}",
            *extra]


def train(run_dir, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(run_dir, *extra), capture_output=True, text=True, timeout=TIMEOUT,
                          env={**clean_env(), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_until(run_dir, ready, *extra: str) -> None:
    """Start a run and SIGKILL it as soon as ``ready()`` holds."""
    proc = subprocess.Popen(command(run_dir, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=clean_env())
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ready():
            assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def history(run_dir) -> tuple[dict, dict]:
    """Per step, the last logged LM loss and the sample keys of each micro-batch (a resumed run logs the steps after
    its checkpoint again; the later record is the one that counts)."""
    losses, keys = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss/lm" in record:
                losses[record["step"]] = record["loss/lm"]
    with open(os.path.join(run_dir, "data_keys", "rank0.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            keys[record["stage"], record["step"], record["micro"]] = record["keys"]
    return losses, keys


def logged_steps(run_dir, stage: str) -> set[int]:
    path = os.path.join(run_dir, "data_keys", "rank0.jsonl")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        lines = f.read().splitlines()
    return {json.loads(line)["step"] for line in lines[:-1] if json.loads(line)["stage"] == stage}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_data):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(run_dir)
    return history(run_dir)


def assert_same_run(run_dir, reference) -> None:
    losses, keys = history(run_dir)
    ref_losses, ref_keys = reference
    assert sorted(losses) == sorted(ref_losses) == list(range(1, 13))
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, abs=1e-6, rel=0), f"step {step}"
    assert keys == ref_keys
    seen = Counter(key for (stage, _, _), batch in keys.items() if stage == "instruct" for key in batch)
    assert sum(seen.values()) == 8 * 2  # every instruct sample of the 8 steps, in order


@pytest.mark.slow
def test_resume_after_a_kill_mid_step_continues_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    train_until(run_dir, lambda: 5 in logged_steps(run_dir, "instruct"), "logger.mode=offline")
    state, path = complete_checkpoints(run_dir)[-1]
    assert state.stage == "instruct" and state.step >= 4 and not state.stage_done
    assert state.data_position and state.layout["world_size"] == 1 and state.config_hash
    proc = train(run_dir, "resume=auto", "logger.mode=offline")
    assert f"resuming from {path}: stage instruct, step {state.step}" in proc.stdout
    assert_same_run(run_dir, reference)
    # the W&B run continues under its id: one id in every checkpoint, one offline run directory per process
    ids = {TrainerState.load(p).wandb_id for _, p in complete_checkpoints(run_dir)}
    (run_id,) = ids
    runs = [d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-")]
    assert run_id and len(runs) == 2 and all(d.endswith(run_id) for d in runs)


@pytest.mark.slow
def test_resume_after_a_kill_mid_save_uses_the_last_complete_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = subprocess.run(command(run_dir), capture_output=True, text=True, timeout=TIMEOUT,
                          env={**clean_env(), CRASH_ENV: "instruct-step0000004"})
    assert proc.returncode == -signal.SIGKILL
    partial = run_dir / "checkpoints" / ".tmp-instruct-step0000004"
    assert (partial / "model.safetensors").is_file() and not (partial / MARKER).exists()
    state, _ = complete_checkpoints(run_dir)[-1]
    assert (state.stage, state.step) == ("instruct", 2)  # the interrupted save is ignored
    train(run_dir, "resume=auto")
    assert not partial.exists()  # leftovers are cleaned once a newer checkpoint is published
    assert_same_run(run_dir, reference)
    # keep_last=2: of the mid-stage checkpoints only the newest two remain; stage ends always stay
    names = sorted(os.listdir(run_dir / "checkpoints"))
    assert names == ["align", "instruct", "instruct-step0000004", "instruct-step0000006"]


@pytest.mark.slow
def test_resume_after_a_kill_right_after_a_stage_boundary(tmp_path, reference):
    run_dir = tmp_path / "run"
    evaluated = "curriculum.stages.align.eval=true"  # the kill lands before the stage's evaluation
    train_until(run_dir, lambda: (run_dir / "checkpoints" / "align" / MARKER).is_file(), evaluated)
    state, _ = complete_checkpoints(run_dir)[-1]
    assert state.stage == "align" and state.stage_done
    assert not os.path.isfile(run_dir / "eval" / "align.json")
    proc = train(run_dir, "resume=auto", evaluated)
    assert "stage align" in proc.stdout and "== stage align" not in proc.stdout  # align is not trained again
    assert_same_run(run_dir, reference)
    assert os.path.isfile(run_dir / "eval" / "align.json")  # evaluated on resume


@pytest.mark.slow
def test_evaluation_during_training_changes_nothing_and_resumes_exactly(tmp_path, reference):
    """eval.every_steps evaluates mid-stage on rank 0 and logs it; the losses and samples of every step are those of
    the run without it (the reference), across a kill and resume=auto too."""
    run_dir, every = tmp_path / "run", "eval.every_steps=3"
    train_until(run_dir, lambda: 5 in logged_steps(run_dir, "instruct"), every)
    train(run_dir, "resume=auto", every)
    assert_same_run(run_dir, reference)
    with open(run_dir / "metrics.jsonl") as f:
        evaluated = {r["step"]: r for r in map(json.loads, f) if "eval/test/all" in r and "loss/lm" not in r}
    # instruct steps 3 and 6 (global 7 and 10; align does not evaluate) and its end (global 12)
    assert sorted(evaluated) == [7, 10, 12]
    assert all(0.0 <= r["eval/test/all"] <= 1.0 and "eval/cp_test/all" in r for r in evaluated.values())


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir, "checkpoint.every_steps=0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    deadline = time.monotonic() + TIMEOUT
    while 2 not in logged_steps(run_dir, "instruct"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-2000:]
    state, path = complete_checkpoints(run_dir)[-1]
    assert state.stage == "instruct" and 3 <= state.step < 8 and not state.stage_done
    assert "received SIGTERM" in out and f"checkpoint {path}" in out and "resume=auto" in out
    train(run_dir, "resume=auto", "checkpoint.every_steps=0")
    assert_same_run(run_dir, reference)


def test_checkpoint_files_load_without_unpickling_code(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    train(run_dir, "curriculum.stages.instruct.steps=2", "curriculum.stages.instruct.warmup_steps=0",
          "curriculum.stages.align.eval=false", "curriculum.stages.instruct.eval=false",
          "data.record_keys=false")
    for _, path in complete_checkpoints(run_dir):
        for name in os.listdir(path):
            if name.endswith(".pt"):
                torch.load(os.path.join(path, name), weights_only=True)  # raises on anything but plain data
        assert not [n for n in os.listdir(path) if n.endswith((".bin", ".pkl"))]
