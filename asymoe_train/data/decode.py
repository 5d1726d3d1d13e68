"""Shard samples to sequences, sample by sample, in two shard layouts:
- conversations: ``key.png|jpg|jpeg|webp`` (optional: text-only samples have none) + ``key.json`` holding LLaVA
  ``conversations`` (what data_recipes/ write);
- captions, the img2dataset layout: ``key.jpg`` + ``key.txt`` (the caption) + ``key.json`` (metadata without
  ``conversations``; a ``caption`` field there is used when there is no ``.txt``). A caption sample becomes the
  one-turn conversation ``<image>\n<prompt>`` -> caption, the prompt drawn from ``data.caption_prompts``.

With ``split_turns`` every QA turn becomes its own single-turn sequence and the turns of one image share its encoding
(the tower runs once per image); without it a multi-turn conversation is one sequence with every answer supervised.
The model takes one image per sample: a sample with more image files or more ``<image>`` placeholders is skipped as
``too_many_images``; an image whose conversation has no placeholder gets one in front of its first question (as
LLaVA does). Unreadable or malformed samples are skipped and counted by reason; the counts travel with each batch so
the trainer can report them and stop when they exceed ``data.max_bad_fraction``.

# B sequences, T positions, N images
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from collections.abc import Sequence as SequenceOf

import numpy as np
import torch
from PIL import Image

from asymoe_train.config.labels import LabelSet
from asymoe_train.config.schema import DEFAULT_CAPTION_PROMPTS, DataConfig
from asymoe_train.data.batch import Batch, Sequence, collate
from asymoe_train.data.conversation import (
    IMAGE_PLACEHOLDER,
    ConversationEncoder,
    MalformedSample,
    TooManyImages,
    turns,
)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
MAX_IMAGES_PER_SAMPLE = 1  # the model encodes one image per sequence

log = logging.getLogger(__name__)


def load_image(data: bytes, size: int) -> torch.Tensor:
    """Decode, convert to RGB, resize to ``size`` and normalise to [-1, 1] (SigLIP/CLIP-style mean 0.5, std 0.5)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).sub_(0.5).div_(0.5)


