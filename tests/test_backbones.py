"""Backbones from local Hugging Face checkpoints: tiny random Llama, Qwen2, Mistral and Phi-3 LMs and SigLIP and CLIP
towers are saved with save_pretrained, the VLM is built from the paths, and upcycling reproduces the dense logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
)

from asymoe_train.config.derive import image_tokens_per_image
from asymoe_train.config.moe_schema import MoEConfig, PoolConfig, RouterConfig
from asymoe_train.config.schema import (
    BackboneConfig,
    CurriculumConfig,
    DataConfig,
    LMConfig,
    ModelConfig,
    StageConfig,
    TrainConfig,
    VisionConfig,
)
from asymoe_train.config.validate import ConfigError, validate
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.models.backbones import sync_backbone_sizes
from asymoe_train.models.vlm import build_model
from asymoe_train.moe.experts import SwiGLUExperts, mlp_weights
from asymoe_train.moe.hyperbolic_experts import HyperbolicExperts

VOCAB = 64
LMS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
       "mistral": (MistralConfig, MistralForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}
MOIIE = MoEConfig(variant="moiie", top_k=2, router_init_std=0.5, pools=[
    PoolConfig(name="vision", num_experts=2), PoolConfig(name="text", num_experts=2),
    PoolConfig(name="shared", num_experts=2)], routers=[
    RouterConfig(name="vision", modalities=["image"], pools=["vision", "shared"]),
    RouterConfig(name="text", modalities=["text"], pools=["text", "shared"])])


def save_lm(kind: str, path: str, vocab_size: int = VOCAB) -> torch.nn.Module:
    """A tiny random LM of a family, written as a Hugging Face checkpoint; Qwen2 ties its embeddings, as Qwen2-1.5B."""
    config_cls, model_cls = LMS[kind]
    torch.manual_seed(1)
    config = config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=kind == "qwen2", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = model_cls(config).eval()
    model.save_pretrained(path)
    return model


def save_tower(kind: str, path: str, image_size: int = 32) -> torch.nn.Module:
    """A tiny random tower: SigLIP as a full text + vision checkpoint (like google/siglip-so400m-patch14-384), CLIP as
    a vision-only one; returns the vision model."""
    torch.manual_seed(2)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64)
    if kind == "siglip":
        text = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
        model.save_pretrained(path)
        return model.vision_model
    model = CLIPVisionModel(CLIPVisionConfig(**vision)).eval()
    model.save_pretrained(path)
    return model


def model_config(tmp_path, lm: str, tower: str, feature_layer: int = -2) -> ModelConfig:
    """Paths to fresh checkpoints; the sizes stay the tiny defaults, which differ from the checkpoints'."""
    return ModelConfig(backbone=BackboneConfig(vision_path=str(tmp_path / tower), lm_path=str(tmp_path / lm)),
                       vision=VisionConfig(type="siglip", merge=2, feature_layer=feature_layer),
                       lm=LMConfig(type="llama", attn_implementation="eager"), moe=MOIIE)


def batch(num_image_tokens: int):
    """Two sequences sharing one image, one text-only, with right padding."""
    g = torch.Generator().manual_seed(0)
    lengths, images = [12, 9, 7], [True, True, False]
    t = max(lengths)
    ids = torch.zeros(3, t, dtype=torch.long)
    mod = torch.full((3, t), PAD)
    for row, (n, has_image) in enumerate(zip(lengths, images)):
        mod[row, :n] = TEXT
        if has_image:
            mod[row, 2 : 2 + num_image_tokens] = IMAGE
        ids[row, :n] = torch.randint(4, VOCAB, (n,), generator=g)
    return ids, mod, torch.randn(1, 3, 32, 32, generator=g), torch.tensor([0, 0, -1])


@pytest.mark.parametrize("lm,tower", [("llama", "siglip"), ("qwen2", "clip"), ("phi3", "siglip"),
                                      ("mistral", "clip")])
