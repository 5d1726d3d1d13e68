"""Configs are code: every YAML composes and validates; mistakes fail at start naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from asymoe_train.config import register_configs, to_typed, validate
from asymoe_train.config.validate import ConfigError

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")) if f.endswith(".yaml"))
VARIANTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "model", "moe")) if f.endswith(".yaml"))

register_configs()


def load(demo_data: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={demo_data}", "run_dir=/tmp/unused", *overrides])
    return to_typed(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, demo_data, request):
    cfg = load(demo_data, f"experiment={experiment}")
    if cfg.data.name == "scenes":  # its shards, not the demo's
        cfg = load(request.getfixturevalue("scenes_data"), f"experiment={experiment}")
    if cfg.model.backbone.lm_path or cfg.model.backbone.vision_path:
        # real-scale recipes: weights and data live elsewhere (tests/test_plan.py checks that they are asked for)
        validate(cfg, world_size=8, files=False)
    else:
        validate(cfg, world_size=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_moe_variant_composes_and_validates(variant, demo_data):
    cfg = load(demo_data, "experiment=demo", f"model/moe={variant}")
    validate(cfg)
    assert cfg.model.moe.variant == variant


@pytest.mark.parametrize("group,options", [("engine", "engine"), ("logger", "logger"), ("curriculum", "curriculum")])
def test_every_group_option_composes(group, options, demo_data):
    for name in sorted(f[:-5] for f in os.listdir(os.path.join(CONF, options)) if f.endswith(".yaml")):
        validate(load(demo_data, f"{group}={name}"))


@pytest.mark.parametrize("override,error", [
    ("model.moe.top_k=two", ValidationError),
    ("model.moe.nmu_experts=4", ConfigKeyError),
    ("engine.zero_stagee=1", ConfigKeyError),
    ("curriculum.stages.instruct.lr=fast", ValidationError),
])
def test_typos_and_wrong_types_fail_at_compose_time(override, error, demo_data):
    with pytest.raises((ConfigCompositionException, error)) as info:
        load(demo_data, override)
    assert override.split("=")[0].split(".")[-1] in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("overrides,key", [
    (["model.moe.top_k=5"], "model.moe.top_k"),
    (["model/moe=vanilla", "engine.ep_size=3"], "engine.ep_size"),
    (["engine.zero_stage=4"], "engine.zero_stage"),
    (["model/moe=vanilla", "model.moe.backend=deepspeed", "engine.zero_stage=3"], "model.moe.backend"),
    (["model.vision.merge=3"], "model.vision.merge"),
    (["model.moe.layers=7"], "model.moe.layers"),
    (["curriculum.stages.align.trainable=[projector,everything]"], "curriculum.stages.align.trainable"),
    (["curriculum.stages.align.source=nowhere"], "curriculum.stages.align.source"),
    (["curriculum.stages.align.steps=5"], "curriculum.stages.align.warmup_steps"),
    (["data.sources.qa=missing-*.tar"], "data.sources.qa"),
    (["model.moe.routers.0.modalities=[text]"], "model.moe.routers"),
    (["model/moe=asymoe", "model.moe.evidence.layers=0"], "model.moe.evidence.layers"),
    (["model/moe=asymoe", "model.moe.evidence.num_heads=3"], "model.moe.evidence.num_heads"),
])
def test_validate_names_the_key(overrides, key, demo_data):
    cfg = load(demo_data, *overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


BAD_CHOICES = [  # (the config's overrides, dotted key of a StrEnum choice, a value outside it)
    (["model/moe=dense"], "logger.mode", "loud"),
    (["model/moe=asymoe"], "model.moe.hyperbolic.geometry", "sphere"),
    (["model/moe=asymoe"], "model.moe.evidence.loss_kind", "magic"),
    (["model/moe=dense"], "engine.precision", "fp16"),
    (["model/moe=dense"], "model.lm.type", "gpt2"),
    (["model/moe=dense"], "data.augment", "mixup"),
    (["model/moe=vanilla"], "model.moe.backend", "megablocks"),
    (["model/moe=asymoe_paper"], "model.moe.evidence.form", "concat"),
    (["model/moe=asymoe_paper"], "model.moe.hyperbolic.cone_form", "round"),
    (["experiment=amess_demo"], "model.fusion", "max"),
    (["experiment=amess_demo"], "sync.negatives", "some"),
    (["experiment=amess_demo"], "curriculum.stages.classify.task", "regress"),
]


@pytest.mark.parametrize("overrides,key,value", BAD_CHOICES)
def test_unknown_choices_fail_at_compose_time_naming_the_key_and_the_choices(overrides, key, value, demo_data):
    with pytest.raises(ConfigCompositionException) as info:
        load(demo_data, *overrides, f"{key}={value}")
    cause = str(info.value.__cause__)
    assert f"full_key: {key}" in cause and f"Invalid value '{value}', expected one of [" in cause


@pytest.mark.parametrize("overrides,key,value", BAD_CHOICES)
def test_validate_names_bad_choices_of_configs_built_in_python(overrides, key, value, demo_data):
    cfg = load(demo_data, *overrides)
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    setattr(node, leaf, value)  # a dataclass attribute: nothing checks it until validate
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_world_size_must_be_divisible_by_ep_size(demo_data):
    cfg = load(demo_data, "model/moe=vanilla")
    cfg.engine.ep_size = 2
    with pytest.raises(ConfigError, match="engine.ep_size"):
        validate(cfg, world_size=3)


def test_evaluation_during_a_stage_needs_every_weight_on_rank_0(demo_data):
    cfg = load(demo_data, "model/moe=vanilla", "eval.every_steps=50")
    validate(cfg, world_size=2)  # data parallel: rank 0 holds every weight
    cfg.engine.ep_size = 2
    with pytest.raises(ConfigError, match=r"eval\.every_steps=50 with engine\.ep_size=2"):
        validate(cfg, world_size=2)
    cfg.eval.every_steps = -1
    cfg.engine.ep_size = 1
    with pytest.raises(ConfigError, match=r"eval\.every_steps"):
        validate(cfg)


@pytest.mark.parametrize("override,key", [("model.moe.top_k=two", "model.moe.top_k"),
                                          ("model.moe.nmu_experts=4", "model.moe.nmu_experts")])
def test_cli_rejects_bad_overrides_fast(override, key):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "asymoe_train.cli", override], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    assert time.perf_counter() - start < 10


def test_cli_prints_the_resolved_config():
    proc = subprocess.run([sys.executable, "-m", "asymoe_train.cli", "--cfg", "job", "experiment=demo"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "experiment: demo" in proc.stdout and "variant: asymoe" in proc.stdout


def test_resolve_parses_layer_specs_and_sources_once(demo_data, monkeypatch):
    """After resolve the config holds layer lists and source mixtures; the model and the data streams read them
    without parsing a spec string again, and the saved config composes back onto the schema."""
    from omegaconf import OmegaConf

    from asymoe_train.config import derive
    from asymoe_train.config.schema import TrainConfig
    from asymoe_train.data import pipeline
    from asymoe_train.models.vlm import build_model

    cfg = load(demo_data, "experiment=demo", "model/moe=asymoe", "model.moe.evidence.layers=deep_half")
    validate(cfg)
    changes = derive.resolve(cfg, world_size=1)
    assert cfg.model.moe.layers == [1, 3] and cfg.model.moe.evidence.layers == [3]
    assert "model.moe.layers: odd -> [1, 3]" in changes and "model.moe.evidence.layers: deep_half -> [3]" in changes
    assert cfg.data.sources["qa"] == {"qa": {"glob": "qa-train-*.tar", "weight": 1.0}}
    assert derive.resolve(cfg, world_size=1) == []  # resolving twice changes nothing

    layer_list, source_parts = derive._layer_list, pipeline.source_parts

    def no_strings(key, spec, *args):
        assert not isinstance(spec, str), f"{key}={spec!r} parsed after resolve"
        return layer_list(key, spec, *args)

    def no_globs(key, value):
        assert not isinstance(value, str), f"{key}={value!r} parsed after resolve"
        return source_parts(key, value)

    monkeypatch.setattr(derive, "_layer_list", no_strings)
    monkeypatch.setattr(pipeline, "source_parts", no_globs)
    model = build_model(cfg.model, 64, 0)
    model.upcycle()
    assert model.moe_layers == [1, 3]
    assert [i for i in model.moe_layers if "evidence" in model.layers[i].mlp.pools] == [3]
    spec = pipeline.stream_spec(cfg.data, cfg.data.sources["qa"], seed=0)
    assert spec.urls and not spec.mixture

    saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(OmegaConf.to_yaml(
        OmegaConf.structured(cfg))))
    assert to_typed(saved).model.moe.layers == [1, 3]
