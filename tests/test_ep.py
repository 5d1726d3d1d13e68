"""Expert parallelism: two gloo processes on CPU (OMP_NUM_THREADS=1; the demo by torchrun, tests/ep_worker.py forking
its two ranks after importing once), each launch under a hard timeout that kills its whole process group
(``run_group``), plus in-process checks of partitioning, consolidated weights and validation.

* EP=2 equals EP=1 on the same global batch (outputs, input gradients, every parameter's gradient, the global
  gradient norm) for vanilla, moiie, asymoe and asymoe_paper, and over 20 randomized trials of uneven and zero token counts per
  rank and per modality; DeepSpeed's MoE layer (``model.moe.backend=deepspeed``) runs the same uneven batches and
  gives the native block's outputs; the whole model trains with EP=2 and ZeRO-2 while one rank's batches hold no
  image;
* a rank that skips an MoE layer makes the other fail within the expert-parallel timeout, naming rank and layer;
* the demo trained by 2 processes with EP=2 and ZeRO-2 (gradients clipped at 1.0, balance loss 0.001) has the
  per-step LM loss and gradient norm of 1 process at the same global batch, writes one run directory, one W&B run
  and consolidated weights;
* a ZeRO-0 checkpoint of the 1-process run resumes on 2 ranks with EP=2, and one of that run on 1 rank with EP=1,
  both continuing the 1-process losses and gradient norms (ZeRO-0 clipping), the optimizer state resharded by
  parameter name, each step reading the samples the 1-process run read.

The demo runs are session fixtures of conftest.py (``demo_one_process``, ``demo_two_ranks``, ``demo_resumed``, started
by :func:`train` here): tests/test_distributed.py checks the data streams of the same launches.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from ep_worker import D, F, variant
from optim_state import reshard_optimizer_state
from safetensors import safe_open
from test_config import load
from test_distributed import run_group
from test_train import clean_env

from asymoe_train.checkpoint.optimizer import optimizer_param_names
from asymoe_train.checkpoint.store import TrainerState, complete_checkpoints
from asymoe_train.checkpoint.weights import load_weights, save_weights
from asymoe_train.config.validate import ConfigError, resolve_data_path, validate
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.models.vlm import build_model
from asymoe_train.moe.block import MoEBlock

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ep_worker.py")
TOLERANCE = 1e-5  # fp32, EP=2 against EP=1
LOSS_TOLERANCE = 1e-4  # per-step LM loss, 2 processes against 1
MISMATCH_TIMEOUT_S = 4  # expert-parallel collective timeout of the mismatch case
GRAD_NORM_RTOL = 1e-4  # logged gradient norm, 2 processes against 1 (counting only a rank's experts: ~2e-3 here)
# The demo, short: 3 align steps, 20 instruct steps, no evaluation, clipping at the demo's 1.0, the demo's balance
# loss (0.001; formed from the routing statistics of all ranks, like the LM loss from their answer tokens, so 2 ranks
# optimise the objective of 1). MoIIE: expert parallelism over 2 ranks needs every pool's size even (AsyMoE, the
# demo's default, has one vision expert).
DEMO = [
    "experiment=demo", "model/moe=moiie", "curriculum.stages.align.steps=3", "curriculum.stages.align.warmup_steps=1",
    "curriculum.stages.instruct.steps=20", "curriculum.stages.instruct.warmup_steps=2",
    "curriculum.stages.align.eval=false", "curriculum.stages.instruct.eval=false", "logger.log_every=1",
    "logger.progress=false", "data.shuffle_buffer=20", "checkpoint.every_steps=5", "checkpoint.keep_last=4",
    "data.record_keys=true",  # each rank's sample keys per step, in <run_dir>/data_keys/rank<r>.jsonl
    "data.augment=dihedral",  # drawn per sample by stream position: the same on any layout
]
ONE_RANK = ["curriculum.stages.align.batch_size=8", "curriculum.stages.instruct.batch_size=8"]
TWO_RANKS = ["curriculum.stages.align.batch_size=4", "curriculum.stages.instruct.batch_size=4", "engine.ep_size=2"]


def env() -> dict[str, str]:
    return {**clean_env(), "OMP_NUM_THREADS": "1"}  # also for 1 process: 2 cores shared with other jobs


def torchrun(nproc: int, *args: str):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return run_group([*launcher, *args], env())


def train(nproc: int, run_dir, data_root: str, *extra: str, logger: str = "disabled"):
    """The short demo on ``nproc`` processes (torchrun for 2), under run_group's hard timeout."""
    cli = ["-m", "asymoe_train.cli", *DEMO, f"data.root={data_root}", f"logger.mode={logger}",
           f"hydra.run.dir={run_dir}", *extra]
    if nproc == 1:
        return run_group([sys.executable, *cli], env())
    return torchrun(nproc, *cli)


