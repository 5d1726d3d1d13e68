"""Faults an operator meets, each on the tiny model: preemption by a group signal or Ctrl-C, damaged shards and
malformed conversations, corrupt or truncated checkpoints, divergence, a full disk, and config mistakes. Each must
lose nothing it need not lose (measured: exit status, what was saved, what was counted) and end with one clear line.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import webdataset as wds
from conftest import image_bytes
from safetensors.torch import load_file
from test_train import clean_env

from asymoe_train.checkpoint.integrity import MANIFEST
from asymoe_train.checkpoint.store import TMP_PREFIX, TrainerState, complete_checkpoints
from asymoe_train.config.errors import CheckpointError, ConfigError
from asymoe_train.config.paths import shard_files
from asymoe_train.config.schema import DataConfig
from asymoe_train.data.shards import UNREADABLE, ShardReader, manifest_samples
from asymoe_train.training.guard import NAN_ENV

TIMEOUT = 300
RUN = [
    "experiment=demo", "model/moe=vanilla", "curriculum.stages.align.steps=3", "curriculum.stages.align.warmup_steps=1",
    "curriculum.stages.instruct.steps=6", "curriculum.stages.instruct.warmup_steps=1",
    "curriculum.stages.align.batch_size=4", "curriculum.stages.instruct.batch_size=2",
    "curriculum.stages.align.eval=false", "eval.max_samples=8", "logger.mode=disabled", "logger.progress=false",
    "logger.log_every=1", "data.shuffle_buffer=20",
]


def command(run_dir, data_root, *extra: str) -> list[str]:
    return [sys.executable, "-m", "asymoe_train.cli", *RUN, f"data.root={data_root}", f"hydra.run.dir={run_dir}",
            *extra]


def run(run_dir, data_root, *extra: str, env: dict | None = None, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, data_root, *extra), capture_output=True, text=True, timeout=TIMEOUT,
                          env={**clean_env(), **(env or {})}, cwd=cwd, start_new_session=True, **kwargs)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with status 1 and one line on stderr (no traceback) holding every needle; returns the line."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


def logged_steps(run_dir, stage: str, running: bool = True) -> list[dict]:
    """The data_keys records of a stage (of a ``running`` process: all but the last line, which may be partial)."""
    path = os.path.join(run_dir, "data_keys", "rank0.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    return [json.loads(line) for line in lines[: -1 if running else None] if json.loads(line)["stage"] == stage]


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def max_abs_weight(checkpoint) -> float:
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    return max(float(t.float().abs().max()) for t in weights.values())


def wait_for(predicate, proc, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-3000:] if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------------ preemption
@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_the_step_and_resume_loses_nothing(tmp_path, demo_data):
    """scancel/preemption signal the whole group, DataLoader worker included: the worker ignores it, the trainer
    finishes its step, saves, prints the resume command and exits 0; resume=auto trains every remaining step once."""
    run_dir = tmp_path / "run"
    extra = ("data.record_keys=true", "data.num_workers=1")
    proc = subprocess.Popen(command(run_dir, demo_data, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env(), start_new_session=True)
    wait_for(lambda: len(logged_steps(run_dir, "instruct")) >= 2, proc, "instruct step 2")
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    assert "killed by signal" not in err and "Traceback" not in err
    state, path = complete_checkpoints(run_dir)[-1]
    assert state.stage == "instruct" and not state.stage_done and state.step >= 2
    # every step trained is in the checkpoint (the one in flight finished first): nothing to train again
    assert [r["step"] for r in logged_steps(run_dir, "instruct", running=False)] == list(range(state.step))
    assert "received SIGTERM" in out and f"checkpoint {path}" in out
    resume_line = next(line for line in out.splitlines() if "continue with: asymoe-train" in line)
    assert "resume=auto" in resume_line and f"hydra.run.dir={run_dir}" in resume_line
    ok(run(run_dir, demo_data, *extra, "resume=auto"))
    steps = [r["step"] for r in logged_steps(run_dir, "instruct", running=False)]
    assert steps == list(range(6))  # over both processes every step trained exactly once
    assert os.path.isfile(run_dir / "checkpoints" / "instruct" / "COMPLETE")


@pytest.mark.slow
def test_first_sigint_checkpoints_like_preemption_and_a_second_stops_at_once(tmp_path, demo_data):
    once, twice = tmp_path / "once", tmp_path / "twice"
    for run_dir, interrupts in ((once, 1), (twice, 2)):
        log = open(tmp_path / f"{run_dir.name}.out", "w+")
        slow = ["curriculum.stages.instruct.batch_size=48"] if interrupts == 2 else []  # time for a second Ctrl-C
        proc = subprocess.Popen(command(run_dir, demo_data, "data.record_keys=true", "data.num_workers=1", *slow),
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=clean_env(),
                                start_new_session=True)
        wait_for(lambda run_dir=run_dir: len(logged_steps(run_dir, "instruct")) >= 1, proc, "instruct step 1")
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
        if interrupts == 2:
            wait_for(lambda name=log.name: "received SIGINT" in open(name).read(), proc, "the first SIGINT")
            os.killpg(proc.pid, signal.SIGINT)
            sent = time.monotonic()
        proc.wait(timeout=TIMEOUT)
        out = open(log.name).read()
        if interrupts == 1:
            assert proc.returncode == 0, out[-3000:]
            state, path = complete_checkpoints(run_dir)[-1]
            assert state.stage == "instruct" and not state.stage_done and f"checkpoint {path}" in out
            assert "continue with: asymoe-train" in out
        else:
            assert proc.returncode == 130, out[-3000:]
            assert time.monotonic() - sent < 30  # at once: no step finished, nothing saved after it
            assert "interrupted" in out and "Traceback" not in out
            left = os.listdir(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
            assert not [name for name in left if name.startswith(TMP_PREFIX)]
            assert not [name for name in left if name.startswith("instruct")]  # stopped before any save


# ------------------------------------------------------------------------------------------------ damaged data
def copy_data(demo_data, target, truncate: list[str] = ()) -> str:
    """A copy of the demo shards (links, except ``truncate``: copied and cut to half their size)."""
    os.makedirs(target)
    for name in os.listdir(demo_data):
        source, dest = os.path.join(demo_data, name), os.path.join(target, name)
        if name in truncate:
            shutil.copyfile(source, dest)
            os.truncate(dest, os.path.getsize(dest) // 2)
        else:
            os.symlink(source, dest)
    return str(target)


def test_a_truncated_shard_counts_the_samples_its_manifest_says_it_held(tmp_path, demo_data):
    name = "captions-train-000000.tar"
    root = copy_data(demo_data, tmp_path / "data", truncate=[name])
    held, how = manifest_samples(os.path.join(demo_data, name))
    lost: dict[str, int] = {}
    reader = ShardReader(lambda reason, n: lost.__setitem__(reason, lost.get(reason, 0) + n))
    read = sum(1 for _ in reader.samples(os.path.join(root, name)))
    assert 0 < read < held and held >= 200
    assert lost == {UNREADABLE: held - read}  # was: 1, whatever the shard held
    # no manifest: the mean of the shards this reader read whole, stated as an estimate
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(os.path.join(demo_data, "captions-train-000001.tar"), bare / "a.tar")
    shutil.copyfile(os.path.join(root, name), bare / "b.tar")
    lost.clear()
    whole = sum(1 for _ in reader.samples(str(bare / "a.tar")))
    cut = sum(1 for _ in reader.samples(str(bare / "b.tar")))
    assert lost[UNREADABLE] == whole - cut  # the one shard read whole is the mean
    assert manifest_samples(str(bare / "a.tar")) is None


@pytest.mark.slow
def test_half_the_caption_shards_cut_in_half_exceed_the_budget_with_honest_counts(tmp_path, demo_data):
    captions = sorted(n for n in os.listdir(demo_data) if n.startswith("captions-train-"))
    root = copy_data(demo_data, tmp_path / "data", truncate=captions[::2])
    # one stream, so shards are read one after another and a cut one is found within a few hundred samples
    proc = run(tmp_path / "run", root, "~curriculum.stages.instruct", "curriculum.stages.align.steps=40",
               "curriculum.stages.align.batch_size=32", "data.num_streams=1")
    line = one_line_error(proc, "stage align", "data.max_bad_fraction=0.01", UNREADABLE)
    bad, seen = (int(w) for w in line.split(": ", 2)[2].split(" samples")[0].split(" of "))
    assert seen >= 200 and bad / seen > 0.1  # about a quarter of the data is gone, and counted so (was 2 of 258)


def conversation_shard(path, records: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for n, record in enumerate(records):
            sink.write({"__key__": f"s{n:04d}", "png": image_bytes(), "json": json.dumps(record).encode()})


def good_record(answer: str = "red") -> dict:
    return {"conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                              {"from": "gpt", "value": answer}], "family": ["colour"]}


MALFORMED = [
    {"conversations": [{"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt"}]},  # no value
    {"conversations": [{"from": "human", "value": "<image>\nwhat color?"}, {"value": "red"}]},  # no role
    {"conversations": [{"from": "human", "value": "   "}, {"from": "gpt", "value": "red"}]},  # empty prompt
    {"conversations": [{"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": ""}]},  # empty
    {"conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "<image>\nwhat?"}]},  # order
    {"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"},
                       {"from": "gpt", "value": "b"}, {"from": "human", "value": "q"}]},  # order, later turn
]


def test_malformed_conversations_are_counted_not_trained(tmp_path, demo_data):
    from asymoe_train.data.conversation import ConversationEncoder
    from asymoe_train.data.decode import SampleDecoder
    from asymoe_train.data.pipeline import eval_batches
    from asymoe_train.data.tokenizer import TextTokenizer

    conversation_shard(tmp_path / "bad-000000.tar", [good_record()] * 4 + MALFORMED)
    tokenizer = TextTokenizer(os.path.join(demo_data, "tokenizer.json"))
    decoder = SampleDecoder(ConversationEncoder(tokenizer, "plain", 4), 64, 96, True)
    batches = list(eval_batches(DataConfig(root=str(tmp_path)), "bad-*.tar", decoder, 100, prompt_only=False))
    skipped = {}
    for batch in batches:
        for reason, n in batch.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    for reason, n in decoder.take_skipped().items():
        skipped[reason] = skipped.get(reason, 0) + n
    assert sum(b.num_samples for b in batches) == 4
    assert skipped == {"malformed": len(MALFORMED)}  # was: 0 (an empty prompt supervising only </s>)


@pytest.mark.slow
def test_eval_splits_report_skipped_samples_and_obey_the_budget(tmp_path, demo_data):
    evalset = tmp_path / "eval"
    evalset.mkdir()
    conversation_shard(evalset / "bad-000000.tar", [good_record()] * 6 + MALFORMED[:2])
    splits = f"+data.eval_sources.bad='{evalset}/bad-*.tar'"
    short = ("~curriculum.stages.instruct", "curriculum.stages.align.steps=2", "curriculum.stages.align.eval=true")
    ok(run(tmp_path / "lenient", demo_data, *short, splits, "data.max_bad_fraction=0.5"))
    report = json.load(open(tmp_path / "lenient" / "eval" / "align.json"))["splits"]["bad"]
    assert report["skipped"] == {"malformed": 2} and report["num_samples"] == 6 and report["num_questions"] == 6
    proc = run(tmp_path / "strict", demo_data, *short, splits, "data.bad_fraction_min_samples=0")
    one_line_error(proc, "eval split bad", "2 of 8 samples", "data.max_bad_fraction=0.01")


# ------------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    """A run with mid-stage checkpoints every 2 instruct steps (keep_last=3) and both stage ends."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    ok(run(run_dir, demo_data, "checkpoint.every_steps=2", "checkpoint.keep_last=3"))
    return run_dir