def dihedral(image_CHW: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k in 0..7): k % 4 quarter turns, then a mirror if k >= 4."""
    image_CHW = torch.rot90(image_CHW, k % 4, dims=(1, 2))
    return image_CHW.flip(2) if k >= 4 else image_CHW


class SampleDecoder:
    """Turns raw shard samples into sequences; counts what it skips."""

    def __init__(self, encoder: ConversationEncoder, image_size: int, max_length: int, split_turns: bool,
                 turn_caps: dict[str, int] | None = None, turn_cap_field: str = "family", seed: int = 0,
                 augment: str = "none", caption_prompts: SequenceOf[str] | None = None, pack_length: int = 0):
        self.encoder = encoder
        self.pack_length = pack_length  # training batches: pack sequences into rows of this length (data.packing)
        self.image_size = image_size
        self.max_length = max_length
        self.split_turns = split_turns
        self.turn_caps = dict(turn_caps or {})
        self.turn_cap_field = turn_cap_field
        self.seed = seed
        self.augment = augment
        # None: ``data.caption_prompts`` of the loader that reads through this decoder (see ``use_data_config``)
        self.caption_prompts = tuple(caption_prompts) if caption_prompts is not None else None
        self._rng: random.Random | None = None
        self.skipped: Counter[str] = Counter()
        # (turn metadata value, answer) -> loss weight, from :func:`answer_balance_weights`; set per training stage
        self.answer_weights: dict[tuple[str, str], float] = {}
        self.answer_field = ""
        # classify stages and their evaluation (data.labels): every sequence is a prompt labelled with a class index
        # (module doc of asymoe_train.config.labels); training leaves out-of-scope turns out and counts them here
        self.labels: LabelSet | None = None
        self.out_of_scope_dropped = 0

    @property
    def rng(self) -> random.Random:
        """Draws of the sample being decoded (turn caps, augmentation): seeded by the sample's stream position when
        it has one, so a resumed stream decodes exactly as the uninterrupted one; else per worker."""
        if self._rng is None:
            info = torch.utils.data.get_worker_info()
            self._rng = random.Random(self.seed * 1000 + (info.id if info is not None else 0))
        return self._rng

    def seed_sample(self, sample: dict) -> None:
        if "__stream__" in sample:
            stream, (draw, taken, _) = sample["__stream__"]
            self._rng = random.Random(f"{self.seed}:{stream}:{draw}:{taken}")

    def cap_turns(self, groups: list) -> list:
        """Keep at most ``turn_caps[value]`` randomly chosen single-turn groups per capped metadata value."""
        by_value: dict[str, list[int]] = {}
        for n, (_, meta) in enumerate(groups):
            value = meta[-1].get(self.turn_cap_field)
            if value in self.turn_caps:
                by_value.setdefault(value, []).append(n)
        dropped: set[int] = set()
        for value, indices in by_value.items():
            if len(indices) > self.turn_caps[value]:
                keep = set(self.rng.sample(indices, self.turn_caps[value]))
                dropped |= set(indices) - keep
        return [g for n, g in enumerate(groups) if n not in dropped]

    def take_skipped(self) -> dict[str, int]:
        skipped, self.skipped = dict(self.skipped), Counter()
        return skipped

    def skip(self, reason: str, count: int = 1) -> None:
        """Count ``count`` samples skipped for ``reason``; they travel with the next batch."""
        self.skipped[reason] += count

    def use_data_config(self, data: DataConfig) -> None:
        """Take the caption prompts from ``data`` unless the decoder was given its own."""
        if self.caption_prompts is None:
            self.caption_prompts = tuple(data.caption_prompts)

    def conversation(self, sample: dict) -> tuple[dict, list[tuple[str, str]]]:
        """The sample's record (its json, or {}) and (question, answer) turns: the json's ``conversations``, else
        the caption (``.txt``, or the json's ``caption``) behind a prompt from ``caption_prompts``."""
        try:
            record = json.loads(sample["json"]) if "json" in sample else {}
            if not isinstance(record, dict):
                raise TypeError(f"json holds a {type(record).__name__}, not an object")
            if "conversations" in record:
                return record, turns(record["conversations"])
            caption = sample["txt"].decode("utf-8") if "txt" in sample else record.get("caption")
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as exn:
            raise MalformedSample(f"bad json: {exn}") from exn
        if not isinstance(caption, str) or not caption.strip():
            raise MalformedSample("no conversations and no caption (.txt or json caption)")
        prompts = self.caption_prompts if self.caption_prompts is not None else DEFAULT_CAPTION_PROMPTS
        if not prompts:
            raise MalformedSample("a caption sample, but data.caption_prompts is empty")
        return record, [(f"{IMAGE_PLACEHOLDER}\n{self.rng.choice(prompts)}", caption.strip())]

    def decode(self, sample: dict, prompt_only: bool) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Image tensor (or None) and the sample's sequences; raises MalformedSample or returns no sequences."""
        self.seed_sample(sample)
        record, pairs = self.conversation(sample)
        image_keys = [key for key in sample if key.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        placeholders = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in pairs)
        if len(image_keys) > MAX_IMAGES_PER_SAMPLE or placeholders > MAX_IMAGES_PER_SAMPLE:
            raise TooManyImages(f"{len(image_keys)} image files and {placeholders} {IMAGE_PLACEHOLDER} placeholders; "
                                f"the model takes {MAX_IMAGES_PER_SAMPLE}")
        if any(IMAGE_PLACEHOLDER in a for _, a in pairs):
            raise MalformedSample(f"an answer holds {IMAGE_PLACEHOLDER}")
        image = None
        if image_keys:
            try:
                image = load_image(sample[image_keys[0]], self.image_size)
                if self.augment == "dihedral" and not prompt_only:
                    image = dihedral(image, self.rng.randrange(8))
            except Exception as exn:  # PIL raises many types for corrupt files
                raise MalformedSample(f"unreadable image: {exn}") from exn
            if not placeholders:  # the image goes before the first question, as LLaVA places it
                pairs[0] = (f"{IMAGE_PLACEHOLDER}\n{pairs[0][0]}", pairs[0][1])
        elif placeholders:
            raise MalformedSample("conversation has <image> but the sample has no image file")
        metas = turn_meta(record, len(pairs))
        if self.split_turns or prompt_only:
            groups = [([(_with_image(q, image is not None), a)], [metas[n]]) for n, (q, a) in enumerate(pairs)]
        else:
            groups = [(pairs, metas)]
        if self.turn_caps and self.split_turns and not prompt_only:
            groups = self.cap_turns(groups)
        sequences = []
        for group, meta in groups:
            answer = group[-1][1].strip()
            label = None
            if self.labels is not None:
                label = self.labels.index(meta[-1].get("label") or record.get("label") or answer)
                if label is None:  # a label outside data.labels: the sample is wrong, or the labels file is
                    self.skipped["unknown_label"] += 1
                    continue
                if label < 0 and not prompt_only:  # out-of-scope labels are never trained on
                    self.out_of_scope_dropped += 1
                    continue
            encoded = self.encoder.encode(group, with_last_answer=not prompt_only and label is None)
            if len(encoded.input_ids) > self.max_length:
                self.skipped["too_long"] += 1
                continue
            weight = 1.0
            if self.answer_weights and not prompt_only:
                weight = self.answer_weights.get((str(meta[-1].get(self.answer_field)), answer), 1.0)
            sequences.append(Sequence(encoded, 0 if image is not None else -1, answer, meta[-1], weight, label))
        return image, sequences

    def batches(self, samples: Iterator[dict], images_per_batch: int, seqs_per_batch: int, prompt_only: bool,
                max_sequences: int = 0) -> Iterator[Batch]:
        """Group decoded samples into batches of ``images_per_batch`` samples (or ``seqs_per_batch`` sequences)."""
        images: list[torch.Tensor] = []
        sequences: list[Sequence] = []
        keys: list[str] = []
        num_samples = 0
        emitted = 0
        for sample in samples:
            try:
                image, seqs = self.decode(sample, prompt_only)
            except MalformedSample as exn:
                self.skip(exn.reason)
                log.warning("skipping sample %s: %s", sample.get("__key__"), exn)
                continue
            if max_sequences:
                seqs = seqs[: max_sequences - emitted - len(sequences)]
            if not seqs:
                continue
            if image is not None:
                for seq in seqs:
                    seq.image_row = len(images)
                images.append(image)
            sequences.extend(seqs)
            keys.append(str(sample.get("__key__")))
            num_samples += 1
            full = num_samples >= images_per_batch if images_per_batch else len(sequences) >= seqs_per_batch
            done = max_sequences and emitted + len(sequences) >= max_sequences
            if full or done:
                yield collate(sequences, images, num_samples, self.take_skipped(), self.encoder.tok.pad_id,
                              left_pad=prompt_only, keys=keys, pack_length=0 if prompt_only else self.pack_length)
                emitted += len(sequences)
                images, sequences, keys, num_samples = [], [], [], 0
                if done:
                    return
        if sequences:
            yield collate(sequences, images, num_samples, self.take_skipped(), self.encoder.tok.pad_id,
                          left_pad=prompt_only, keys=keys, pack_length=0 if prompt_only else self.pack_length)


def _with_image(question: str, has_image: bool) -> str:
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question


def turn_meta(record: dict, num_turns: int) -> list[dict]:
    """Per-turn metadata from list-valued fields aligned with turns (e.g. qtype, family, answer)."""
    metas: list[dict] = [{} for _ in range(num_turns)]
    for key, value in record.items():
        if key != "conversations" and isinstance(value, list) and len(value) == num_turns:
            for meta, item in zip(metas, value):
                meta[key] = item
    return metas


def make_decoder(data: DataConfig, encoder: ConversationEncoder, image_size: int, train: bool = False,
                 seed: int = 0) -> SampleDecoder:
    """The decoder of a run's data config: training draws turn caps and augmentation, evaluation neither."""
    return SampleDecoder(encoder, image_size, data.max_length, data.split_turns, data.turn_caps if train else None,
                         data.turn_cap_field, seed, data.augment if train else "none",
                         pack_length=data.max_length if train and data.packing else 0)
