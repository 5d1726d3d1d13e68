"""The bad-sample budget of a training stage or an evaluation split (``data.max_bad_fraction``)."""

from __future__ import annotations

from asymoe_train.config.errors import DataBudgetError
from asymoe_train.data.batch import Batch


class BadSampleBudget:
    """Counts samples read and skipped (by reason) and stops the run when the skipped ones exceed ``max_fraction`` of
    all, judged once ``min_samples`` have been read (``data.bad_fraction_min_samples``: a handful of samples says
    little about a source). ``where`` names what is being read in the error, e.g. ``stage align``."""

    def __init__(self, max_fraction: float, min_samples: int = 200, where: str = "training"):
        self.max_fraction, self.min_samples, self.where = max_fraction, min_samples, where
        self.seen = 0
        self.skipped: dict[str, int] = {}

    @property
    def bad(self) -> int:
        return sum(self.skipped.values())

    def add(self, batch: Batch) -> None:
        """Count a batch: its samples and the samples skipped since the batch before it."""
        self.add_counts(batch.num_samples, batch.skipped)

    def add_counts(self, num_samples: int, skipped: dict[str, int]) -> None:
        self.seen += num_samples + sum(skipped.values())
        for reason, count in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        if self.seen >= self.min_samples and self.exceeded():
            raise DataBudgetError(
                f"{self.where}: {self.bad} of {self.seen} samples were skipped ({self.skipped}), more than "
                f"data.max_bad_fraction={self.max_fraction}; check the shards (the warnings above name them and the "
                "reason) or raise data.max_bad_fraction"
            )

    def exceeded(self) -> bool:
        return self.bad > self.max_fraction * self.seen

    def summary(self) -> str:
        text = f"skipped {self.bad} of {self.seen} samples {self.skipped or ''}".strip()
        if self.seen < self.min_samples and self.exceeded():
            text += (f" (more than data.max_bad_fraction={self.max_fraction}, but fewer than "
                     f"data.bad_fraction_min_samples={self.min_samples} samples were read, so it was not enforced)")
        return text
