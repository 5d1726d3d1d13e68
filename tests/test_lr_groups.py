"""Per-group learning rates of a stage (``curriculum.stages.<s>.lr_scale`` / ``lr_groups``): validation, the
optimizer groups they make, and the schedule that continues them after a resume. That they survive a checkpoint on
another layout is shown by tests/test_reshard.py (the vision tower there trains at a tenth of the lr)."""

from __future__ import annotations

import pytest
import torch
from test_config import load
from test_efficiency import moe_config, tiny, upcycled

from asymoe_train.config.derive import lr_group_of, tag_lr
from asymoe_train.config.schema import StageConfig
from asymoe_train.config.validate import ConfigError, validate
from asymoe_train.training.groups import optimizer_groups, parameter_groups, set_trainable
from asymoe_train.training.schedule import cosine_with_warmup, rebase_schedule

TRAIN_ALL = ["vision", "projector", "embeddings", "attention", "norms", "mlp", "experts", "routers"]


def test_each_group_gets_its_lr_the_most_specific_key_first():
    stage = StageConfig(source="qa", lr=1e-4, lr_scale={"vision": 0.1, "experts": 2.0},
                        lr_groups={"experts.evidence": 3e-5})
    assert (lr_group_of(stage, "vision"), tag_lr(stage, "vision")) == ("vision", pytest.approx(1e-5))
    assert (lr_group_of(stage, "experts.text"), tag_lr(stage, "experts")) == ("experts", pytest.approx(2e-4))
    assert (lr_group_of(stage, "experts.evidence"), tag_lr(stage, "experts.evidence")) == ("experts.evidence", 3e-5)
    assert (lr_group_of(stage, "attention"), tag_lr(stage, "default")) == ("default", 1e-4)


def test_optimizer_groups_hold_every_trainable_parameter_once_at_its_lr():
    model = upcycled(tiny(moe_config("asymoe_paper")))
    stage = StageConfig(source="qa", lr=1e-4, trainable=TRAIN_ALL, lr_scale={"vision": 0.1},
                        lr_groups={"experts.evidence": 3e-5})
    set_trainable(model, stage.trainable)
    model.vision.requires_grad_(True)
    groups = optimizer_groups(model, stage)
    assert [g["lr_group"] for g in groups] == ["default", "experts.evidence", "vision"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 3e-5, 1e-5])
    by_group = parameter_groups(model)
    members = {tag: {id(p) for p in g["params"]} for tag, g in zip(["default", "evidence", "vision"], groups)}
    assert members["vision"] == {id(p) for _, p in by_group["vision"]}
    assert members["evidence"] == {id(p) for _, p in by_group["experts.evidence"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(m) for m in members.values()) == len(trainable) == len(set().union(*members.values()))
    # AdamW and the schedule take each group's lr as its peak
    optimizer = torch.optim.AdamW(groups, lr=stage.lr)
    scheduler = cosine_with_warmup(optimizer, 10, 0, 0.1)
    assert scheduler.base_lrs == pytest.approx([1e-4, 3e-5, 1e-5])
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    factor = optimizer.param_groups[0]["lr"] / 1e-4
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([factor * 1e-4, factor * 3e-5, factor * 1e-5])
    # a resumed run with other lrs continues the schedule from its step with its own peaks, by tag
    rebase_schedule(scheduler, StageConfig(source="qa", lr=2e-4, lr_scale={"vision": 0.5},
                                           lr_groups={"experts.evidence": 1e-5}))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([factor * 2e-4, factor * 1e-5,
                                                                       factor * 1e-4])


def test_a_stage_without_per_group_lrs_has_one_group():
    model = upcycled(tiny(moe_config("moiie")))
    set_trainable(model, ["projector", "experts"])
    groups = optimizer_groups(model, StageConfig(source="qa", lr=1e-3))
    assert len(groups) == 1 and groups[0]["lr_group"] == "default" and groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("overrides,key", [
    (["+curriculum.stages.align.lr_scale.routers=0.1"], "curriculum.stages.align.lr_scale.routers"),  # not trained
    (["+curriculum.stages.instruct.lr_groups.routers=0.0"], "curriculum.stages.instruct.lr_groups.routers"),
    (["+curriculum.stages.instruct.lr_groups.routers=1e-3", "+curriculum.stages.instruct.lr_scale.routers=2"],
     "lr_scale and lr_groups"),
])
def test_validation_names_the_bad_lr_key(overrides, key, demo_data):
    with pytest.raises(ConfigError, match=key):
        validate(load(demo_data, "experiment=demo", *overrides))


def test_paper_recipes_train_the_tower_at_2e_6_and_the_rest_at_2e_5(demo_data):
    for experiment in ("asymoe_phi3_mini", "asymoe_llama3_8b"):
        stage = load(demo_data, f"experiment={experiment}").curriculum.stages["instruct"]
        assert "vision" in stage.trainable and stage.lr == 2e-5
        assert tag_lr(stage, lr_group_of(stage, "vision")) == 2e-6
        assert tag_lr(stage, lr_group_of(stage, "experts.evidence")) == 2e-5
