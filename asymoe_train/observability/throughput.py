"""Throughput between log steps: tokens, samples and sequences per second, data-wait share, model FLOP/s and MFU."""

from __future__ import annotations

import time

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
        """A trained micro-batch (an :class:`asymoe_train.data.pipeline.Batch`)."""
        self.tokens += int((batch.modality_BT != PAD).sum())
        self.samples += batch.num_samples
        self.sequences += batch.input_ids_BT.shape[0]

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
        self._reset()
        return speed
