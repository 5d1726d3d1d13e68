"""The classification task mode end to end: experiment=amess_demo trains and evaluates with every MoE variant, and a
run killed mid-step in its classify stage resumes exactly (the description encodings are part of the checkpoint)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_train import clean_env

from asymoe_train.checkpoint.store import complete_checkpoints

SHORT = [
    "experiment=amess_demo", "curriculum.stages.align.steps=2", "curriculum.stages.align.warmup_steps=1",
    "curriculum.stages.align.batch_size=4", "curriculum.stages.classify.batch_size=2", "eval.max_samples=24",
    "logger.log_every=1", "logger.progress=false", "data.shuffle_buffer=20",
]
RESUME = [*SHORT, "curriculum.stages.classify.steps=8", "curriculum.stages.classify.warmup_steps=2",
          "checkpoint.every_steps=2", "data.record_keys=true", "sync.refresh_steps=3", "logger.mode=disabled"]
TIMEOUT = 300
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_NAME = "classify"


def command(demo_data, run_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "asymoe_train.cli", *RESUME, f"data.root={demo_data}", f"hydra.run.dir={run_dir}",
            *extra]


def history(run_dir) -> tuple[dict, dict]:
    """Per step the last logged loss terms; per (stage, step, micro) the sample keys."""
    losses, keys = {}, {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        record = json.loads(line)
        if "loss/total" in record:
            losses[record["step"]] = {k: v for k, v in record.items() if k.startswith("loss/")}
    for line in open(os.path.join(run_dir, "data_keys", "rank0.jsonl")):
        record = json.loads(line)
        keys[record["stage"], record["step"], record["micro"]] = record["keys"]
    return losses, keys


def classify_steps_logged(run_dir) -> set[int]:
    path = os.path.join(run_dir, "data_keys", "rank0.jsonl")
    if not os.path.isfile(path):
        return set()
    lines = open(path).read().splitlines()[:-1]  # the last line may be half written
    return {json.loads(line)["step"] for line in lines if json.loads(line)["stage"] == "classify"}


def assert_same_steps(run_dir, reference, steps) -> None:
    """The run logged the reference's loss terms at ``steps`` (1e-6) and read the same samples."""
    (losses, keys), (ref_losses, ref_keys) = history(run_dir), history(reference)
    assert sorted(losses) == list(steps)
    for step in steps:
        assert set(losses[step]) == set(ref_losses[step])
        for name, value in ref_losses[step].items():
            assert losses[step][name] == pytest.approx(value, abs=1e-6, rel=0), f"step {step} {name}"
    assert all(keys[k] == ref_keys[k] for k in keys)
    report = json.load(open(run_dir / "eval" / "classify.json"))
    assert report == json.load(open(reference / "eval" / "classify.json"))


