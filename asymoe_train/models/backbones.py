"""Hugging Face backbones, built from the sizes in the config (random init) or loaded from local checkpoints
(``model.backbone.vision_path`` / ``model.backbone.lm_path``). Never downloads.

Under ``with torch.device("meta")`` (how parameters are counted) a checkpoint contributes its ``config.json`` only:
no weights are read and nothing is allocated.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from asymoe_train.config.errors import ConfigError
from asymoe_train.config.names import LM_TYPES, VISION_TYPES
from asymoe_train.config.schema import LMConfig, ModelConfig, VisionConfig

VISION_MODELS = {"siglip": (SiglipVisionConfig, SiglipVisionModel), "clip": (CLIPVisionConfig, CLIPVisionModel)}
LM_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "phi3": Phi3Config}
assert tuple(VISION_MODELS) == VISION_TYPES and tuple(LM_CONFIGS) == LM_TYPES, "asymoe_train.config.names lists them"
# model_type of a checkpoint's config.json -> model.vision.type; full (text + vision) checkpoints such as
# google/siglip-so400m-patch14-384 or openai/clip-vit-large-patch14-336 load their vision half
VISION_MODEL_TYPES = {"siglip": "siglip", "siglip_vision_model": "siglip", "clip": "clip", "clip_vision_model": "clip"}
# model.vision.* / model.lm.* field -> Hugging Face config attribute
VISION_FIELDS = {"image_size": "image_size", "patch_size": "patch_size", "hidden_size": "hidden_size",
                 "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "intermediate_size": "intermediate_size"}
LM_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
             "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
             "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings",
             "tie_word_embeddings": "tie_word_embeddings"}


def has_checkpoint(path: str) -> bool:
    """Whether ``path`` is a directory with a Hugging Face ``config.json``."""
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def _checkpoint(key: str, path: str) -> str:
    if not has_checkpoint(path):
        raise ValueError(f"{key}={path!r} holds no Hugging Face checkpoint (no config.json); point it at a local "
                         "checkpoint directory")
    return path


def _model_type(key: str, path: str, known: dict) -> str:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type", "")
    if model_type not in known:
        raise ConfigError(f"{key}={path!r} holds a {model_type or 'untyped'!r} model; supported: {sorted(known)}")
    return model_type


def vision_checkpoint_config(path: str) -> PretrainedConfig:
    """The vision config of a SigLIP or CLIP checkpoint (the ``vision_config`` of a full text + vision one)."""
    vision_type = VISION_MODEL_TYPES[_model_type("model.backbone.vision_path", path, VISION_MODEL_TYPES)]
    return VISION_MODELS[vision_type][0].from_pretrained(path, local_files_only=True)


def lm_checkpoint_config(path: str) -> PretrainedConfig:
    """The config of a Llama, Qwen2, Mistral or Phi-3 checkpoint."""
    _model_type("model.backbone.lm_path", path, LM_CONFIGS)
    return AutoConfig.from_pretrained(path, local_files_only=True)


def sync_backbone_sizes(cfg: ModelConfig) -> list[str]:
    """Overwrite the type and sizes in ``cfg.vision`` / ``cfg.lm`` with those of the checkpoints their backbone
    paths hold (in place), so image-token counts, validation and plans follow the checkpoint; returns the changes as
    ``"key: old -> new"``. Paths without a ``config.json`` are left for ``validate`` to report."""
    changes: list[str] = []

    def set_field(section: str, target, name: str, value) -> None:
        if value is not None and getattr(target, name) != value:
            changes.append(f"model.{section}.{name}: {getattr(target, name)} -> {value}")
            setattr(target, name, value)

    if has_checkpoint(cfg.backbone.vision_path):
        config = vision_checkpoint_config(cfg.backbone.vision_path)
        set_field("vision", cfg.vision, "type", VISION_MODEL_TYPES[config.model_type])
        for name, attr in VISION_FIELDS.items():
            set_field("vision", cfg.vision, name, getattr(config, attr))
    if has_checkpoint(cfg.backbone.lm_path):
        config = lm_checkpoint_config(cfg.backbone.lm_path)
        set_field("lm", cfg.lm, "type", config.model_type)
        values = {name: getattr(config, attr, None) for name, attr in LM_FIELDS.items()}
        values["num_kv_heads"] = values["num_kv_heads"] or config.num_attention_heads  # unset: one per query head
        for name, value in values.items():
            set_field("lm", cfg.lm, name, value)
        rope = getattr(config, "rope_parameters", None) or {}
        set_field("lm", cfg.lm, "rope_theta", float(rope["rope_theta"]) if "rope_theta" in rope else None)
    return changes


def _on_meta() -> bool:
    return torch.get_default_device().type == "meta"


def build_vision_tower(cfg: VisionConfig, path: str = "") -> nn.Module:
    """SigLIP or CLIP vision model: from the checkpoint at ``path`` (fp32), else random init from ``cfg``."""
    config_cls, model_cls = VISION_MODELS[cfg.type]
    if path:
        config = vision_checkpoint_config(_checkpoint("model.backbone.vision_path", path))
        if VISION_MODEL_TYPES[config.model_type] != cfg.type:
            raise ConfigError(f"model.vision.type={cfg.type!r} but model.backbone.vision_path={path!r} holds a "
                              f"{VISION_MODEL_TYPES[config.model_type]!r} tower; set model.vision.type to match")
        if _on_meta():
            return model_cls(config)
        return model_cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    config = config_cls(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
    )
    return model_cls(config)


def build_language_model(cfg: LMConfig, vocab_size: int, pad_token_id: int, path: str = "") -> nn.Module:
    """Causal LM of the Llama family (its decoder layers expose self_attn, mlp and the two norms): from the checkpoint
    at ``path`` (fp32), else random init from ``cfg``. A tokenizer larger than the embeddings (special tokens such as
    ``<image>`` added to a checkpoint's vocabulary) grows them to ``vocab_size`` rows."""
    if path:
        config = lm_checkpoint_config(_checkpoint("model.backbone.lm_path", path))
        if config.model_type != cfg.type:
            raise ConfigError(f"model.lm.type={cfg.type!r} but model.backbone.lm_path={path!r} holds a "
                              f"{config.model_type!r} model; set model.lm.type to match")
        if _on_meta():
            config._attn_implementation = cfg.attn_implementation
            lm = AutoModelForCausalLM.from_config(config)
        else:
            lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                      attn_implementation=cfg.attn_implementation)
        if vocab_size > lm.config.vocab_size:
            # new rows start at the mean of the old ones (transformers' default), which needs values: not on meta
            lm.resize_token_embeddings(vocab_size, mean_resizing=not _on_meta())
        return lm
    config = LM_CONFIGS[cfg.type](
        vocab_size=max(cfg.vocab_size, vocab_size),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=pad_token_id,
    )
    config._attn_implementation = cfg.attn_implementation
    return AutoModelForCausalLM.from_config(config)