def corrupt_same_size(path) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 64)  # inside the last tensor's data: the file still parses
        block = f.read(8)
        f.seek(-8, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in block))


@pytest.mark.slow
def test_checkpoints_carry_checksums_and_a_corrupt_file_is_named_by_export_and_load_pretrained(
        tmp_path, trained, demo_data):
    import asymoe_train

    for _, path in complete_checkpoints(trained):
        files = json.load(open(os.path.join(path, MANIFEST)))["files"]
        assert "model.safetensors" in files and "trainer_state.json" in files and "COMPLETE" not in files
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken, symlinks=True)
    weights = broken / "checkpoints" / "instruct" / "model.safetensors"
    size = os.path.getsize(weights)
    corrupt_same_size(weights)
    assert os.path.getsize(weights) == size
    proc = subprocess.run([sys.executable, "-m", "asymoe_train.cli", "export", str(broken)], capture_output=True,
                          text=True, timeout=TIMEOUT, env=clean_env())
    one_line_error(proc, str(weights), "SHA-256")  # was: exported silently
    assert not (broken / "export" / "model.safetensors").exists()
    out = tmp_path / "export"
    ok(subprocess.run([sys.executable, "-m", "asymoe_train.cli", "export", str(trained), "--out", str(out)],
                      capture_output=True, text=True, timeout=TIMEOUT, env=clean_env()))
    asymoe_train.load_pretrained(str(out))  # verifies and loads
    corrupt_same_size(out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"export/model\.safetensors does not match its SHA-256"):
        asymoe_train.load_pretrained(str(out))


