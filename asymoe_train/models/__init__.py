"""Vision tower + projector + language model with MoE slots."""

from asymoe_train.models.vlm import VisionLanguageModel, VLMOutput, build_model

__all__ = ["VLMOutput", "VisionLanguageModel", "build_model"]
