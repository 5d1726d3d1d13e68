"""Model FLOPs (observability/flops.py): the counter sees every routed expert on exactly its tokens, and MFU's peak
comes from the config or the GPU table."""

from __future__ import annotations

import pytest
import torch
from test_efficiency import batch, moe_config, tiny, upcycled

from asymoe_train.modality import PAD
from asymoe_train.observability.flops import TRAIN_FACTOR, forward_flops, peak_tflops, train_flops_per_token

INPUTS = ("input_ids_BT", "modality_BT", "pixel_values_NCHW", "image_index_B", "context_BT")


def test_counted_flops_are_the_routed_experts_plus_the_routers():
    # vanilla (top-2 of 4 FFN-width experts) and dense_matched (one expert of twice the width) do the same expert
    # FLOPs per routed token, so the counts differ by the routers alone: 2 x D x (4 - 1) per position and MoE layer
    # (routers score every position, padding included, so that shapes stay static; padding never reaches an expert).
    # A count that ran every expert on every token, or the padding through the experts, would be far off.
    inputs, _ = batch()
    named = dict(zip(INPUTS, inputs, strict=True))
    real_tokens = int((named["modality_BT"] != PAD).sum())
    counts, per_token = {}, {}
    for variant in ("vanilla", "dense_matched"):
        model = upcycled(tiny(moe_config(variant)))
        counts[variant] = forward_flops(model, named)
        per_token[variant] = train_flops_per_token(model, named)
        moe_layers, hidden = len(model.moe_blocks()), model.cfg.lm.hidden_size
    assert moe_layers == 2
    positions = named["modality_BT"].numel()
    assert counts["vanilla"] - counts["dense_matched"] == moe_layers * positions * 2 * hidden * (4 - 1)
    assert per_token["vanilla"] == pytest.approx(TRAIN_FACTOR * counts["vanilla"] / real_tokens)


def test_counting_leaves_outputs_and_random_state_alone():
    inputs, _ = batch()
    model = upcycled(tiny(moe_config("asymoe")))
    before = model(*inputs).logits_BTV.detach()
    state = torch.get_rng_state()
    assert forward_flops(model, dict(zip(INPUTS, inputs, strict=True))) > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model(*inputs).logits_BTV.detach(), before)


def test_peak_comes_from_the_config_or_the_gpu_table(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert peak_tflops(cpu, "fp32") is None  # no MFU on a CPU unless the peak is given
    assert peak_tflops(cpu, "fp32", configured=1.5) == 1.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(gpu, "bf16") == 989.0
    assert peak_tflops(gpu, "fp32") is None  # the table holds bf16 peaks
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(gpu, "bf16") == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_tflops(gpu, "bf16") is None
