"""Hugging Face backbones, built from tiny configs (random init) or loaded from local paths. Never downloads."""

from __future__ import annotations

import os

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from asymoe_train.config.schema import LMConfig, VisionConfig

VISION_MODELS = {"siglip": (SiglipVisionConfig, SiglipVisionModel), "clip": (CLIPVisionConfig, CLIPVisionModel)}
LM_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def _local_path(key: str, path: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"{key}={path!r} is not a directory; point it at a local Hugging Face checkpoint")
    return path


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    """SigLIP or CLIP vision model."""
    config_cls, model_cls = VISION_MODELS[cfg.type]
    if cfg.path:
        return model_cls.from_pretrained(_local_path("model.vision.path", cfg.path), local_files_only=True)
    config = config_cls(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
    )
    return model_cls(config)


def build_language_model(cfg: LMConfig, vocab_size: int, pad_token_id: int) -> nn.Module:
    """Causal LM of the Llama family (its decoder layers expose self_attn, mlp and the two norms)."""
    if cfg.path:
        return AutoModelForCausalLM.from_pretrained(
            _local_path("model.lm.path", cfg.path), local_files_only=True, attn_implementation=cfg.attn_implementation
        )
    config = LM_CONFIGS[cfg.type](
        vocab_size=vocab_size,
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