def test_model_from_local_checkpoints_loads_them_and_upcycles_exactly(tmp_path, lm, tower):
    reference_lm = save_lm(lm, str(tmp_path / lm))
    reference_tower = save_tower(tower, str(tmp_path / tower))
    cfg = model_config(tmp_path, lm, tower)
    changes = sync_backbone_sizes(cfg)
    assert (cfg.vision.type, cfg.vision.image_size, cfg.vision.hidden_size, cfg.vision.num_layers) == (tower, 32, 32, 2)
    assert (cfg.lm.type, cfg.lm.hidden_size, cfg.lm.intermediate_size, cfg.lm.num_kv_heads) == (lm, 32, 48, 2)
    assert cfg.lm.vocab_size == VOCAB and cfg.lm.tie_word_embeddings == (lm == "qwen2")
    assert "model.lm.hidden_size: 128 -> 32" in changes
    model = build_model(cfg, VOCAB, 0).eval()

    # the checkpoints' weights, not a fresh init
    for name, tensor in reference_lm.state_dict().items():
        torch.testing.assert_close(model.lm.state_dict()[name], tensor, atol=0, rtol=0)
    for name, tensor in reference_tower.state_dict().items():
        torch.testing.assert_close(model.vision.state_dict()[name], tensor, atol=0, rtol=0)

    # the VLM's own decoder loop computes what the Hugging Face model computes
    ids, mod, pixels, index = batch(image_tokens_per_image(cfg.vision))
    text_ids = ids[2:, :7]
    ours = model(text_ids, torch.full_like(text_ids, TEXT), pixels[:0], torch.tensor([-1])).logits_BTV
    torch.testing.assert_close(ours, reference_lm(text_ids).logits, atol=1e-5, rtol=1e-5)

    # image tokens come from the tower's config; features from the selected hidden state (penultimate here)
    images = model.encode_images(pixels)
    assert images.shape[1] == image_tokens_per_image(cfg.vision) == 4
    hidden = reference_tower(pixels, output_hidden_states=True).hidden_states[-2]
    hidden = hidden[:, 1:] if tower == "clip" else hidden  # CLIP's CLS token is not an image token
    merged = hidden.reshape(1, 2, 2, 2, 2, 32).permute(0, 1, 3, 2, 4, 5).reshape(1, 4, 4 * 32)
    torch.testing.assert_close(images, model.projector(merged), atol=1e-6, rtol=1e-6)

    keep = mod != PAD
    dense = model(ids, mod, pixels, index).logits_BTV
    model.upcycle()
    assert sorted(model.moe_blocks()) == [1, 3]
    upcycled = model(ids, mod, pixels, index).logits_BTV
    torch.testing.assert_close(upcycled[keep], dense[keep], atol=1e-5, rtol=1e-5)
    assert not torch.equal(dense, torch.zeros_like(dense))


def test_feature_layer_selects_the_hidden_state(tmp_path):
    save_lm("llama", str(tmp_path / "llama"))
    save_tower("siglip", str(tmp_path / "siglip"))
    outputs = {}
    for layer in (-1, -2):
        cfg = model_config(tmp_path, "llama", "siglip", feature_layer=layer)
        sync_backbone_sizes(cfg)
        outputs[layer] = build_model(cfg, VOCAB, 0).eval().encode_images(batch(4)[2])
    assert not torch.allclose(outputs[-1], outputs[-2])


def test_phi3_fused_gate_up_is_split_for_every_expert_type():
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, pad_token_id=0)
    mlp = Phi3ForCausalLM(config).model.layers[0].mlp
    gate_FD, up_FD, down_DF = mlp_weights(mlp)
    torch.testing.assert_close(torch.cat([gate_FD, up_FD]), mlp.gate_up_proj.weight, atol=0, rtol=0)
    x_ND = torch.randn(5, 32)
    experts = SwiGLUExperts(2, 32, 48)
    experts.upcycle_from(mlp)
    for e in range(2):
        torch.testing.assert_close(experts.expert(e, x_ND), mlp(x_ND), atol=1e-6, rtol=1e-6)
    wide = SwiGLUExperts(1, 32, 96)  # width 2: hidden units repeated, output halved
    wide.upcycle_from(mlp)
    torch.testing.assert_close(wide.expert(0, x_ND), mlp(x_ND), atol=1e-6, rtol=1e-6)
    hyperbolic = HyperbolicExperts(1, 32, 48)
    hyperbolic.upcycle_from(mlp)
    torch.testing.assert_close(hyperbolic.up_EFD[0], up_FD, atol=0, rtol=0)
    torch.testing.assert_close(hyperbolic.down_EDF[0], down_DF, atol=0, rtol=0)


def test_a_larger_tokenizer_grows_the_checkpoint_embeddings(tmp_path):
    reference = save_lm("llama", str(tmp_path / "llama"))
    save_tower("clip", str(tmp_path / "clip"))
    cfg = model_config(tmp_path, "llama", "clip")
    sync_backbone_sizes(cfg)
    model = build_model(cfg, VOCAB + 6, 0)  # e.g. <image> and <pad> added to the checkpoint's tokenizer
    assert model.lm.get_input_embeddings().weight.shape[0] == VOCAB + 6
    assert model.lm.lm_head.weight.shape[0] == VOCAB + 6
    torch.testing.assert_close(model.lm.get_input_embeddings().weight[:VOCAB],
                               reference.get_input_embeddings().weight, atol=0, rtol=0)


def plan_config(tmp_path, model: ModelConfig) -> TrainConfig:
    stages = {"align": StageConfig(source="s", steps=3, trainable=["projector"]),
              "instruct": StageConfig(source="s", steps=3, trainable=["experts", "routers"], upcycle=True)}
    return TrainConfig(run_dir=str(tmp_path / "run"), model=model,
                       data=DataConfig(root=str(tmp_path / "no_data"), sources={"s": "*.tar"}, max_length=64),
                       curriculum=CurriculumConfig(stages=stages))