@pytest.mark.slow
def test_resume_auto_falls_back_past_a_truncated_checkpoint_and_init_from_verifies(tmp_path, trained, demo_data):
    from asymoe_train.training import resume as resume_policy

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "instruct")  # as if the run died after its step-4 checkpoint
    os.remove(run_dir / "eval" / "instruct.json")
    newest = run_dir / "checkpoints" / "instruct-step0000004"
    os.truncate(newest / "model.safetensors", os.path.getsize(newest / "model.safetensors") // 2)
    proc = ok(run(run_dir, demo_data, "checkpoint.every_steps=2", "checkpoint.keep_last=3", "resume=auto"))
    older = run_dir / "checkpoints" / "instruct-step0000002"
    assert f"{newest} fails verification" in proc.stdout and "truncated" in proc.stdout
    assert f"falling back to {older}" in proc.stdout
    assert f"resuming from {older}: stage instruct, step 2" in proc.stdout  # lost: steps 3-4, trained again
    assert TrainerState.load(run_dir / "checkpoints" / "instruct").step == 6
    # init_from checks the checkpoint it starts from
    align = tmp_path / "align"
    shutil.copytree(trained / "checkpoints" / "align", align)
    corrupt_same_size(align / "model.safetensors")
    cfg = TrainerState.load(align)
    from omegaconf import OmegaConf

    from asymoe_train.config.schema import TrainConfig

    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(cfg.config)))
    typed.run_dir, typed.init_from = str(tmp_path / "new"), str(align)
    with pytest.raises(CheckpointError, match=r"align/model\.safetensors does not match its SHA-256"):
        resume_policy.find_start(typed, resume_policy.resolved_yaml(typed), 1)


