"""Collated batches: token ids, labels, per-token modality and images of a list of encoded sequences.

Packing (``data.packing``): the batch's sequences share rows of at most ``data.max_length`` positions, placed
greedily (longest first, each into the first row with room), instead of one padded row each; of a few row
capacities, the one that needs the fewest positions is used. ``segment_BT`` then says which
sequence every position belongs to (-1: padding), sequences are numbered in row-major order, and the per-sequence
fields (``image_index_B``, ``weight_B``, ``answers``, ``meta``) follow that order. The model keeps attention, positions,
evidence context and the order loss within a sequence, so a packed batch trains exactly as its unpacked twin.
Packing happens within the batch: the samples of a step, and so the stream positions a checkpoint keeps, are the
same either way.

# B rows (= sequences unless packed), S sequences, T positions, N images
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asymoe_train.data.conversation import IGNORE, Encoded
from asymoe_train.modality import CODES, PAD


@dataclass
class Sequence:
    """One encoded sequence, the row of its image in the batch's images (-1: none), and per-turn metadata."""

    encoded: Encoded
    image_row: int
    answer: str = ""
    meta: dict = field(default_factory=dict)
    weight: float = 1.0  # loss weight of its answer tokens (``data.answer_balance``)
    label: int | None = None  # classify: class index of data.labels (-1: out-of-scope); None: not classified


@dataclass
class Batch:
    """A collated batch. ``skipped`` counts samples dropped since the previous batch, by reason."""

    input_ids_BT: torch.Tensor
    labels_BT: torch.Tensor
    modality_BT: torch.Tensor
    pixel_values_NCHW: torch.Tensor
    image_index_B: torch.Tensor  # per sequence (S entries when packed): its row in the images, -1 for none
    context_BT: torch.Tensor  # evidence tokens: image and prompt positions (not answers, not padding)
    num_samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # shard sample keys, one per sample
    positions: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # training streams after this batch
    weight_B: torch.Tensor | None = None  # per-sequence loss weights (``data.answer_balance``); None = all 1
    segment_BT: torch.Tensor | None = None  # packed batches: the sequence of each position (-1: padding)
    # positions of the batch, and as one padded row per sequence would have them (what packing saves); 0: unknown
    num_positions: tuple[int, int] = (0, 0)
    num_tokens: int = 0  # real (non-padding) positions, counted on the host when the batch was made
    # tokens per row and modality code (B lists of 3 ints), host data: the model plans with it without reading the
    # device
    modality_counts: list[list[int]] | None = None
    label_B: torch.Tensor | None = None  # classify batches: class index per sequence (-1: out-of-scope)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {
            "input_ids_BT": self.input_ids_BT,
            "modality_BT": self.modality_BT,
            "pixel_values_NCHW": self.pixel_values_NCHW,
            "image_index_B": self.image_index_B,
            "context_BT": self.context_BT,
        }
        if self.segment_BT is not None:
            inputs["segment_BT"] = self.segment_BT
        if self.modality_counts is not None:
            inputs["modality_counts"] = self.modality_counts
        if self.label_B is not None:
            inputs["classify"] = True
        return inputs

    @property
    def num_sequences(self) -> int:
        """Sequences in the batch (rows, unless packed)."""
        return self.image_index_B.shape[0]

    def padding_shares(self) -> dict[str, float]:
        """``data/padding_share`` of this batch and, when packed, ``data/padding_share_unpacked``: what one padded
        row per sequence would have had."""
        def share(positions: int) -> float:
            return (positions - self.num_tokens) / max(positions, 1)

        shares = {"data/padding_share": share(self.num_positions[0])}
        if self.segment_BT is not None:
            shares["data/padding_share_unpacked"] = share(self.num_positions[1])
        return shares

    TENSORS = ("input_ids_BT", "labels_BT", "modality_BT", "pixel_values_NCHW", "image_index_B", "context_BT",
               "segment_BT", "weight_B", "label_B")

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors (the DataLoader calls this with ``pin_memory=True``), so :meth:`to`
        copies them to a GPU asynchronously."""
        for name in self.TENSORS:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).pin_memory())
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move the tensors to ``device`` (pixels in ``dtype``); copies from pinned memory do not block the host.
        ``modality_counts`` stays host data."""
        for name in self.TENSORS:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        self.pixel_values_NCHW = self.pixel_values_NCHW.to(dtype=dtype or torch.float32)
        return self


