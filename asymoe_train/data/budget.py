"""The bad-sample budget of a training run (``data.max_bad_fraction``)."""

from __future__ import annotations

from asymoe_train.data.batch import Batch


class BadSampleBudget:
    """Counts skipped samples and stops the run when they exceed ``data.max_bad_fraction``."""

    MIN_SEEN = 200  # do not judge the fraction on a handful of samples

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.seen = 0
        self.skipped: dict[str, int] = {}

    def add(self, batch: Batch) -> None:
        self.seen += batch.num_samples + sum(batch.skipped.values())
        for reason, count in batch.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        bad = sum(self.skipped.values())
        if self.seen >= self.MIN_SEEN and bad > self.max_fraction * self.seen:
            raise RuntimeError(
                f"{bad} of {self.seen} samples were skipped ({self.skipped}), more than "
                f"data.max_bad_fraction={self.max_fraction}; check the shards or raise the limit"
            )

    def summary(self) -> str:
        return f"skipped {sum(self.skipped.values())} of {self.seen} samples {self.skipped or ''}".strip()