@pytest.mark.slow
def test_classify_stage_resumes_exactly(tmp_path, demo_data):
    """Descriptions are encoded at classify steps 0, 3 and 6: the step-4 checkpoint holds step 3's encodings, which
    steps 4 and 5 use. Resumed from it, and after a SIGKILL mid-step with resume=auto, the run continues exactly."""
    reference = tmp_path / "uninterrupted"
    proc = subprocess.run(command(demo_data, reference, "checkpoint.keep_last=10"), capture_output=True, text=True,
                          timeout=TIMEOUT, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses, _ = history(reference)
    assert sorted(ref_losses) == list(range(1, 11))  # 2 align + 8 classify steps
    assert all({"loss/ce", "loss/sync"} <= set(ref_losses[step]) for step in range(3, 11))

    from_four = tmp_path / "from_step4"
    checkpoint = reference / "checkpoints" / "classify-step0000004"
    proc = subprocess.run(command(demo_data, from_four, f"resume={checkpoint}"), capture_output=True, text=True,
                          timeout=TIMEOUT, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_steps(from_four, reference, range(7, 11))

    run_dir = tmp_path / "killed"
    killed = subprocess.Popen(command(demo_data, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=clean_env())
    deadline = time.monotonic() + TIMEOUT
    try:
        while 4 not in classify_steps_logged(run_dir):  # past the step-4 checkpoint
            assert killed.poll() is None, killed.stderr.read()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)
    finally:
        killed.kill()
        killed.wait()
    state, _ = complete_checkpoints(run_dir)[-1]
    assert state.stage == "classify" and state.step >= 4 and not state.stage_done
    proc = subprocess.run(command(demo_data, run_dir, "resume=auto"), capture_output=True, text=True,
                          timeout=TIMEOUT, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_steps(run_dir, reference, range(1, 11))


@pytest.mark.slow
def test_amess_demo_trains_and_evaluates_every_variant(tmp_path, demo_data):
    variants = ["dense", "vanilla", "modality", "moiie", "asymoe"]
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "asymoe_train.cli", "-m", *SHORT, f"model/moe={','.join(variants)}",
           f"data.root={demo_data}", f"hydra.sweep.dir={sweep}", "curriculum.stages.classify.steps=2",
           "curriculum.stages.classify.warmup_steps=1", "logger.mode=disabled", "model.head.combine=attention"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=clean_env(), cwd=tmp_path,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dirs = sorted(d for d in glob.glob(str(sweep / "*")) if os.path.isdir(d))
    assert [os.path.basename(d).split("-", 1)[1] for d in run_dirs] == variants
    for run_dir in run_dirs:
        report = json.load(open(os.path.join(run_dir, "eval", "classify.json")))
        assert report["task"] == "classify" and len(report["classes"]) == 11
        for split in ("test", "cp_test"):
            result = report["splits"][split]
            assert result["num_questions"] + result["num_out_of_scope"] == 24
            assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1
            assert 0 <= result["open_set"]["oos_f1"] <= 1
        metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        classify = [m for m in metrics if m.get("stage") == 1]
        assert len(classify) == 2 and all(m["loss/ce"] > 0 and m["loss/sync"] >= 0 for m in classify)


def load_amess_script():
    from conftest import _load_file

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # amess.py imports its sibling moe_block for the header
    return _load_file("amess_script", os.path.join(ROOT, "benchmarks", "amess.py"))


def fake_log(directory, minutes: float) -> None:
    """A train.log whose first and last lines are ``minutes`` apart (the report's wall time)."""
    os.makedirs(directory, exist_ok=True)
    end = 60 * minutes
    (directory / "train.log").write_text(f"[2026-12-05 00:00:00,000][x][INFO] - start\n"
                                         f"[2026-12-05 00:{int(end // 60):02d}:{int(end % 60):02d},500][x][INFO] - done\n")


def fake_run(directory, seed: int, sync: float, cp: tuple[float, float, float, float], minutes: float = 0.0) -> None:
    os.makedirs(directory / "eval")
    if minutes:
        fake_log(directory, minutes)
    cfg = {"seed": seed, "data": {"labels": "labels.yaml"}, "model": {"fusion": "anchors", "moe": {"variant": "x"}},
           "classify": {"oos_score": "description", "oos_split": "test"},
           "curriculum": {"stages": {"align": {"steps": 1, "batch_size": 2, "lr": 0.1},
                                     "classify": {"steps": 3, "batch_size": 4, "lr": 0.2, "losses": {"sync": sync}}}}}
    (directory / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    split = {"accuracy": cp[0], "macro_f1": cp[1], "weighted_f1": cp[2],
             "open_set": {"oos_f1": cp[3], "in_scope_accuracy": cp[0]}}
    (directory / "eval" / "classify.json").write_text(json.dumps({"splits": {"cp_test": split, "test": split}}))


def test_amess_table_is_the_mean_and_spread_over_seeds_and_replaces_its_section(tmp_path):
    script = load_amess_script()
    runs = tmp_path / "runs"  # align_then_sweep's layout: <root>/align-seed<s> and <root>/seed<s>/<job>
    fake_log(runs / "align-seed0", 3.0)
    fake_log(runs / "align-seed1", 5.0)
    fake_run(runs / "seed0" / "0-a", 0, 0.0, (0.5, 0.4, 0.45, 0.1), minutes=6.0)
    fake_run(runs / "seed1" / "0-b", 1, 0.0, (0.7, 0.6, 0.65, 0.3), minutes=8.0)
    fake_run(runs / "seed0" / "1-c", 0, 0.5, (0.9, 0.8, 0.85, 0.9), minutes=9.0)
    fake_run(runs / "seed1" / "1-d", 1, 0.5, (0.9, 0.8, 0.85, 0.7))  # no log: its mean is the other seed's
    out = tmp_path / "results.md"
    out.write_text("# Ablation results\n\nkept\n")
    for _ in range(2):  # a second report replaces the first
        script.write_section(str(out), script.table(script.finished_runs(str(tmp_path / "runs")), "make amess"))
    text = out.read_text()
    assert text.startswith("# Ablation results\n\nkept\n") and text.count(script.BEGIN) == 1
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| 0")}
    # without: accuracy 0.5, 0.7 -> 0.600 ± 0.141 (sample std); out-of-scope F1 0.1, 0.3 -> 0.200 ± 0.141
    assert rows["0"][1] == "0, 1" and rows["0"][2] == "0.600 ± 0.141" and rows["0"][5] == "0.200 ± 0.141"
    assert rows["0.5"][2] == "0.900 ± 0.000" and rows["0.5"][5] == "0.800 ± 0.141"
    # minutes: align 3 and 5 -> 4.0; classify 6 and 8 -> 7.0; with sync only seed 0 logged its classify stage: 9.0
    assert rows["0"][-1] == "4.0 + 7.0 |" and rows["0.5"][-1] == "4.0 + 9.0 |"
    # with - without: accuracy +0.300 > spread 0.141, ... out-of-scope F1 +0.600
    assert "cp_test accuracy +0.300 (spread 0.141)" in text and "it helps here" in text


@pytest.mark.slow
def test_make_amess_runs_both_settings_from_one_align_run_and_writes_the_table(tmp_path, demo_data):
    root, out = tmp_path / "amess", tmp_path / "results.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "amess.py"), "--seeds", "0", "--root", str(root),
           "--out", str(out), "--", f"data.root={demo_data}", "logger.mode=disabled", *SHORT[1:],
           "curriculum.stages.classify.steps=2", "curriculum.stages.classify.warmup_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=clean_env(), cwd=tmp_path,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (root / "align-seed0" / "checkpoints" / STAGE_NAME).exists()
    jobs = sorted((root / "seed0").glob("*-*"))
    assert len(jobs) == 2 and all(f"init_from: {root}/align-seed0/checkpoints/align" in (j / "config.yaml").read_text()
                                  for j in jobs)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 0")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 0.5"]


def test_the_ablation_report_keeps_the_amess_section(tmp_path):
    from conftest import _load_file

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    report = _load_file("ablation_report_script", os.path.join(ROOT, "benchmarks", "ablation_report.py"))
    path = tmp_path / "results.md"
    assert report.kept_sections(str(path)) == []
    path.write_text("# Ablation results\nold\n<!-- amess:begin -->\n| 0 | x |\n<!-- amess:end -->\ntrailing\n")
    assert report.kept_sections(str(path)) == ["<!-- amess:begin -->\n| 0 | x |\n<!-- amess:end -->", ""]


@pytest.mark.distributed
@pytest.mark.slow
def test_classify_on_two_ranks_with_ep2_and_zero2_matches_one_process(tmp_path, demo_data):
    """A classify stage (synchronization on, descriptions refreshed every 2 steps through the expert-parallel
    blocks, the LM head unused) by 2 processes with EP=2 and ZeRO-2 has the per-step cross-entropy and gradient norm
    of 1 process at the same global batch: both losses are normalised by the global sample count."""
    from test_ep import GRAD_NORM_RTOL, LOSS_TOLERANCE, run_group, torchrun
    from test_ep import env as ep_env

    common = ["-m", "asymoe_train.cli", *SHORT, "model/moe=moiie", f"data.root={demo_data}", "logger.mode=disabled",
              "curriculum.stages.classify.steps=6", "curriculum.stages.classify.warmup_steps=1",
              "curriculum.stages.classify.eval=false", "sync.refresh_steps=2", "data.augment=dihedral"]
    one = run_group([sys.executable, *common, f"hydra.run.dir={tmp_path / 'one'}",
                     "curriculum.stages.align.batch_size=8", "curriculum.stages.classify.batch_size=8"], ep_env())
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    two = torchrun(2, *common, f"hydra.run.dir={tmp_path / 'two'}", "curriculum.stages.align.batch_size=4",
                   "curriculum.stages.classify.batch_size=4", "engine.ep_size=2", "engine.zero_stage=2")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]

    def steps(run_dir) -> dict[int, dict]:
        return {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r.get("stage") == 1}

    ones, twos = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert sorted(ones) == sorted(twos) == list(range(3, 9))
    for step in ones:
        assert twos[step]["loss/ce"] == pytest.approx(ones[step]["loss/ce"], abs=LOSS_TOLERANCE), step
        assert twos[step]["grad_norm"] == pytest.approx(ones[step]["grad_norm"], rel=GRAD_NORM_RTOL), step
        assert "loss/sync" in twos[step]