def results(proc) -> dict[int, dict]:
    rows = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return {row["rank"]: row for row in rows}


def logged(run_dir, key: str = "loss/lm") -> dict[int, float]:
    """One metric by global step."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def lm_losses(run_dir) -> dict[int, float]:
    return logged(run_dir)


def assert_matches(run_dir, reference_dir) -> None:
    """Per step, the LM loss within LOSS_TOLERANCE and the gradient norm within GRAD_NORM_RTOL of the reference's."""
    losses, reference = lm_losses(run_dir), lm_losses(reference_dir)
    assert max(abs(losses[s] - reference[s]) for s in losses) < LOSS_TOLERANCE, (losses, reference)
    norms, reference = logged(run_dir, "grad_norm"), logged(reference_dir, "grad_norm")
    assert sorted(norms) == sorted(losses)
    assert max(abs(norms[s] / reference[s] - 1) for s in norms) < GRAD_NORM_RTOL, (norms, reference)


def samples(run_dir) -> dict[tuple[str, int], list[str]]:
    """The sample keys of each (stage, step), all ranks and micro-batches together, sorted."""
    steps: dict[tuple[str, int], list[str]] = {}
    for name in sorted(os.listdir(os.path.join(run_dir, "data_keys"))):
        with open(os.path.join(run_dir, "data_keys", name)) as f:
            for record in map(json.loads, f):
                steps.setdefault((record["stage"], record["step"]), []).extend(record["keys"])
    return {step: sorted(keys) for step, keys in steps.items()}


def assert_reads_like(run_dir, reference_dir) -> None:
    """Every step of the run read exactly the samples the reference read at that step (none skipped or repeated)."""
    steps, reference = samples(run_dir), samples(reference_dir)
    assert steps and all(steps[s] == reference[s] for s in steps), sorted(s for s in steps if steps[s] != reference[s])


def demo_model(demo_data: str, dispatcher=None):
    """The demo's model with MoIIE's pools (even, so they split over 2 ranks), upcycled (random weights), with
    ``dispatcher`` injected."""
    cfg = load(demo_data, "experiment=demo", "model/moe=moiie")
    tokenizer = TextTokenizer(resolve_data_path(cfg.data, cfg.data.tokenizer))
    model = build_model(cfg.model, tokenizer.vocab_size, tokenizer.pad_id)
    model.dispatcher = dispatcher
    model.upcycle()
    return model


def checkpoint(run_dir, name: str) -> str:
    path = os.path.join(run_dir, "checkpoints", name)
    assert os.path.isfile(os.path.join(path, "COMPLETE")), path
    return path


# ----------------------------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def ep_workers() -> dict[int, dict]:
    """One launch of tests/ep_worker.py, which forks the 2 ranks (the numerics, then the mismatch): each rank's
    results."""
    by_rank = results(run_group([sys.executable, WORKER, "60", str(MISMATCH_TIMEOUT_S)], env()))
    assert sorted(by_rank) == [0, 1]
    return by_rank


@pytest.mark.distributed
def test_ep2_equals_ep1_and_survives_uneven_and_zero_token_counts(ep_workers):
    """EP=2 against EP=1 on the same global batch (outputs, input and parameter gradients, gradient norm within
    1e-5) for vanilla, moiie, asymoe and asymoe_paper, 20 randomized trials (and 3 of asymoe_paper) of uneven and zero token counts, DeepSpeed's MoE layer
    on uneven batches, and EP=2 + ZeRO-2 training while one rank's batches hold no image."""
    by_rank = ep_workers
    for rank, result in by_rank.items():
        # the expert groups take engine.ep_timeout_s, not torch's 30-minute default or dist_timeout_s (120 s)
        assert result["ep_timeout_s"] == result["edp_timeout_s"] == 60
        for name, params in (("vanilla", 4), ("moiie", 11), ("asymoe", 26), ("asymoe_paper", 29)):
            diffs = result[name]
            assert diffs["params"] == params
            worst = max(diffs["output"], diffs["input_grad"], diffs["param_grad"], diffs["grad_norm"])
            assert worst < TOLERANCE, (rank, name, diffs)
        assert len(result["trials"]) == 20 and result["trials_max_diff"] < TOLERANCE
        assert result["asymoe_paper_trials_max_diff"] < TOLERANCE
        assert result["deepspeed_backend_max_diff"] < TOLERANCE
        # a text-only batch on one rank, whole model, EP=2 and ZeRO-2: every step completes
        assert len(result["text_only_losses"]) == 3 and all(0 < x < 20 for x in result["text_only_losses"])
    # the trials covered what breaks naive expert parallelism: uneven ranks, ranks without tokens, without one
    # modality, and an all-padding rank
    pairs = list(zip(by_rank[0]["trials"], by_rank[1]["trials"]))
    assert any(a["text"] + a["image"] == 0 < b["text"] + b["image"] for a, b in pairs)
    assert any(a["text"] > 0 and a["image"] == 0 and b["image"] > 0 for a, b in pairs)
    assert any(a["image"] > 0 and a["text"] == 0 for a, _ in pairs)
    assert any(t["seqs"][0] == 0 for t, _ in pairs) and any(t["seqs"][0] != t["seqs"][1] for t, _ in pairs)


