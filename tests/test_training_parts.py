"""The trainer's parts on their own, without DeepSpeed or a process group: where a run starts (resume, init_from,
layouts), which stages it trains, the stateful components, stop signals, the step function and the DeepSpeed
version guard."""

from __future__ import annotations

import configparser
import math
import os
import signal

import numpy as np
import pytest
import torch
from test_model import MOIIE, VOCAB, batch, tiny

from asymoe_train.checkpoint.deepspeed_optim import UnsupportedDeepSpeed, check_version, pinned_range
from asymoe_train.checkpoint.rng import ProcessRng
from asymoe_train.checkpoint.store import TrainerState
from asymoe_train.config.moe_schema import EvidenceConfig
from asymoe_train.config.schema import (
    CurriculumConfig,
    EngineConfig,
    LoggerConfig,
    LossConfig,
    StageConfig,
    TrainConfig,
)
from asymoe_train.data.batch import Batch
from asymoe_train.data.conversation import IGNORE
from asymoe_train.data.positions import StreamPositions
from asymoe_train.modality import PAD
from asymoe_train.models.vlm import build_model
from asymoe_train.observability.logger import MetricsLogger
from asymoe_train.training import resume
from asymoe_train.training.groups import set_trainable
from asymoe_train.training.signals import Preempted, StopSignals
from asymoe_train.training.step import TrainStep
from asymoe_train.training.trainer import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(batch_size: int = 4, grad_accum: int = 1, **model) -> TrainConfig:
    stages = {"align": StageConfig(source="s", steps=4, batch_size=batch_size, grad_accum=grad_accum,
                                   trainable=["projector"]),
              "instruct": StageConfig(source="s", steps=6, batch_size=batch_size, grad_accum=grad_accum,
                                      trainable=["experts"], upcycle=True)}
    cfg = TrainConfig(run_dir="/tmp/unused", curriculum=CurriculumConfig(stages=stages))
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def checkpoint_of(cfg: TrainConfig, stage: str = "instruct", step: int = 3, stage_done: bool = False,
                  world_size: int = 1) -> TrainerState:
    index = list(cfg.curriculum.stages).index(stage)
    return TrainerState(stage=stage, stage_index=index, step=step, global_step=4 * index + step, stage_done=stage_done,
                        data_position={0: (1, 2, 3)}, wandb_id="run1", config=resume.resolved_yaml(cfg),
                        layout=resume.layout_of(cfg.engine, world_size))


def test_resume_accepts_the_same_run_and_another_split_of_the_same_global_batch():
    cfg = config()
    assert resume.check_resume(checkpoint_of(cfg), "ckpt", resume.resolved_yaml(cfg), world_size=1) == []
    # 2 ranks x 2 per rank: the same 4 samples per optimizer step as 1 rank x 4
    split = config(batch_size=2)
    assert resume.check_resume(checkpoint_of(cfg), "ckpt", resume.resolved_yaml(split), world_size=2) == [
        "curriculum"]  # accepted, and named in the warning
    other_seed = config()
    other_seed.seed = 7
    assert resume.check_resume(checkpoint_of(cfg), "ckpt", resume.resolved_yaml(other_seed), 1) == ["seed"]


def test_resume_refuses_another_model_curriculum_or_stage_order():
    cfg = config()
    with pytest.raises(ValueError, match="resume: curriculum differs"):
        resume.check_resume(checkpoint_of(cfg), "ckpt", resume.resolved_yaml(config(batch_size=2)), world_size=1)
    with pytest.raises(ValueError, match="resume: model differs"):
        resume.check_resume(checkpoint_of(cfg), "ckpt", resume.resolved_yaml(config(compile_moe=True)), 1)
    state = checkpoint_of(cfg)
    state.stage_index = 0
    with pytest.raises(ValueError, match="does not have at that place"):
        resume.check_resume(state, "ckpt", resume.resolved_yaml(cfg), 1)


