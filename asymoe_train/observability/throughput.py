"""Throughput between log steps: tokens, samples and sequences per second, data-wait share, model FLOP/s, MFU and
(on a GPU) peak memory."""

from __future__ import annotations

import time

import torch

from asymoe_train.modality import PAD


class Throughput:
    """Counts this rank's work since the last :meth:`metrics` call. ``flops_per_token`` (model FLOPs of a training
    step per token) and ``peak_tflops`` (one device's peak; 0 = no MFU) are set once known."""

    def __init__(self, world_size: int = 1, peak_tflops: float = 0.0):
        self.world_size, self.peak_tflops = world_size, peak_tflops
        self.flops_per_token = 0.0
        self._reset()

    def _reset(self) -> None:
        self.tokens = self.samples = self.sequences = 0
        self.data_s = 0.0
        self.start = time.perf_counter()

    def add(self, batch) -> None:
        """A trained micro-batch (an :class:`asymoe_train.data.batch.Batch`): host-side counts only, so adding one
        never waits for the device."""
        self.tokens += batch.num_tokens if batch.num_tokens else int((batch.modality_BT != PAD).sum())
        self.samples += batch.num_samples
        self.sequences += batch.num_sequences

    def metrics(self) -> dict[str, float]:
        """``perf/*`` since the last call (samples and sequences over all ranks, tokens and FLOP/s per device)."""
        elapsed = time.perf_counter() - self.start
        speed = {
            "perf/tokens_per_s": self.tokens / elapsed,
            "perf/samples_per_s": self.samples * self.world_size / elapsed,
            "perf/sequences_per_s": self.sequences * self.world_size / elapsed,
            "perf/data_wait_share": self.data_s / elapsed,
            # this rank's tokens: model FLOP/s and MFU per device
            "perf/model_tflops": self.flops_per_token * self.tokens / elapsed / 1e12,
        }
        if self.peak_tflops:
            speed["perf/mfu"] = speed["perf/model_tflops"] / self.peak_tflops
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # the allocator's own counter (no device sync); the peak since the previous log step
            speed["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self._reset()
        return speed
