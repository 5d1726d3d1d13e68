"""Two gloo processes on CPU (torchrun), always under a hard timeout that kills the whole process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
from test_resume import RUN, history
from test_train import clean_env

from asymoe_train.training.checkpoint import TrainerState, complete_checkpoints

TIMEOUT = 300


def run_group(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a command in its own session; on timeout kill every process of it (no orphaned ranks)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{args[:6]} did not finish within {TIMEOUT} s")
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def torchrun(nproc: int, run_dir, data_root: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return run_group([*launcher, "-m", "asymoe_train.cli", *RUN, f"data.root={data_root}", f"hydra.run.dir={run_dir}",
                      *extra], env)


def keys_by_rank(run_dir) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for name in sorted(os.listdir(run_dir / "data_keys")):
        with open(run_dir / "data_keys" / name) as f:
            keys[name] = [key for line in f for key in json.loads(line)["keys"]]
    return keys


@pytest.mark.distributed
def test_two_ranks_train_and_resume_on_one_rank(tmp_path, demo_data):
    two = tmp_path / "two"
    proc = torchrun(2, two, demo_data, "curriculum.stages.instruct.eval=false")
    assert proc.stdout.count("run_dir: ") == 1  # rank 0 reports; one run directory for the job
    state, path = complete_checkpoints(two)[-1]
    assert state.stage_done and state.layout["world_size"] == 2
    by_rank = keys_by_rank(two)
    assert sorted(by_rank) == ["rank0.jsonl", "rank1.jsonl"]
    # each rank read its own micro-batches: 4 x 4 captions and 8 x 2 QA images
    assert [len(keys) for keys in by_rank.values()] == [4 * 4 + 8 * 2] * 2
    assert by_rank["rank0.jsonl"] != by_rank["rank1.jsonl"]
    # every rank ran every step: the per-step metrics exist once per global step
    losses, _ = history(two)
    assert sorted(losses) == list(range(1, 13))

    # the mid-stage checkpoint of the 2-rank run continues on 1 rank (ZeRO-0: the optimizer state is whole)
    mid = next(p for s, p in complete_checkpoints(two) if s.stage == "instruct" and s.step == 4)
    saved = TrainerState.load(mid)
    assert len(saved.data_position) == 8  # both ranks' streams, gathered
    one = tmp_path / "one"
    proc = torchrun(1, one, demo_data, f"resume={mid}", "curriculum.stages.instruct.eval=false")
    assert f"resuming from {mid}: stage instruct, step 4" in proc.stdout
    losses_one, keys_one = history(one)
    assert sorted(losses_one) == list(range(9, 13))  # global steps after the checkpoint
    # each stream continued where the 2-rank run left it: the 1-rank run's samples are new to every stream, and its
    # final positions account for the samples of both runs up to the checkpoint plus its own
    final = TrainerState.load(complete_checkpoints(one)[-1][1]).data_position
    taken = {s: final[s][2] - saved.data_position.get(s, (0, 0, 0))[2] for s in final}
    consumed = Counter(k for (stage, _, _), batch in keys_one.items() if stage == "instruct" for k in batch)
    assert sum(taken.values()) == sum(consumed.values()) == 4 * 2