def test_plan_counts_parameters_from_the_checkpoint_configs(tmp_path):
    from asymoe_train.plan import make_plan

    save_lm("phi3", str(tmp_path / "phi3"))
    save_tower("siglip", str(tmp_path / "siglip"))
    cfg = plan_config(tmp_path, model_config(tmp_path, "phi3", "siglip"))
    sync_backbone_sizes(cfg.model)
    validate(cfg, world_size=2, files=False)
    plan = make_plan(cfg, world_size=2)
    assert "config.json" in plan.backbones["lm"] and "config.json" in plan.backbones["vision"]
    real = build_model(cfg.model, VOCAB, 0)
    dense = real.parameter_counts()
    real.upcycle()
    upcycled = real.parameter_counts()
    assert (plan.stages[0].total, plan.stages[0].activated) == dense
    assert (plan.stages[1].total, plan.stages[1].activated) == upcycled
    projector = sum(p.numel() for p in real.projector.parameters())
    assert plan.stages[0].params.dense_trainable == projector and plan.stages[0].params.expert_trainable == 0
    experts = sum(p.numel() for block in real.moe_blocks().values() for p in block.pools.parameters())
    assert plan.stages[1].params.expert == plan.stages[1].params.expert_trainable == experts


def test_plan_counts_from_the_sizes_while_the_paths_hold_no_checkpoint(tmp_path):
    from asymoe_train.plan import make_plan

    model = ModelConfig(backbone=BackboneConfig(vision_path="/path/to/tower", lm_path="/path/to/lm"),
                        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                            intermediate_size=64, merge=2),
                        lm=LMConfig(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                                    intermediate_size=48), moe=MOIIE)
    cfg = plan_config(tmp_path, model)
    assert sync_backbone_sizes(cfg.model) == []
    plan = make_plan(cfg, world_size=1)
    assert "holds no checkpoint" in plan.backbones["lm"]
    sized = ModelConfig(vision=model.vision, lm=model.lm, moe=MOIIE)
    assert plan.stages[0].total == build_model(sized, VOCAB, 0).parameter_counts()[0]
    with pytest.raises(ConfigError, match="model.backbone.vision_path"):
        validate(cfg)


def test_paths_without_a_usable_checkpoint_fail_naming_the_key(tmp_path):
    save_tower("siglip", str(tmp_path / "siglip"))
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    cfg = plan_config(tmp_path, model_config(tmp_path, "lm", "siglip"))
    with pytest.raises(ConfigError, match=r"model\.backbone\.lm_path=.*no config\.json"):
        validate(cfg)
    (lm_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"model\.backbone\.lm_path=.*no weights"):
        validate(cfg)
    (lm_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"model\.backbone\.lm_path=.*'gpt2'"):
        sync_backbone_sizes(cfg.model)


@pytest.mark.slow
@pytest.mark.parametrize("lm,tower", [("phi3", "clip"), ("llama", "siglip"), ("qwen2", "clip")])
def test_demo_trains_from_local_checkpoints_with_epochs_and_global_batch(tmp_path, demo_data, lm, tower):
    """Both stages, three optimizer steps in all, from an LM and a tower on disk (every supported family of each
    trains in one of the cases): sizes come from the checkpoints, the tokenizer grows the embeddings, steps and
    accumulation come from epochs and the global batch."""
    save_lm(lm, str(tmp_path / lm))
    save_tower(tower, str(tmp_path / tower), image_size=64)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "asymoe_train.cli", "experiment=demo", f"data.root={demo_data}",
           f"hydra.run.dir={run_dir}", "logger.mode=disabled", "logger.progress=false", "logger.log_every=1",
           "eval.max_samples=8",
           f"model.backbone.lm_path={tmp_path / lm}", f"model.backbone.vision_path={tmp_path / tower}",
           "model.lm.attn_implementation=eager", "data.shuffle_buffer=20", "+data.source_sizes.captions=16",
           "curriculum.stages.align.steps=0", "curriculum.stages.align.epochs=1",
           "curriculum.stages.align.global_batch_size=8", "curriculum.stages.align.batch_size=4",
           "curriculum.stages.align.warmup_ratio=0.5",
           "curriculum.stages.instruct.steps=1", "curriculum.stages.instruct.warmup_steps=0",
           "curriculum.stages.instruct.batch_size=2"]
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from asymoe_train.export import load_run_config

    cfg = load_run_config(str(run_dir))
    align = cfg.curriculum.stages["align"]
    assert (align.steps, align.grad_accum, align.warmup_steps) == (2, 2, 1)
    assert (cfg.model.lm.type, cfg.model.lm.hidden_size, cfg.model.vision.type) == (lm, 32, tower)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert len([m for m in metrics if "loss/lm" in m]) == 3
    assert os.path.isfile(run_dir / "checkpoints" / "instruct" / "model.safetensors")