def test_init_from_takes_a_finished_earlier_stage_and_starts_a_new_wandb_run():
    cfg = config()
    state, path = resume.check_init(checkpoint_of(cfg, "align", 4, stage_done=True), "ckpt",
                                    resume.resolved_yaml(config(compile_moe=True)), 1)  # how it runs may change
    assert path == "ckpt" and state.stage == "align" and state.wandb_id == "" and state.data_position == {}
    with pytest.raises(ValueError, match="a mid-stage checkpoint"):
        resume.check_init(checkpoint_of(cfg, "align", 2), "ckpt", resume.resolved_yaml(cfg), 1)
    with pytest.raises(ValueError, match="not the last"):
        resume.check_init(checkpoint_of(cfg, "instruct", 6, stage_done=True), "ckpt", resume.resolved_yaml(cfg), 1)
    changed = config()
    changed.curriculum.stages["align"].lr = 1.0
    with pytest.raises(ValueError, match=r"curriculum\.stages\.align"):
        resume.check_init(checkpoint_of(cfg, "align", 4, stage_done=True), "ckpt", resume.resolved_yaml(changed), 1)


def test_init_from_lets_model_moe_change_only_while_the_weights_are_dense():
    cfg = config()
    variant = config()
    variant.model.moe = MOIIE
    resume.check_init(checkpoint_of(cfg, "align", 4, stage_done=True), "ckpt", resume.resolved_yaml(variant), 1)
    upcycled_early = config()
    upcycled_early.curriculum.stages["align"].upcycle = True
    upcycled_early.curriculum.stages["instruct"].upcycle = False
    variant.curriculum = upcycled_early.curriculum
    with pytest.raises(ValueError, match=r"model\.moe"):
        resume.check_init(checkpoint_of(upcycled_early, "align", 4, stage_done=True), "ckpt",
                          resume.resolved_yaml(variant), 1)


def test_stage_plan_and_where_finished_stages_are():
    names = ["align", "instruct", "polish"]
    mid = TrainerState(stage="instruct", stage_index=1, step=3, global_step=7, stage_done=False)
    end = TrainerState(stage="instruct", stage_index=1, step=6, global_step=10, stage_done=True)
    assert resume.stage_plan(names, None) == ["train", "train", "train"]
    assert resume.stage_plan(names, mid) == ["done", "resume", "train"]
    assert resume.stage_plan(names, end) == ["done", "done", "train"]
    assert resume.stage_checkpoint("run", "instruct", (end, "other/instruct")) == "other/instruct"
    assert resume.stage_checkpoint("run", "instruct", (mid, "run/ckpt")) == os.path.join("run", "checkpoints",
                                                                                        "instruct")


def test_layout_policy_needs_optimizer_state_by_name_only_mid_stage(tmp_path):
    cfg = config()
    zero2 = {"world_size": 2, "ep_size": 1, "zero_stage": 2, "precision": "fp32"}
    state = checkpoint_of(cfg)
    state.layout = zero2
    resume.check_layout(state, str(tmp_path), zero2)
    with pytest.raises(ValueError, match="resumes on its own layout only"):
        resume.check_layout(state, str(tmp_path), {**zero2, "world_size": 1})
    state.stage_done = True
    resume.check_layout(state, str(tmp_path), {**zero2, "world_size": 1})


def test_stateful_components_round_trip(tmp_path):
    rng = ProcessRng()
    saved = rng.state_dict()
    first = (torch.rand(3), np.random.rand(), __import__("random").random())
    rng.load_state_dict(saved)
    again = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]

    positions = StreamPositions()
    positions.update({0: (1, 5, 5)})
    positions.update({0: (1, 6, 6), 3: (0, 2, 2)})
    restored = StreamPositions()
    restored.load_state_dict(positions.state_dict())
    assert restored.positions == {0: (1, 6, 6), 3: (0, 2, 2)}

    progress = Progress("instruct", 1, 3, 7)
    other = Progress()
    other.load_state_dict(progress.state_dict())
    assert other == progress

    logger = MetricsLogger(LoggerConfig(mode="disabled"), str(tmp_path), "run", {})
    logger.load_state_dict({"wandb_id": "abc"})
    assert logger.state_dict() == {"wandb_id": "abc"}
    logger.close()


