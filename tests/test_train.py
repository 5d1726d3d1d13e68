"""End to end: the CLI trains the tiny model through both stages, as a Hydra multirun over every variant."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

SHORT = [
    "curriculum.stages.align.steps=3", "curriculum.stages.align.warmup_steps=1",
    "curriculum.stages.instruct.steps=3", "curriculum.stages.instruct.warmup_steps=1",
    "curriculum.stages.align.batch_size=4", "curriculum.stages.instruct.batch_size=2",
    "data.shuffle_buffer=20", "eval.max_samples=24", "logger.log_every=1",
]
VARIANTS = ["dense", "vanilla", "modality", "moiie"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="2", WANDB_SILENT="true", DS_ACCELERATOR="cpu")
    return env


@pytest.mark.slow
def test_multirun_trains_every_variant_through_both_stages(tmp_path, demo_data):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "asymoe_train.cli", "-m", "experiment=demo", f"model/moe={','.join(VARIANTS)}",
           f"data.root={demo_data}", f"hydra.sweep.dir={sweep}", *SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_env(), cwd=tmp_path,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dirs = sorted(glob.glob(str(sweep / "*")))
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
        moe_keys = {k for m in metrics for k in m if k.startswith("moe/")}
        assert bool(moe_keys) == (variant != "dense")
        assert glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
