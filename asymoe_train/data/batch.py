"""Collated batches: token ids, labels, per-token modality and images of a list of encoded sequences.

# B sequences, T positions, N images
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asymoe_train.data.conversation import IGNORE, Encoded
from asymoe_train.modality import PAD


@dataclass
class Sequence:
    """One encoded sequence, the row of its image in the batch's images (-1: none), and per-turn metadata."""

    encoded: Encoded
    image_row: int
    answer: str = ""
    meta: dict = field(default_factory=dict)
    weight: float = 1.0  # loss weight of its answer tokens (``data.answer_balance``)


@dataclass
class Batch:
    """A collated batch. ``skipped`` counts samples dropped since the previous batch, by reason."""

    input_ids_BT: torch.Tensor
    labels_BT: torch.Tensor
    modality_BT: torch.Tensor
    pixel_values_NCHW: torch.Tensor
    image_index_B: torch.Tensor
    context_BT: torch.Tensor  # evidence tokens: image and prompt positions (not answers, not padding)
    num_samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # shard sample keys, one per sample
    positions: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # training streams after this batch
    weight_B: torch.Tensor | None = None  # per-sequence loss weights (``data.answer_balance``); None = all 1

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids_BT": self.input_ids_BT,
            "modality_BT": self.modality_BT,
            "pixel_values_NCHW": self.pixel_values_NCHW,
            "image_index_B": self.image_index_B,
            "context_BT": self.context_BT,
        }

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        for name in ("input_ids_BT", "labels_BT", "modality_BT", "image_index_B", "context_BT"):
            setattr(self, name, getattr(self, name).to(device))
        if self.weight_B is not None:
            self.weight_B = self.weight_B.to(device)
        self.pixel_values_NCHW = self.pixel_values_NCHW.to(device=device, dtype=dtype or torch.float32)
        return self


def collate(sequences: list[Sequence], images: list[torch.Tensor], num_samples: int, skipped: dict[str, int],
            pad_id: int, left_pad: bool = False, keys: list[str] | None = None) -> Batch:
    """Pad sequences to a common length (left for generation prompts, right for training)."""
    length = max(len(s.encoded.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE, dtype=torch.long)
    modality = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq.encoded.input_ids)
        cols = slice(length - n, length) if left_pad else slice(0, n)
        input_ids[row, cols] = torch.tensor(seq.encoded.input_ids)
        labels[row, cols] = torch.tensor(seq.encoded.labels)
        modality[row, cols] = torch.tensor(seq.encoded.modality)
    pixels = torch.stack(images) if images else torch.zeros(0, 3, 1, 1)
    return Batch(
        input_ids_BT=input_ids,
        labels_BT=labels,
        modality_BT=modality,
        pixel_values_NCHW=pixels,
        image_index_B=torch.tensor([s.image_row for s in sequences], dtype=torch.long),
        context_BT=(labels == IGNORE) & (modality != PAD),
        num_samples=num_samples,
        skipped=skipped,
        answers=[s.answer for s in sequences],
        meta=[s.meta for s in sequences],
        keys=list(keys or []),
        weight_B=(torch.tensor([s.weight for s in sequences], dtype=torch.float32)
                  if any(s.weight != 1.0 for s in sequences) else None),
    )
