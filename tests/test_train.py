"""End to end: the CLI trains the tiny model through both stages, as a Hydra multirun over every variant."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [
    "curriculum.stages.align.steps=3", "curriculum.stages.align.warmup_steps=1",
    "curriculum.stages.instruct.steps=3", "curriculum.stages.instruct.warmup_steps=1",
    "curriculum.stages.align.batch_size=4", "curriculum.stages.instruct.batch_size=2",
    "data.shuffle_buffer=20", "eval.max_samples=24", "logger.log_every=1",
]
VARIANTS = ["dense", "vanilla", "modality", "moiie", "asymoe"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="2", WANDB_SILENT="true", DS_ACCELERATOR="cpu")
    return env


@pytest.mark.slow
def test_multirun_trains_every_variant_through_both_stages(tmp_path, demo_data):
    sweep = tmp_path / "sweep"
    # DESIGN's loss weights (the demo turns order and evd off), so every auxiliary term runs; a stated device peak,
    # so MFU is logged on this CPU too
    cmd = [sys.executable, "-m", "asymoe_train.cli", "-m", "experiment=demo", f"model/moe={','.join(VARIANTS)}",
           f"data.root={demo_data}", f"hydra.sweep.dir={sweep}", "curriculum.stages.instruct.losses.order=0.2",
           "curriculum.stages.instruct.losses.evd=0.01", "logger.peak_tflops=0.5", *SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_env(), cwd=tmp_path,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dirs = sorted(d for d in glob.glob(str(sweep / "*")) if os.path.isdir(d))
    assert [os.path.basename(d).split("-", 1)[1] for d in run_dirs] == VARIANTS
    printed = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("run_dir: ")]
    assert sorted(printed) == run_dirs
    for run_dir, variant in zip(run_dirs, VARIANTS):
        assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
        for stage in ("align", "instruct"):
            assert os.path.isfile(os.path.join(run_dir, "checkpoints", stage, "model.safetensors"))
        report = json.load(open(os.path.join(run_dir, "eval", "instruct.json")))
        for split in ("test", "cp_test"):
            result = report["splits"][split]
            assert result["num_questions"] == 24
            families = {k for k in result["breakdown"] if k.startswith("family/")}
            assert families and families <= {"family/yes/no", "family/colour", "family/shape"}
            assert 0.0 <= result["accuracy"] <= 1.0
        metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        losses = [m["loss/lm"] for m in metrics if "loss/lm" in m]
        assert len(losses) == 6 and all(0 < x < 20 for x in losses)
        keys = {k for m in metrics for k in m}
        assert any(k.startswith("moe/") for k in keys) == (variant != "dense")
        speed = [m for m in metrics if "perf/mfu" in m]
        assert len(speed) == 6
        assert all(m["perf/model_tflops"] > 0 and m["perf/mfu"] == pytest.approx(m["perf/model_tflops"] / 0.5)
                   for m in speed)
        if variant == "asymoe":  # the AsyMoE observables of both MoE layers
            for layer in (1, 3):
                assert {f"moe/L{layer}/hyperbolic/curvature", f"moe/L{layer}/evidence/alpha_e0",
                        f"moe/L{layer}/text/s_evd_mean", f"moe/L{layer}/text/evidence_share"} <= keys
            assert {"loss/order", "loss/evd", "loss/balance"} <= keys
        assert glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))


@pytest.mark.slow
def test_counterfactual_evidence_loss_trains(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "asymoe_train.cli", "experiment=demo", "model/moe=asymoe", f"data.root={demo_data}",
           f"hydra.run.dir={run_dir}", "model.moe.evidence.loss_kind=counterfactual",
           "model.moe.evidence.counterfactual_every=1", "curriculum.stages.instruct.losses.evd=0.01",
           "logger.mode=disabled", *SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    counterfactual = [m["loss/evd_counterfactual"] for m in metrics if "loss/evd_counterfactual" in m]
    assert len(counterfactual) == 3 and all(x >= 0 for x in counterfactual)
    assert not any("loss/evd" in m for m in metrics)  # the routing form is off


@pytest.mark.slow
def test_init_from_starts_a_variant_from_another_runs_finished_stage(tmp_path, demo_data):
    """One align-only run feeds a variant's instruct stage (``init_from``): its steps equal those of the same variant
    trained through both stages in one run, exactly; a model that does not match the checkpoint is refused at start."""
    def train(*overrides: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "asymoe_train.cli", "experiment=demo", f"data.root={demo_data}",
               "logger.mode=disabled", *SHORT, *overrides]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path,
                              start_new_session=True)

    def steps(run_dir) -> list[tuple[int, float, float]]:
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        return [(m["step"], m["loss/lm"], m["grad_norm"]) for m in rows if m.get("stage") == 1]

    align = tmp_path / "align"
    proc = train("~curriculum.stages.instruct", f"hydra.run.dir={align}")  # the dense stage only (default variant)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    init = f"init_from={align}/checkpoints/align"
    proc = train("model/moe=asymoe", init, f"hydra.run.dir={tmp_path / 'from_align'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "from_align" / "checkpoints" / "align")  # that stage was not trained again
    assert json.load(open(tmp_path / "from_align" / "eval" / "instruct.json"))["splits"]["test"]["num_questions"]
    proc = train("model/moe=asymoe", f"hydra.run.dir={tmp_path / 'whole'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed, whole = steps(tmp_path / "from_align"), steps(tmp_path / "whole")
    assert [s for s, _, _ in resumed] == [4, 5, 6]  # the global step continues from the align run's
    assert resumed == whole  # bit for bit: the same weights, data, upcycling and routing
    proc = train("model.lm.intermediate_size=256", init, f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode != 0
    assert "model.lm" in proc.stdout + proc.stderr and "init_from" in proc.stdout + proc.stderr


ABLATION_VARIANTS = ("dense_matched", "vanilla", "modality", "moiie", "asymoe", "asymoe_paper")  # experiment=ablation


@pytest.mark.slow
def test_ablation_trains_every_variant_from_one_align_run_per_seed_and_writes_the_report(tmp_path, demo_data):
    """``make ablation``'s script on a tiny budget: per seed one align run, then the six variants' stage 2 from its
    checkpoint; the report has a row per variant with its seeds, the blind baseline, the paper's diagnostics, and the
    four plots."""
    root, out = tmp_path / "ablation", tmp_path / "docs" / "results.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ablation.py"), "--seeds", "0", "1", "--root", str(root),
           "--out", str(out), "--", f"data.root={demo_data}", "logger.mode=disabled", "eval.grounding_sequences=8",
           "eval.diagnostics_sequences=8", *SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=clean_env(), cwd=tmp_path,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for seed in (0, 1):
        align = root / f"align-seed{seed}" / "checkpoints" / "align"
        assert not (root / f"align-seed{seed}" / "checkpoints" / "instruct").exists()
        jobs = sorted((root / f"seed{seed}").glob("*-*"))
        assert [job.name.split("-", 1)[1] for job in jobs] == list(ABLATION_VARIANTS)
        for job in jobs:
            report = json.load(open(job / "eval" / "instruct.json"))
            assert f"init_from: {align}" in open(job / "config.yaml").read()
            assert not (job / "checkpoints" / "align").exists()
            mass = report["grounding"]["image_mass_per_layer"]
            assert len(mass) == 4 and all(0.0 <= m <= 1.0 for m in mass)
            diagnostics = report["diagnostics"]
            assert len(diagnostics["attention_entropy"]) == 4 and diagnostics["sequences"] == 8
            if job.name.endswith("asymoe_paper"):
                layer = diagnostics["layers"]["1"]
                assert set(layer["grounding_ratio"]) == {"vision0", "hyperbolic0", "text0", "evidence0"}
                assert 0.0 <= layer["grounding_ratio"]["evidence0"] <= 1.0
    text = out.read_text()
    results = next(chunk for chunk in text.split("\n\n") if chunk.startswith("| variant | seeds"))
    rows = {line.split(" | ")[0][2:]: line for line in results.splitlines()}
    for variant in ABLATION_VARIANTS:
        assert rows[variant].split(" | ")[1] == "0, 1"  # both seeds averaged in one row
    # the parameter counts of the last stage, read from the trainer's log: the dense baseline activates all of its own
    params = {v: rows[v].split(" | ")[2].split(" / ") for v in ABLATION_VARIANTS}
    assert all(re.fullmatch(r"[\d.]+[kM]", count) for pair in params.values() for count in pair), params
    assert params["dense_matched"][0] == params["dense_matched"][1] and params["vanilla"][0] != params["vanilla"][1]
    assert "blind (question prior)" in rows
    assert "**Grounding probe**" in text and "| asymoe | " in text.split("**Grounding probe**")[1]
    diagnostics = text.split("**The AsyMoE paper's diagnostics**")[1]
    assert "| asymoe_paper | 1 | evidence0 | " in diagnostics and "| asymoe | 3 | evidence0 | " in diagnostics
    assert "| dense_matched | " in diagnostics.split("entropy L0")[1]
    for plot in ("accuracy.png", "grounding.png", "loss.png", "diagnostics.png"):
        assert (tmp_path / "docs" / "results" / plot).stat().st_size > 1000
        assert f"](results/{plot})" in text
