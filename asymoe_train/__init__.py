"""asymoe_train: training modality-asymmetric MoE vision-language models.

``asymoe_train.load_pretrained(export_dir)`` loads a model written by ``asymoe-train export`` in plain PyTorch;
``asymoe_train.generate(model, tokenizer, meta, image, question)`` answers a question about an image with it.
Both import torch lazily, so ``import asymoe_train`` stays cheap.
"""

__all__ = ["generate", "load_pretrained"]


def __getattr__(name: str):
    if name == "load_pretrained":
        from asymoe_train.export import load_pretrained

        return load_pretrained
    if name == "generate":
        from asymoe_train.evaluation.generate import generate

        return generate
    raise AttributeError(f"module 'asymoe_train' has no attribute {name!r}")