# -------------------------------------------------------------------------------------------------- divergence
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_non_finite_steps_are_skipped_before_the_optimizer_and_counted(tmp_path, demo_data, zero_stage):
    run_dir = tmp_path / "run"
    ok(run(run_dir, demo_data, f"engine.zero_stage={zero_stage}", "checkpoint.every_steps=1",
           "checkpoint.keep_last=6", env={NAN_ENV: "instruct:1,2"}))
    instruct = [m for m in metrics(run_dir) if m.get("stage") == 1 and "guard/skipped" in m]
    assert [m["guard/skipped"] for m in instruct] == [0, 1, 1, 0, 0, 0]
    lrs = [m["lr"] for m in instruct]
    assert lrs[0] == lrs[1] == lrs[2] != lrs[3]  # skipped steps do not advance the lr schedule
    for _, path in complete_checkpoints(run_dir):
        assert 0 < max_abs_weight(path) < 100  # finite and not exploded
    step1, step3 = (load_file(run_dir / "checkpoints" / f"instruct-step000000{n}" / "model.safetensors")
                    for n in (1, 3))
    assert all(torch.equal(step1[k], step3[k]) for k in step1)  # the two skipped steps changed no weight


@pytest.mark.slow
def test_divergence_stops_after_max_skipped_steps_and_resumes_with_a_lower_lr_and_longer_schedule(
        tmp_path, demo_data):
    run_dir = tmp_path / "run"
    proc = run(run_dir, demo_data, "checkpoint.every_steps=1", "training.max_skipped_steps=3",
               env={NAN_ENV: "instruct:2,3,4,5"})
    one_line_error(proc, "stage instruct", "3 optimizer steps in a row", "training.max_skipped_steps=3")
    state, path = complete_checkpoints(run_dir)[-1]
    assert (state.stage, state.step) == ("instruct", 4) and max_abs_weight(path) < 100
    # resume with a lower lr and a longer stage: a warning, not a refusal (was: "curriculum differs")
    proc = ok(run(run_dir, demo_data, "checkpoint.every_steps=1", "resume=auto",
                  "curriculum.stages.instruct.lr=1e-5", "curriculum.stages.instruct.steps=8"))
    assert "the lr schedule changes" in proc.stdout and "curriculum.stages.instruct.lr: 0.0002 -> 1e-05" in proc.stdout
    resumed = [m for m in metrics(run_dir) if m.get("stage") == 1 and "lr" in m][-4:]
    assert len(resumed) == 4 and all(0 < m["lr"] <= 1e-5 for m in resumed)
    assert TrainerState.load(run_dir / "checkpoints" / "instruct").step == 8