def test_stop_signals_are_recorded_then_handed_on():
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        with pytest.raises(Preempted), StopSignals() as stop:
            assert stop.requested() == 0
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.requested() == signal.SIGUSR1 and calls == []  # recorded, not handled yet
            raise Preempted("ckpt", signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]  # the handler installed before gets the signal after the checkpoint
        assert signal.getsignal(signal.SIGUSR1) is not stop._record
    finally:
        signal.signal(signal.SIGUSR1, previous)


class PlainEngine:
    """What TrainStep needs of a DeepSpeed engine, over a torch optimizer (no accumulation); like DeepSpeed's engine,
    it counts a step as skipped when the optimizer's ``overflow`` flag is up."""

    def __init__(self, model: torch.nn.Module):
        self.module = model
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        self.applied = True

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.applied = not getattr(self.optimizer, "overflow", False)

    def was_step_applied(self) -> bool:
        return self.applied

    def get_global_grad_norm(self):
        return None


def test_train_step_trains_a_model_and_returns_its_metrics():
    model = build_model(tiny(MOIIE), VOCAB, 0, seed=0)
    model.upcycle()
    set_trainable(model, ["experts", "routers"])
    ids, mod, pixels, index = batch()
    labels = torch.where(mod == PAD, IGNORE, ids)
    data = Batch(ids, labels, mod, pixels, index, mod != PAD, num_samples=3)
    train_step = TrainStep(PlainEngine(model), model, LossConfig(balance=0.01, z=0.0), EvidenceConfig(),
                           EngineConfig())
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    first = train_step(data, measure_grad_norm=True)
    assert {"loss/total", "loss/lm", "loss/balance", "grad_norm"} <= set(first) and "loss/z" not in first
    assert first["grad_norm"] > 0
    assert any(not torch.equal(p, experts[n]) for n, p in model.named_parameters() if n in experts)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(key.startswith("moe/L1/") for key in train_step.load.metrics())
    for _ in range(5):
        last = train_step(data)
    assert "grad_norm" not in last and last["loss/lm"] < first["loss/lm"]
    assert first["guard/skipped"] == last["guard/skipped"] == 0.0


def test_train_step_skips_a_non_finite_step_before_the_optimizer():
    model = build_model(tiny(MOIIE), VOCAB, 0, seed=0)
    model.upcycle()
    set_trainable(model, ["experts", "routers"])
    ids, mod, pixels, index = batch()
    data = Batch(ids, torch.where(mod == PAD, IGNORE, ids), mod, pixels, index, mod != PAD, num_samples=3)
    train_step = TrainStep(PlainEngine(model), model, LossConfig(balance=0.01, z=0.0), EvidenceConfig(),
                           EngineConfig())
    train_step.nan_steps = {1}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    skipped = train_step(data, step=1, measure_grad_norm=True)
    assert skipped["guard/skipped"] == 1.0 and not math.isfinite(skipped["grad_norm"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing moved
    assert train_step(data, step=2)["guard/skipped"] == 0.0  # the next finite step trains
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_deepspeed_adapter_checks_the_pinned_version_range():
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    pinned = next(line.split("deepspeed", 1)[1] for line in setup["options"]["install_requires"].split("\n")
                  if line.strip().startswith("deepspeed"))
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(pinned_range()) == SpecifierSet(pinned)
    check_version("0.19.8", pinned_range())
    for outside in ("0.18.9", "0.20.0"):
        with pytest.raises(UnsupportedDeepSpeed, match=rf"deepspeed {outside} is installed.*install `deepspeed"):
            check_version(outside, pinned_range())
