"""launch/: every script's dry run prints the right command (launcher, flags, one pinned run directory, the
pass-through overrides), runs nothing, and the SLURM job forwards SIGUSR1 and requeues itself; the Hydra launcher
and sweeper configs compose when their plugins are installed; the Optuna objective."""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from asymoe_train.cli import check_metric, metric_value
from asymoe_train.config import register_configs, to_typed, validate
from asymoe_train.config.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
CONF = os.path.join(ROOT, "conf")
SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f != "common.sh")
LAUNCHERS = ("deepspeed", "torchrun", "srun", "python")  # faked on PATH: a dry run must start none of them
OVERRIDES = ["model/moe=vanilla", "curriculum.stages.instruct.lr=3e-4", "logger.mode=disabled"]
HOSTS = ("gpu-node-3", "gpu-node-4")

register_configs()


def _fake_bin(tmp_path) -> str:
    """A bin dir with fake launchers that record being started, and an scontrol that lists HOSTS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in LAUNCHERS:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/started"\n')
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "show hostnames" ]; then printf "%s\\n" {" ".join(HOSTS)}; exit 0; fi\n'
        f'echo "$*" >> "{tmp_path}/scontrol.log"\n'
    )
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return str(bin_dir)


def _env(tmp_path, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT", "NUM_GPUS", "HOSTFILE", "NNODES", "NODE_RANK",
                                                        "EXPERIMENT", "RUN_ID", "RUN_DIR", "DRY_RUN", "RESUME",
                                                        "OMP_NUM_THREADS")}
    return {**keep, "PATH": f"{_fake_bin(tmp_path)}:{keep['PATH']}", **extra}


def dry_run(tmp_path, script: str, *args: str, **env: str) -> list[str]:
    """Run a launch script with --dry-run in tmp_path; the one printed command, split into words."""
    proc = subprocess.run([os.path.join(LAUNCH, script), "--dry-run", *args], cwd=tmp_path, env=_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "started").exists(), "a dry run started a launcher"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def fails(tmp_path, script: str, *args: str, **env: str) -> str:
    proc = subprocess.run([os.path.join(LAUNCH, script), "--dry-run", *args], cwd=tmp_path, env=_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and not proc.stdout
    return proc.stderr


def run_dirs(words: list[str]) -> list[str]:
    return [w.removeprefix("hydra.run.dir=") for w in words if w.startswith("hydra.run.dir=")]


def trainer_args(words: list[str], module_flag: str = "--module") -> list[str]:
    """What every rank gets: the words after `<module flag> asymoe_train.cli`."""
    i = words.index(module_flag)
    assert words[i + 1] == "asymoe_train.cli"
    return words[i + 2:]


def flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


# ------------------------------------------------------------------------------------------------- the scripts
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_strict_bash(script):
    path = os.path.join(LAUNCH, script)
    assert os.stat(path).st_mode & stat.S_IXUSR, f"chmod +x launch/{script}"
    text = open(path, encoding="utf-8").read()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0


def test_common_helper_parses():
    assert subprocess.run(["bash", "-n", os.path.join(LAUNCH, "common.sh")]).returncode == 0


def test_every_script_has_a_dry_run_test():
    tested = {"deepspeed.sh", "torchrun.sh", "slurm.sbatch", "slurm_task.sh"}
    assert set(SCRIPTS) == tested, "add a dry-run test for each new launch script"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage(script, tmp_path):
    proc = subprocess.run([os.path.join(LAUNCH, script), "--help"], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "DRY_RUN=1" in proc.stdout


def test_deepspeed_single_node(tmp_path):
    words = dry_run(tmp_path, "deepspeed.sh", *OVERRIDES, NUM_GPUS="4", MASTER_PORT="29611", RUN_ID="r1")
    assert words[:2] == ["env", "OMP_NUM_THREADS=1"] and words[2] == "deepspeed"
    assert "--no_local_rank" in words and "--hostfile" not in words
    assert flag(words, "--num_gpus") == "4" and flag(words, "--master_port") == "29611"
    args = trainer_args(words)
    assert args == ["experiment=demo", f"hydra.run.dir={tmp_path}/outputs/demo/r1", *OVERRIDES]
    # DRY_RUN=1 is the same switch as --dry-run
    proc = subprocess.run([os.path.join(LAUNCH, "deepspeed.sh"), *OVERRIDES], cwd=tmp_path, capture_output=True,
                          text=True, env=_env(tmp_path, DRY_RUN="1", NUM_GPUS="4", MASTER_PORT="29611", RUN_ID="r1"))
    assert shlex.split(proc.stdout) == words and not (tmp_path / "started").exists()


def test_deepspeed_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# workers\nworker-0 slots=8\nworker-1 slots=8\n")
    words = dry_run(tmp_path, "deepspeed.sh", "experiment=ablation", "engine=gpu", HOSTFILE=str(hostfile), NNODES="2")
    assert words[2] == "deepspeed" and "--no_local_rank" in words
    assert flag(words, "--hostfile") == str(hostfile) and flag(words, "--num_nodes") == "2"
    assert flag(words, "--master_addr") == "worker-0"  # the first host, not the comment
    args = trainer_args(words)
    # an explicit experiment= override names the run directory and is not repeated
    assert [a for a in args if a.startswith("experiment=")] == ["experiment=ablation"]
    (run_dir,) = run_dirs(args)
    assert run_dir.startswith(f"{tmp_path}/outputs/ablation/") and args[-1] == "engine=gpu"
    assert "hostfile" in fails(tmp_path, "deepspeed.sh", HOSTFILE=str(tmp_path / "missing"))


def test_torchrun_single_node(tmp_path):
    words = dry_run(tmp_path, "torchrun.sh", *OVERRIDES, NUM_GPUS="2", EXPERIMENT="demo", RUN_DIR="runs/x")
    assert words[0] == "torchrun" and "--standalone" in words and flag(words, "--nproc-per-node") == "2"
    assert trainer_args(words) == ["experiment=demo", f"hydra.run.dir={tmp_path}/runs/x", *OVERRIDES]


def test_torchrun_multi_node_rendezvous(tmp_path):
    env = dict(NNODES="2", NUM_GPUS="8", MASTER_ADDR="node-0", MASTER_PORT="29400", RUN_ID="try1")
    node0 = dry_run(tmp_path, "torchrun.sh", *OVERRIDES, NODE_RANK="0", **env)
    node1 = dry_run(tmp_path, "torchrun.sh", *OVERRIDES, NODE_RANK="1", **env)
    assert node0 == node1  # c10d assigns node ranks at rendezvous: every node runs the same command
    assert flag(node0, "--rdzv-backend") == "c10d" and flag(node0, "--rdzv-endpoint") == "node-0:29400"
    assert flag(node0, "--rdzv-id") == "try1" and flag(node0, "--nnodes") == "2" and "--standalone" not in node0
    assert run_dirs(node0) == [f"{tmp_path}/outputs/demo/try1"]

    static = [dry_run(tmp_path, "torchrun.sh", *OVERRIDES, RDZV_BACKEND="static", NODE_RANK=str(r), **env)
              for r in (0, 1)]
    assert [flag(w, "--node-rank") for w in static] == ["0", "1"]
    assert flag(static[0], "--master-addr") == "node-0" and flag(static[0], "--master-port") == "29400"
    assert run_dirs(static[0]) == run_dirs(static[1]) == run_dirs(node0)


def test_torchrun_multi_node_needs_a_shared_run_id(tmp_path):
    assert "RUN_ID" in fails(tmp_path, "torchrun.sh", NNODES="2", MASTER_ADDR="node-0")
    assert "MASTER_ADDR" in fails(tmp_path, "torchrun.sh", NNODES="2", RUN_ID="x")
    assert "NODE_RANK" in fails(tmp_path, "torchrun.sh", NNODES="2", RUN_ID="x", MASTER_ADDR="h", RDZV_BACKEND="static")


def test_scripts_refuse_multirun(tmp_path):
    assert "hydra/launcher=slurm" in fails(tmp_path, "torchrun.sh", "-m", "seed=0,1")


SLURM_JOB = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[3-4]", SLURM_NTASKS="4")


def test_slurm_job_and_its_tasks(tmp_path):
    words = dry_run(tmp_path, "slurm.sbatch", *OVERRIDES, SLURM_SUBMIT_DIR=ROOT, **SLURM_JOB)
    port = str(20000 + 4242 % 20000)
    assert words[:3] == ["env", f"MASTER_ADDR={HOSTS[0]}", f"MASTER_PORT={port}"]  # from scontrol show hostnames
    assert words[3] == "srun" and words[5] == os.path.join(LAUNCH, "slurm_task.sh")
    args = words[6:]
    # run directory keyed by the job id (kept across requeues); resume=auto before the user's overrides
    assert args == ["experiment=demo", f"hydra.run.dir={tmp_path}/outputs/demo/slurm-4242", "resume=auto", *OVERRIDES]
    requeued = dry_run(tmp_path, "slurm.sbatch", *OVERRIDES, SLURM_SUBMIT_DIR=ROOT, SLURM_RESTART_COUNT="1",
                       **SLURM_JOB)
    assert requeued == words

    # what srun starts: one task per GPU on each node; each maps SLURM's ids to torch's variables
    ranks = []
    for procid in range(4):
        task = dry_run(tmp_path, "slurm_task.sh", *args, SLURM_PROCID=str(procid), SLURM_LOCALID=str(procid % 2),
                       SLURM_NTASKS="4", SLURM_CPUS_PER_TASK="6", MASTER_ADDR=HOSTS[0], MASTER_PORT=port)
        assert task[:7] == ["env", f"RANK={procid}", f"LOCAL_RANK={procid % 2}", "WORLD_SIZE=4",
                            f"MASTER_ADDR={HOSTS[0]}", f"MASTER_PORT={port}", "OMP_NUM_THREADS=6"]
        assert task[7:11] == ["python", "-u", "-m", "asymoe_train.cli"]
        ranks.append(task[11:])
    assert all(r == args for r in ranks)  # identical overrides, so one hydra.run.dir for every rank


def test_slurm_requeue_flags_and_env_checks(tmp_path):
    text = open(os.path.join(LAUNCH, "slurm.sbatch"), encoding="utf-8").read()
    sbatch = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in sbatch and any(o.startswith("--signal=B:USR1@") for o in sbatch)
    assert "sbatch" in fails(tmp_path, "slurm.sbatch")  # outside a job
    assert "SLURM_PROCID" in fails(tmp_path, "slurm_task.sh", MASTER_ADDR="h", MASTER_PORT="1")


def _slurm_job(tmp_path, srun_body: str) -> subprocess.Popen:
    """Start slurm.sbatch for real, with a fake srun running ``srun_body`` and the fake scontrol."""
    env = _env(tmp_path, SLURM_SUBMIT_DIR=ROOT, **SLURM_JOB)
    srun = tmp_path / "bin" / "srun"
    srun.write_text(f'#!/usr/bin/env bash\necho "start $*" >> "{tmp_path}/srun.log"\n{srun_body}\n')
    srun.chmod(0o755)
    return subprocess.Popen([os.path.join(LAUNCH, "slurm.sbatch"), "seed=3"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(path, text: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_slurm_usr1_reaches_the_trainers_then_the_job_requeues(tmp_path):
    # the trainers (fake srun) stop on SIGUSR1 like a trainer that checkpoints and exits
    job = _slurm_job(tmp_path, f'trap \'echo usr1 >> "{tmp_path}/srun.log"; exit 0\' USR1\n'
                               "while :; do sleep 0.05; done")
    try:
        _wait_for(tmp_path / "srun.log", "start")
        os.kill(job.pid, signal.SIGUSR1)  # what --signal=B:USR1@120 does 120 s before the time limit
        job.wait(timeout=20)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert "usr1" in (tmp_path / "srun.log").read_text()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    started = (tmp_path / "srun.log").read_text().splitlines()[0].split()
    assert started[-2:] == ["resume=auto", "seed=3"]


def test_slurm_job_that_finishes_is_not_requeued(tmp_path):
    job = _slurm_job(tmp_path, "exit 3")
    assert job.wait(timeout=20) == 3  # the trainers' status
    assert not (tmp_path / "scontrol.log").exists()


# ------------------------------------------------------------------------------------- a launcher, for real
@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_launcher_hands_the_pinned_run_dir_to_the_hydra_app(script, tmp_path):
    """One rank through the real launcher, asking the Hydra app for its config (`--cfg hydra`), no training."""
    env = _env(tmp_path, NUM_GPUS="1", RUN_ID="smoke", MASTER_PORT=str(29000 + os.getpid() % 1000),
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH'].split(':', 1)[1]}"  # the real launchers
    proc = subprocess.run(["timeout", "-k", "5", "240", os.path.join(LAUNCH, script), "--cfg", "hydra"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dir: {ROOT}/outputs/demo/smoke" in proc.stdout


# ------------------------------------------------------------------------------------------ the Optuna objective
def _compose(*overrides: str, hydra_config: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


RESULTS = {"align": {}, "instruct": {"cp_test": {"accuracy": 0.5, "num_questions": 8,
                                                 "breakdown": {"family/shape": {"accuracy": 0.25, "count": 4}}}}}


def test_metric_value_reads_the_dotted_path():
    assert metric_value(RESULTS, "instruct.cp_test.accuracy") == 0.5
    assert metric_value(RESULTS, "instruct.cp_test.breakdown.family/shape.accuracy") == 0.25
    with pytest.raises(KeyError, match="'test'"):
        metric_value(RESULTS, "instruct.test.accuracy")


def test_optimized_metric_is_checked_before_training(demo_data):
    cfg = _compose(f"data.root={demo_data}", "run_dir=/tmp/unused", "experiment=demo",
                   "++optimized_metric=instruct.cp_test.accuracy")
    assert cfg.optimized_metric == "instruct.cp_test.accuracy"  # ++ adds it to the schema-typed root
    typed = to_typed(cfg)  # what train() does with it next
    validate(typed)
    OmegaConf.structured(typed)
    check_metric(cfg, cfg.optimized_metric)
    check_metric(cfg, "instruct.test.breakdown.family/shape.accuracy")
    for bad in ("align.test.accuracy", "instruct.val.accuracy", "instruct.cp_test", "instruct.cp_test.acc"):
        with pytest.raises(ConfigError, match="optimized_metric"):
            check_metric(cfg, bad)


# ------------------------------------------------------------------------ Hydra plugin configs (when installed)
def _installed(plugin: str) -> bool:
    return importlib.util.find_spec("hydra_plugins") is not None and importlib.util.find_spec(plugin) is not None


needs_submitit = pytest.mark.skipif(not _installed("hydra_plugins.hydra_submitit_launcher"),
                                    reason='hydra-submitit-launcher not installed (pip install -e ".[slurm]")')
needs_optuna = pytest.mark.skipif(not _installed("hydra_plugins.hydra_optuna_sweeper"),
                                  reason='hydra-optuna-sweeper not installed (pip install -e ".[sweep]")')


@needs_submitit
def test_submitit_slurm_launcher_config(monkeypatch):
    cfg = _compose("experiment=demo", "hydra/launcher=slurm", hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node > 0  # one rank per GPU
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0 and launcher.timeout_min > 0
    setup = "\n".join(launcher.setup)
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in setup and "MASTER_PORT=" in setup
    # env_set resolves on each task, from that task's SLURM variables
    for var, value in {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}.items():
        monkeypatch.setenv(var, value)
    env_set = OmegaConf.to_container(cfg.hydra.job.env_set, resolve=True)
    assert env_set == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16"}


@needs_optuna
def test_optuna_search_space_trials_compose_and_validate(demo_data):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution

    base = [f"data.root={demo_data}", "run_dir=/tmp/unused", "experiment=demo"]
    cfg = _compose(*base, "+hparams_search=optuna", hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert cfg.model.moe.variant == "asymoe"
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert set(fixed) == {"++optimized_metric"} and "curriculum.stages.instruct.lr" in space
    assert isinstance(space["model.moe.top_k"], CategoricalDistribution)

    def corner(dist, end: int):  # the lowest or highest value of each distribution
        return dist.choices[end] if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)[end]

    for end in (0, -1):  # a trial's overrides, as the sweeper builds them
        trial = [f"{name}={corner(dist, end)}" for name, dist in space.items()]
        trial += [f"{name}={value}" for name, value in fixed.items()]
        composed = _compose(*base, "+hparams_search=optuna", *trial)
        validate(to_typed(composed))
        check_metric(composed, composed.optimized_metric)
