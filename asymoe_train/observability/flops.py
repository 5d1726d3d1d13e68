"""Model FLOPs and model FLOPs utilisation (MFU) of a training step.

Model FLOPs are what the model's maths needs, whatever the implementation spends: the forward pass of one batch is
counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, attention, convolutions: every MoE expert on the
tokens routed to it, the evidence attention, the vision tower), and a training step costs three times that (the usual
forward + backward = 3 x forward convention). Activation checkpointing's recomputation is not counted, nor are the
weight gradients that frozen modules skip, nor the counterfactual evidence loss's extra forward. MFU is the model
FLOPs per second of one device over that device's peak.

# B sequences, T positions
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from asymoe_train.data.batch import unpack_inputs
from asymoe_train.modality import PAD

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' datasheets, matched in this order as
# substrings of torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)
TRAIN_FACTOR = 3  # forward + backward (twice the forward's FLOPs: gradients of inputs and of weights)


def peak_tflops(device: torch.device, precision: str, configured: float = 0.0) -> float | None:
    """Peak TFLOP/s of one ``device`` for MFU: ``configured`` when > 0 (``logger.peak_tflops``), else the datasheet
    bf16 peak of a known GPU when training in bf16, else None (no MFU: fp32 runs and CPUs need the value given)."""
    if configured > 0:
        return configured
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)``, counted without gradients and without touching any RNG state (a run that
    counts repeats one that does not, bit for bit); compiled modules run eagerly while counting, so the counter sees
    their operations."""
    tensors = [*args, *kwargs.values()]
    devices = sorted({t.device for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}, key=str)
    with torch.random.fork_rng(devices=devices), torch.no_grad(), torch.compiler.set_stance("force_eager"):
        with FlopCounterMode(display=False) as counter:
            fn(*args, **kwargs)
    return counter.get_total_flops()


def forward_flops(model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs`` (``count_flops``)."""
    return count_flops(model, **inputs)


def train_flops_per_token(model: torch.nn.Module, inputs: dict) -> float:
    """Model FLOPs of a training step per real (not padding) token, from the forward pass on one batch; a packed
    batch is counted as one row per sequence, so the attention it masks between sequences is not model FLOPs."""
    if "segment_BT" in inputs:
        inputs = unpack_inputs(inputs)
    tokens = int((inputs["modality_BT"] != PAD).sum())
    return TRAIN_FACTOR * forward_flops(model, inputs) / max(tokens, 1)