@pytest.mark.distributed
def test_a_rank_that_skips_a_layer_fails_fast_naming_rank_and_layer(ep_workers):
    """The rank that runs one MoE layer more fails within the expert-parallel timeout, naming its rank and layer."""
    error = ep_workers[0]["mismatch"]
    assert error["error"] is not None
    assert "rank 0" in error["error"] and "lm.model.layers.3.mlp" in error["error"]
    assert error["seconds"] < 2 * MISMATCH_TIMEOUT_S  # the expert-parallel timeout, not torch's 30 minutes


@pytest.mark.distributed
@pytest.mark.slow
def test_demo_on_two_ranks_with_ep2_and_zero2_matches_one_process(demo_one_process, demo_two_ranks):
    """The demo by 2 processes with EP=2 and ZeRO-2 has the per-step LM loss (1e-4) and gradient norm of 1 process
    at the same global batch, reads its samples, and writes one run directory, one W&B run and weights holding every
    expert."""
    one_process, run_dir, proc = demo_one_process, demo_two_ranks.run_dir, demo_two_ranks.proc
    assert sorted(lm_losses(run_dir)) == sorted(lm_losses(one_process)) == list(range(1, 24))
    assert_matches(run_dir, one_process)  # ZeRO-2 clips in its optimizer, by a norm that counts every expert once
    assert_reads_like(run_dir, one_process)
    # one run directory and one W&B run for the job, both rank 0's (each rank asked for a directory of its own,
    # two-<RANK>, as timestamped defaults can differ)
    assert proc.stdout.count("run_dir: ") == 1
    assert len([d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-")]) == 1
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["two-0"]
    assert sorted(os.listdir(run_dir / "data_keys")) == ["rank0.jsonl", "rank1.jsonl"]
    state, path = complete_checkpoints(run_dir)[-1]
    assert state.layout == {"world_size": 2, "ep_size": 2, "zero_stage": 2, "precision": "fp32"}
    # the weights file holds every expert, as the 1-process run's does
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as two, \
            safe_open(os.path.join(checkpoint(one_process, "instruct"), "model.safetensors"), "pt") as one:
        assert set(two.keys()) == set(one.keys())
        for name in one.keys():
            assert two.get_slice(name).get_shape() == one.get_slice(name).get_shape(), name


@pytest.mark.distributed
@pytest.mark.slow
def test_zero0_checkpoints_resume_from_ep1_on_ep2_and_back(demo_one_process, demo_resumed, demo_data):
    """The 1-process run's ZeRO-0 checkpoint after instruct step 10 resumes on 2 ranks with EP=2, and that run's
    after step 15 on 1 rank with EP=1: both continue the 1-process losses and gradient norms, reading its samples,
    and the optimizer state regrouped by parameter name is the 1-process run's."""
    one_process = demo_one_process
    # 1 rank, EP=1 -> 2 ranks, EP=2
    two = demo_resumed.two
    assert sorted(lm_losses(two)) == list(range(14, 24))  # the global steps after the checkpoint (3 align + 10)
    assert_matches(two, one_process)  # ZeRO-0: clipped by expert_parallel.grad_norm, not DeepSpeed's
    assert_reads_like(two, one_process)
    # its step-15 optimizer state, regrouped by name for 1 rank, is the 1-process run's at step 15
    written = demo_resumed.written
    assert TrainerState.load(written).layout["ep_size"] == 2
    parts = [torch.load(os.path.join(written, f"optim_rank{r}.pt"), weights_only=True) for r in range(2)]
    ref = torch.load(os.path.join(checkpoint(one_process, "instruct-step0000015"), "optim_rank0.pt"),
                     weights_only=True)
    model = demo_model(demo_data)
    optimizer = torch.optim.AdamW(model.parameters())
    resharded = reshard_optimizer_state(parts, optimizer, model)["state"]
    names = optimizer_param_names(optimizer, model)
    ref_state = {n: ref["optimizer"]["state"][i] for i, n in enumerate(ref["param_names"])}
    assert {names[i] for i in resharded} == set(ref_state)
    for index, entry in resharded.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(entry[key], ref_state[names[index]][key], atol=1e-5, rtol=1e-3,
                                       msg=f"{names[index]} {key}")
    # 2 ranks, EP=2 -> 1 rank, EP=1
    one = demo_resumed.one
    assert sorted(lm_losses(one)) == list(range(19, 24))
    assert_matches(one, one_process)
    assert_reads_like(one, one_process)


# ------------------------------------------------------------------------------------------------------ in process
def test_each_rank_builds_its_share_of_every_pool():
    """Rank 1 of 2 holds the second expert of every pool; evidence branches, gates and pre-scales stay whole."""
    block = MoEBlock(variant("asymoe"), D, F, "silu", dispatcher=SimpleNamespace(ep_rank=1, ep_size=2))
    pools = block.pools
    assert block.num_experts == 8 and all(p.num_experts == 1 and p.first_expert == 1 for p in pools.values())
    assert pools["vision"].gate_EFD.shape[0] == pools["hyperbolic"].up_EFD.shape[0] == 1
    assert pools["evidence"].memory.down_EDF.shape[0] == 1 and pools["evidence"].qkv_E3XD.shape[0] == 2
    assert pools["evidence"].gate_logit_E.shape[0] == pools["hyperbolic"].log_scale_E.shape[0] == 2
    # global experts [vision 0, 1, hyperbolic 0, 1, text 0, 1, evidence 0, 1] -> slots: rank 0's four, then rank 1's
    assert block.slot_E.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    split = {name for name, _ in block.expert_parameters()}
    assert "pools.evidence.memory.gate_EFD" in split and "pools.hyperbolic.gate_bias_EF" in split
    assert not split & {"pools.evidence.qkv_E3XD", "pools.evidence.gate_logit_E", "pools.hyperbolic.log_scale_E",
                        "pools.hyperbolic.curvature.log_c"}
    whole = MoEBlock(variant("asymoe"), D, F, "silu")
    assert whole.slot_E.tolist() == list(range(8))
    assert sum(p.numel() for p in whole.parameters()) > sum(p.numel() for p in block.parameters())


def test_consolidated_weights_load_on_any_expert_parallel_rank(tmp_path, demo_data):
    full = demo_model(demo_data)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p))
    path = str(tmp_path / "model.safetensors")
    save_weights(full, path)
    reference = dict(full.named_parameters())
    for ep_rank in (0, 1):
        part = demo_model(demo_data, SimpleNamespace(ep_rank=ep_rank, ep_size=2))
        load_weights(part, path)
        experts = part.expert_parameters()
        assert experts and all(p.shape[0] * 2 == reference[n].shape[0] for n, p in experts.items())
        for name, p in part.named_parameters():
            want = reference[name]
            if name in experts:
                want = want[ep_rank * p.shape[0] : (ep_rank + 1) * p.shape[0]]
            assert torch.equal(p, want), name


