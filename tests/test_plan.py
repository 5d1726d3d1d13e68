"""``asymoe-train plan`` and the real-scale recipes: the printed plan agrees with parameter arithmetic from the
published model sizes, the memory formula shards as documented, and each recipe composes but asks for its weights."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from asymoe_train.config.derive import resolve
from asymoe_train.config.validate import ConfigError, validate
from asymoe_train.models.backbones import sync_backbone_sizes
from asymoe_train.plan import ParamSplit, compose_config, make_plan, memory_per_gpu, plan_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"asymoe_llama3_8b": "siglip", "asymoe_phi3_mini": "siglip", "moe_llava_qwen2": "clip",
           "moiie_llama3_8b": "siglip", "moiie_phi3_mini": "siglip"}
# activated parameters per token of the AsyMoE paper's Table 1
PAPER_ACTIVATED = {"asymoe_phi3_mini": 4.1e9, "asymoe_llama3_8b": 10.8e9, "moiie_phi3_mini": 5.5e9,
                   "moiie_llama3_8b": 11.3e9}
GIB = 1024**3


def llama3_8b_by_hand() -> dict[str, float]:
    """SigLIP-so400m-384 + 2-layer GELU projector + Llama-3-8B, the paper's AsyMoE pools as the recipe sets them
    (model/moe=asymoe_paper: vision, hyperbolic and text experts of a quarter of the FFN's width, the paper-form
    evidence expert of half its width; top-2) in the 16 odd decoder layers, from the published sizes."""
    # SigLIP-so400m-patch14-384: width W, MLP M, 27 layers, (384 // 14)^2 = 729 patches, attention-pooling head
    W, M, patches = 1152, 4304, (384 // 14) ** 2
    attention = 4 * (W * W + W)  # q, k, v, o with biases
    mlp = (W * M + M) + (M * W + W)
    layer = attention + mlp + 2 * 2 * W  # two LayerNorms
    embeddings = 3 * 14 * 14 * W + W + patches * W  # patch conv + bias, position embeddings
    head = W + attention + 2 * W + mlp  # probe, attention, LayerNorm, MLP
    siglip = embeddings + 27 * layer + 2 * W + head
    # Llama-3-8B: hidden D, FFN F, 32 layers, 32 heads of 128, 8 KV heads, vocab 128256, untied head
    D, F, V, kv = 4096, 14336, 128256, 8 * 128
    ffn = 3 * D * F
    llama = 2 * V * D + 32 * (2 * D * D + 2 * D * kv + ffn + 2 * D) + D
    projector = (W * D + D) + (D * D + D)
    dense = siglip + llama + projector
    # per MoE layer: 2 FFN experts of F / 4 hidden units; 1 hyperbolic one of F / 4 with biases and Lorentz time
    # columns (4 F / 4 + 2D) and a pre-scale (its curvature is fixed: a buffer); 1 paper-form evidence expert of
    # F / 2: memory FFN (3 D F / 2) + evidence FFN over [h; Attn] (gate and up 2D -> F / 2, down: 5 D F / 2) + q, k, v
    # (3 D^2) + null key (D) + per-token gate (D + 1) + learned score weight (D); routers over {vision, hyperbolic}
    # (2) and {text, hyperbolic, evidence} (3)
    quarter = 3 * D * (F // 4)
    hyperbolic = quarter + 4 * (F // 4) + 2 * D + 1
    evidence = 8 * D * (F // 2) + 3 * D * D + 3 * D + 1
    experts = 2 * quarter + hyperbolic + evidence
    routers = (2 + 3) * D
    upcycled = dense + 16 * (experts + routers - ffn)
    # top-2 of the largest experts a router reaches: the text router's evidence and hyperbolic experts
    activated = upcycled - 16 * experts + 16 * (evidence + hyperbolic)
    return {"dense": dense, "upcycled": upcycled, "activated": activated, "siglip": siglip, "projector": projector}


def parse_stage(text: str, stage: str) -> dict[str, float]:
    block = text.split(f"stage {stage} (", 1)[1].split("\nstage ", 1)[0]

    def number(pattern: str) -> float:
        match = re.search(pattern, block)
        assert match, f"{pattern!r} not in:\n{block}"
        return float(match.group(1).replace(",", ""))

    def size(label: str) -> float:  # GiB
        match = re.search(rf"{label} ([\d.]+) (GiB|MiB)", block)
        assert match, f"{label!r} not in:\n{block}"
        return float(match.group(1)) / (1 if match.group(2) == "GiB" else 1024)

    return {
        "total": number(r"parameters: total ([\d,]+)"),
        "activated": number(r"activated per token ([\d,]+)"),
        "trainable": number(r"trainable: ([\d,]+)"),
        "weights": size("weights"),
        "gradients": size("gradients"),
        "optimizer": size("optimizer states"),
        "tokens": number(r"at most ([\d,]+) tokens"),
        "image_tokens": number(r"at most ([\d,]+) image tokens"),
        "steps_per_epoch": number(r"steps per epoch: ([\d,]+)"),
        "steps": number(r"steps: ([\d,]+)"),
        "warmup": number(r"warm-up ([\d,]+)"),
    }


def close(printed: float, expected: float, rel: float = 0.05) -> bool:
    return abs(printed - expected) <= rel * abs(expected)


def test_plan_of_llama3_8b_on_8_gpus_agrees_with_the_hand_calculation():
    proc = subprocess.run([sys.executable, "-m", "asymoe_train.cli", "plan", "experiment=asymoe_llama3_8b",
                           "world_size=8", "engine.zero_stage=2"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    hand = llama3_8b_by_hand()
    assert "zero_stage=2 ep_size=1 precision=bf16" in text and "729 image tokens per image" in text

    # stage 1: dense model, projector only; bf16 weights everywhere (ZeRO-2 does not shard them), gradients and
    # fp32 master + Adam moments of the projector sharded over 8 ranks
    align = parse_stage(text, "align")
    assert close(align["total"], hand["dense"]) and close(align["activated"], hand["dense"])
    assert close(align["trainable"], hand["projector"])
    assert close(align["weights"], 2 * hand["dense"] / GIB)
    assert close(align["gradients"], 2 * hand["projector"] / 8 / GIB)
    assert close(align["optimizer"], 12 * hand["projector"] / 8 / GIB)
    assert align["tokens"] == 256 * 4096 and align["image_tokens"] == 256 * 729
    assert align["steps_per_epoch"] == align["steps"] == math.ceil(558128 / 256)
    assert align["warmup"] == math.ceil(0.03 * align["steps"])

    # stage 2: upcycled, everything trains (the tower at its own lr, as the paper)
    instruct = parse_stage(text, "instruct")
    trainable = hand["upcycled"]
    assert close(instruct["total"], hand["upcycled"]) and close(instruct["activated"], hand["activated"])
    assert close(instruct["trainable"], trainable)
    assert close(instruct["weights"], 2 * hand["upcycled"] / GIB)
    assert close(instruct["gradients"], 2 * trainable / 8 / GIB)
    assert close(instruct["optimizer"], 12 * trainable / 8 / GIB)
    assert instruct["tokens"] == 128 * 4096 and instruct["image_tokens"] == 128 * 729
    assert instruct["steps_per_epoch"] == instruct["steps"] == math.ceil(665298 / 128)
    assert "grad_accum 4 x 8 ranks" in text  # global batch 128 = 4 per rank x 4 x 8
    assert "before training: model.backbone.vision_path=" in text


def test_memory_formula_shards_as_documented():
    params = ParamSplit(dense=1000, expert=800, dense_trainable=600, expert_trainable=400)
    # ZeRO-0, fp32: nothing sharded; 4 bytes weights and gradients, 8 bytes Adam moments
    m = memory_per_gpu(params, world_size=8, ep_size=1, zero_stage=0, precision="fp32")
    assert (m.weights, m.gradients, m.optimizer) == (4 * 1800, 4 * 1000, 8 * 1000)
    # bf16 with EP 2: each rank holds half the experts; ZeRO shards dense over 8, experts over 8 / 2 = 4 ranks
    for stage, (w, g, o) in {
        0: (2 * (1000 + 400), 2 * (600 + 200), 12 * (600 + 200)),
        1: (2 * (1000 + 400), 2 * (600 + 200), 12 * (600 / 8 + 200 / 4)),
        2: (2 * (1000 + 400), 2 * (600 / 8 + 200 / 4), 12 * (600 / 8 + 200 / 4)),
        3: (2 * (1000 / 8 + 400 / 4), 2 * (600 / 8 + 200 / 4), 12 * (600 / 8 + 200 / 4)),
    }.items():
        m = memory_per_gpu(params, world_size=8, ep_size=2, zero_stage=stage, precision="bf16")
        assert (m.weights, m.gradients, m.optimizer) == pytest.approx((w, g, o)), stage
        assert m.total == pytest.approx(w + g + o)


@pytest.mark.parametrize("recipe,tower", sorted(RECIPES.items()))
def test_recipe_composes_plans_and_asks_for_its_weights(recipe, tower, tmp_path):
    cfg = compose_config([f"experiment={recipe}"])
    assert cfg.model.vision.patch_size == 14 and cfg.model.vision.feature_layer == -2 and cfg.model.vision.merge == 1
    validate(cfg, world_size=8, files=False)
    with pytest.raises(ConfigError, match=r"model\.backbone\.vision_path=.*set model\.backbone\.vision_path="):
        validate(cfg, world_size=8)
    # with a tower in place, the LM path is what is missing next, then the data
    from test_backbones import save_lm, save_tower

    save_tower(tower, str(tmp_path / "tower"))
    cfg.model.backbone.vision_path = str(tmp_path / "tower")
    with pytest.raises(ConfigError, match=r"model\.backbone\.lm_path=.*set model\.backbone\.lm_path="):
        validate(cfg, world_size=8)
    save_lm("llama", str(tmp_path / "lm"))
    cfg.model.backbone.lm_path = str(tmp_path / "lm")
    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        validate(cfg, world_size=8)


@pytest.mark.parametrize("recipe", sorted(PAPER_ACTIVATED))
def test_paper_recipes_activate_the_papers_budget_under_zero3(recipe):
    cfg = compose_config([f"experiment={recipe}"])
    assert cfg.engine.zero_stage == 3 and cfg.engine.ep_size == 1
    sync_backbone_sizes(cfg.model)
    validate(cfg, 8, files=False)
    resolve(cfg, 8)
    instruct = make_plan(cfg, 8).stages[-1]
    assert instruct.upcycled
    assert abs(instruct.activated / PAPER_ACTIVATED[recipe] - 1) < 0.05, instruct.activated


def test_three_stage_curriculum_upcycles_in_its_last_stage():
    cfg = compose_config(["experiment=moe_llava_qwen2"])
    stages = cfg.curriculum.stages
    assert list(stages) == ["align", "dense", "moe"]
    assert [s.upcycle for s in stages.values()] == [False, False, True]
    assert stages["align"].trainable == ["projector"] and stages["moe"].trainable == ["experts", "routers"]
    assert "mlp" in stages["dense"].trainable and cfg.model.moe.layers == "even"


def test_epochs_and_global_batch_resolve_per_world_size():
    cfg = compose_config(["experiment=asymoe_phi3_mini"])
    validate(cfg, world_size=4, files=False)
    resolve(cfg, world_size=4)
    instruct = cfg.curriculum.stages["instruct"]
    assert instruct.grad_accum == 128 // (8 * 4)
    assert instruct.steps == math.ceil(665298 / 128) and instruct.warmup_steps == math.ceil(0.03 * instruct.steps)
    with pytest.raises(ConfigError, match=r"curriculum\.stages\.align\.global_batch_size=256"):
        validate(compose_config(["experiment=asymoe_phi3_mini"]), world_size=3, files=False)
    with pytest.raises(ConfigError, match=r"data\.source_sizes\.instruct"):
        validate(compose_config(["experiment=asymoe_phi3_mini", "~data.source_sizes.instruct"]), world_size=4,
                 files=False)
    key = r"curriculum\.stages\.instruct"
    with pytest.raises(ConfigError, match=rf"{key}\.steps .*or {key}\.epochs"):
        validate(compose_config(["experiment=asymoe_phi3_mini", "curriculum.stages.instruct.epochs=0"]), world_size=4,
                 files=False)


def test_plan_says_when_steps_per_epoch_are_unknown(demo_data):
    text = plan_command([f"data.root={demo_data}", "experiment=demo", "world_size=2"])
    assert "steps per epoch: unknown (set data.source_sizes.captions" in text
    assert "ready to train" in text
    sized = plan_command([f"data.root={demo_data}", "experiment=demo", "+data.source_sizes.captions=4000"])
    assert "steps per epoch: 125 (4,000 samples in captions)" in sized  # 4000 / (32 x 1 x 1)


def test_plan_rejects_a_bad_world_size_and_bad_overrides():
    with pytest.raises(ValueError, match="world_size"):
        plan_command(["experiment=asymoe_phi3_mini", "world_size=zero"])
    with pytest.raises(ValueError, match="nmu_experts"):
        plan_command(["experiment=asymoe_phi3_mini", "model.moe.nmu_experts=4"])
    with pytest.raises(ConfigError, match=r"engine\.ep_size"):
        plan_command(["experiment=moe_llava_qwen2", "world_size=6", "engine.ep_size=4"])
