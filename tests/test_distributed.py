"""Two gloo processes on CPU (torchrun), always under a hard timeout that kills the whole process group
(:func:`run_group`, which tests/test_ep.py and tests/test_reshard.py launch with too).

The data streams of a job on 2 ranks, and of its checkpoint resumed on 1 rank. The launches are the short demo runs
of tests/test_ep.py (session fixtures of conftest.py: ``demo_two_ranks``, the demo trained by 2 processes with EP=2
and ZeRO-2, and ``demo_resumed``, whose 2-process run with EP=2 and ZeRO-0 checkpoints after instruct step 15 and is
resumed from there by 1 process), so these checks cost no launch of their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter

import pytest
from test_resume import history

from asymoe_train.checkpoint.store import TrainerState, complete_checkpoints

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


def keys_by_rank(run_dir) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for name in sorted(os.listdir(run_dir / "data_keys")):
        with open(run_dir / "data_keys" / name) as f:
            keys[name] = [key for line in f for key in json.loads(line)["keys"]]
    return keys


@pytest.mark.distributed
def test_two_ranks_train_and_resume_on_one_rank(demo_two_ranks, demo_resumed):
    """2 ranks train from scratch: one run directory, every global step once, each rank its own micro-batches, and
    checkpoints holding both ranks' stream positions. A mid-stage checkpoint of 2 ranks (ZeRO-0) continues on 1 rank
    exactly where every stream left off: the samples it reads account for all the stream positions advanced."""
    two = demo_two_ranks.run_dir
    assert demo_two_ranks.proc.stdout.count("run_dir: ") == 1  # rank 0 reports; one run directory for the job
    state, path = complete_checkpoints(two)[-1]
    assert state.stage_done and state.layout["world_size"] == 2
    by_rank = keys_by_rank(two)
    assert sorted(by_rank) == ["rank0.jsonl", "rank1.jsonl"]
    # each rank read its own micro-batches: 3 x 4 captions and 20 x 4 QA images
    assert [len(keys) for keys in by_rank.values()] == [3 * 4 + 20 * 4] * 2
    assert by_rank["rank0.jsonl"] != by_rank["rank1.jsonl"]
    # every rank ran every step: the per-step metrics exist once per global step
    losses, _ = history(two)
    assert sorted(losses) == list(range(1, 24))
    # a mid-stage checkpoint of this run (fresh on 2 ranks: each rank holds only its own streams) has them all
    mid = [TrainerState.load(p) for s, p in complete_checkpoints(two) if s.stage == "instruct" and not s.stage_done]
    assert mid and all(len(saved.data_position) == 8 for saved in mid)  # both ranks' streams, gathered

    # the mid-stage checkpoint of a 2-rank run continues on 1 rank (ZeRO-0: the optimizer state is whole)
    mid = demo_resumed.written
    saved = TrainerState.load(mid)
    assert saved.layout["world_size"] == 2 and not saved.stage_done
    assert len(saved.data_position) == 8
    one = demo_resumed.one
    assert f"resuming from {mid}: stage instruct, step 15" in demo_resumed.one_proc.stdout
    losses_one, keys_one = history(one)
    assert sorted(losses_one) == list(range(19, 24))  # global steps after the checkpoint (3 align + 15)
    # each stream continued where the 2-rank run left it: the 1-rank run's samples are new to every stream, and its
    # final positions account for the samples of both runs up to the checkpoint plus its own
    final = TrainerState.load(complete_checkpoints(one)[-1][1]).data_position
    taken = {s: final[s][2] - saved.data_position.get(s, (0, 0, 0))[2] for s in final}
    consumed = Counter(k for (stage, _, _), batch in keys_one.items() if stage == "instruct" for k in batch)
    assert sum(taken.values()) == sum(consumed.values()) == 5 * 8