def modality_counts(modality_BT: torch.Tensor) -> list[list[int]]:
    """Tokens per row and modality code, as host lists (``Batch.modality_counts``)."""
    return torch.stack([(modality_BT == code).sum(1) for code in range(len(CODES))], dim=1).tolist()


def unpack_inputs(inputs: dict[str, torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs of a packed batch (``segment_BT`` among them) as one right-padded row per sequence: what the
    FLOP counter runs, so packing does not count the attention it masks between sequences."""
    segment_BT = inputs["segment_BT"]
    num = inputs["image_index_B"].shape[0]
    spans = []
    for row, segments in enumerate(segment_BT.tolist()):
        for col, seq in enumerate(segments):
            if seq >= 0 and (col == 0 or segments[col - 1] != seq):
                spans.append((seq, row, col, segments.count(seq)))
    spans.sort()
    length = max(n for *_, n in spans)
    out = {"image_index_B": inputs["image_index_B"], "pixel_values_NCHW": inputs["pixel_values_NCHW"]}
    fills = {"input_ids_BT": pad_id, "modality_BT": PAD, "context_BT": False}
    for name, fill in fills.items():
        source = inputs[name]
        target = torch.full((num, length), fill, dtype=source.dtype, device=source.device)
        for seq, row, col, n in spans:
            target[seq, :n] = source[row, col : col + n]
        out[name] = target
    out["modality_counts"] = modality_counts(out["modality_BT"])
    return out


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, longest sequences placed first, each into the first row that
    still has room for it (ties keep their order, so packing is deterministic)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > row_length:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a packed row of {row_length} "
                             "(data.max_length)")
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(row_length)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def pack_layout(lengths: list[int], max_length: int) -> list[list[int]]:
    """The packing of a batch that needs the fewest positions (rows x row length): first-fit decreasing at row
    capacities from the longest sequence up to ``max_length`` (17 of them at most). Never more positions than one
    padded row per sequence, which the longest sequence's capacity already guarantees."""
    longest = max(lengths)
    step = max(1, (max_length - longest) // 16)
    best, best_size = None, None
    for capacity in [*range(longest, max_length, step), max_length]:
        rows = pack_rows(lengths, capacity)
        size = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best_size is None or size < best_size:
            best, best_size = rows, size
    return best


def collate(sequences: list[Sequence], images: list[torch.Tensor], num_samples: int, skipped: dict[str, int],
            pad_id: int, left_pad: bool = False, keys: list[str] | None = None, pack_length: int = 0) -> Batch:
    """Pad sequences to a common length (left for generation prompts, right for training), or with ``pack_length``
    pack them into rows of that many positions (module doc)."""
    lengths = [len(s.encoded.input_ids) for s in sequences]
    unpacked = (sum(lengths), len(sequences) * max(lengths))  # (real positions, positions of one row each)
    if pack_length:
        if left_pad:
            raise ValueError("packing is for training batches; generation prompts are left-padded one per row")
        rows = pack_layout(lengths, pack_length)
        sequences = [sequences[i] for row in rows for i in row]  # row-major order: the segment numbering
        length = max(sum(lengths[i] for i in row) for row in rows)
    else:
        rows = [[i] for i in range(len(sequences))]
        length = max(lengths)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    modality = torch.full((len(rows), length), PAD, dtype=torch.long)
    segment = torch.full((len(rows), length), -1, dtype=torch.long)
    seq = 0
    for row, members in enumerate(rows):
        start = length - sum(len(sequences[seq + j].encoded.input_ids) for j in range(len(members))) if left_pad else 0
        for _ in members:
            enc = sequences[seq].encoded
            cols = slice(start, start + len(enc.input_ids))
            input_ids[row, cols] = torch.tensor(enc.input_ids)
            labels[row, cols] = torch.tensor(enc.labels)
            modality[row, cols] = torch.tensor(enc.modality)
            segment[row, cols] = seq
            start, seq = cols.stop, seq + 1
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
        segment_BT=segment if pack_length else None,
        num_positions=(input_ids.numel(), unpacked[1]),
        num_tokens=unpacked[0],
        modality_counts=modality_counts(modality),
        label_B=(torch.tensor([s.label for s in sequences], dtype=torch.long)
                 if sequences and sequences[0].label is not None else None),
    )