# --------------------------------------------------------------------------------------------------- full disk
@pytest.mark.slow
def test_a_full_disk_fails_the_save_with_one_line_and_leaves_no_temporary_directory(tmp_path, demo_data):
    limit = 2 << 20  # files may not grow past 2 MiB: the align checkpoint's optimizer file is larger

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run_dir = tmp_path / "run"
    proc = run(run_dir, demo_data, "data.num_workers=0", preexec_fn=small_files)
    one_line_error(proc, f"could not save checkpoint {run_dir}/checkpoints/align", "resume=auto")
    assert os.listdir(run_dir / "checkpoints") == []  # no .tmp-align left behind


# ----------------------------------------------------------------------------------------- config mistakes
@pytest.mark.parametrize("override, key", [
    ("hydra.run.dir=", "hydra.run.dir"),
    ("hydra.run.dir=''", "hydra.run.dir"),
    ("data.tokenizer=''", "data.tokenizer"),
    ("data.root=''", "data.root"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps=-1"),
    ("eval.max_samples=-3", "eval.max_samples=-3"),
    ("training.max_skipped_steps=0", "training.max_skipped_steps=0"),
    ("data.sources.captions='pipe:touch PWNED; cat x.tar'", "data.allow_remote_urls"),
])
def test_config_mistakes_fail_at_start_with_one_line_naming_the_key(tmp_path, demo_data, override, key):
    proc = subprocess.run([sys.executable, "-m", "asymoe_train.cli", *RUN, f"data.root={demo_data}",
                           f"hydra.run.dir={tmp_path / 'run'}", override], capture_output=True, text=True,
                          timeout=TIMEOUT, env=clean_env(), cwd=tmp_path, start_new_session=True)
    one_line_error(proc, key)
    assert sorted(os.listdir(tmp_path)) in ([], ["run"])  # nothing written into the working directory
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "PWNED").exists()


def test_debug_flag_or_hydra_full_error_show_the_traceback(tmp_path, demo_data):
    args = [sys.executable, "-m", "asymoe_train.cli", *RUN, f"data.root={demo_data}",
            f"hydra.run.dir={tmp_path / 'run'}", "eval.max_samples=-3"]
    for extra, env in ((["--debug"], {}), ([], {"HYDRA_FULL_ERROR": "1"})):
        proc = subprocess.run(args + extra, capture_output=True, text=True, timeout=TIMEOUT,
                              env={**clean_env(), **env}, cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "eval.max_samples=-3" in proc.stderr


def test_shard_globs_resolve_to_local_files_and_urls_need_allow_remote_urls(tmp_path):
    named = tmp_path / "pipe:touch PWNED; cat x.tar"  # a file whose name webdataset would run as a command
    named.write_bytes(b"not a tar")
    (tmp_path / "dir.tar").mkdir()  # not a regular file
    data = DataConfig(root=str(tmp_path))
    assert shard_files(data, "*.tar") == [str(named)]
    lost = []
    assert list(ShardReader(lambda reason, n: lost.append(reason)).urls(shard_files(data, "*.tar"))) == []
    assert lost == [UNREADABLE] and not (tmp_path / "PWNED").exists()  # read as a (bad) file, never run
    for pattern in ("pipe:touch PWNED", "http://example.org/shard-{000..003}.tar"):
        with pytest.raises(ConfigError, match="data.allow_remote_urls=true"):
            shard_files(data, pattern, "data.sources.x")
    remote = DataConfig(root=str(tmp_path), allow_remote_urls=True)
    assert shard_files(remote, "http://example.org/shard-{000..001}.tar") == [
        "http://example.org/shard-000.tar", "http://example.org/shard-001.tar"]