@pytest.mark.parametrize("overrides,world_size,key", [
    (["model/moe=moiie", "model.moe.backend=deepspeed"], 1, "model.moe.backend"),  # moiie is not vanilla
    (["model/moe=vanilla", "model.moe.backend=deepspeed", "model.moe.top_k=1"], 1, "model.moe.top_k"),
    (["model/moe=moiie", "engine.ep_size=2", "engine.zero_stage=3"], 2, "engine.ep_size=2 with engine.zero_stage=3"),
    (["model/moe=asymoe", "engine.ep_size=2"], 2, "model.moe.pools.0.num_experts"),  # 1 vision expert
    (["model/moe=moiie", "engine.ep_size=2"], 3, "engine.ep_size"),
])
def test_validation_rejects_impossible_expert_parallel_configs(overrides, world_size, key, demo_data):
    cfg = load(demo_data, "experiment=demo", *overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, world_size=world_size)


@pytest.mark.parametrize("overrides", [["model/moe=moiie", "engine.ep_size=2", "engine.zero_stage=2"],
                                       ["model/moe=vanilla", "model.moe.backend=deepspeed", "engine.ep_size=2"]])
def test_validation_accepts_expert_parallel_configs(overrides, demo_data):
    validate(load(demo_data, "experiment=demo", *overrides), world_size=2)
