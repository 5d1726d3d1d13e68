"""webdataset pipelines: resampled, rank-balanced training streams and ordered evaluation streams.

Two shard layouts are read, sample by sample:
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

import bisect
import io
import itertools
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from asymoe_train.config.paths import shard_files
from asymoe_train.config.schema import DEFAULT_CAPTION_PROMPTS, DataConfig
from asymoe_train.config.sources import source_parts
from asymoe_train.data.conversation import (
    IGNORE,
    IMAGE_PLACEHOLDER,
    ConversationEncoder,
    Encoded,
    MalformedSample,
    TooManyImages,
    turns,
)
from asymoe_train.modality import PAD

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
MAX_IMAGES_PER_SAMPLE = 1  # the model encodes one image per sequence


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
                 augment: str = "none", caption_prompts: SequenceOf[str] | None = None):
        self.encoder = encoder
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

    def on_read_error(self, exn: Exception) -> bool:
        """webdataset handler for unreadable tar members: count, warn, continue."""
        self.skipped["unreadable_shard"] += 1
        log.warning("skipping unreadable shard data: %s", exn)
        return True

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
        metas = _turn_meta(record, len(pairs))
        if self.split_turns or prompt_only:
            groups = [([(_with_image(q, image is not None), a)], [metas[n]]) for n, (q, a) in enumerate(pairs)]
        else:
            groups = [(pairs, metas)]
        if self.turn_caps and self.split_turns and not prompt_only:
            groups = self.cap_turns(groups)
        sequences = []
        for group, meta in groups:
            encoded = self.encoder.encode(group, with_last_answer=not prompt_only)
            if len(encoded.input_ids) > self.max_length:
                self.skipped["too_long"] += 1
                continue
            answer = group[-1][1].strip()
            weight = 1.0
            if self.answer_weights and not prompt_only:
                weight = self.answer_weights.get((str(meta[-1].get(self.answer_field)), answer), 1.0)
            sequences.append(Sequence(encoded, 0 if image is not None else -1, answer, meta[-1], weight))
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
                self.skipped[exn.reason] += 1
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
                              left_pad=prompt_only, keys=keys)
                emitted += len(sequences)
                images, sequences, keys, num_samples = [], [], [], 0
                if done:
                    return
        if sequences:
            yield collate(sequences, images, num_samples, self.take_skipped(), self.encoder.tok.pad_id,
                          left_pad=prompt_only, keys=keys)


def _with_image(question: str, has_image: bool) -> str:
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question


def _turn_meta(record: dict, num_turns: int) -> list[dict]:
    """Per-turn metadata from list-valued fields aligned with turns (e.g. qtype, family, answer)."""
    metas: list[dict] = [{} for _ in range(num_turns)]
    for key, value in record.items():
        if key != "conversations" and isinstance(value, list) and len(value) == num_turns:
            for meta, item in zip(metas, value):
                meta[key] = item
    return metas


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


def qa_turns(urls: Iterable[str]) -> Iterator[tuple[str, str, dict]]:
    """(question, answer, per-turn metadata) of every turn of every shard in ``urls``, in shard and turn order (the
    order evaluation reads them in); only the json members are read, no image is decoded."""
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                record = json.load(tar.extractfile(member))
                pairs = turns(record.get("conversations", []))
                for meta, (question, answer) in zip(_turn_meta(record, len(pairs)), pairs, strict=True):
                    yield question.replace(IMAGE_PLACEHOLDER, "").strip(), answer, meta


def answer_balance_weights(data: DataConfig, source: str | Mapping) -> dict[tuple[str, str], float]:
    """Loss weights that give every answer of a question group the same total weight in a training source:
    ``n_g / (K_g * n_ga)`` for answer a of group g (the value of turn metadata ``data.answer_balance``, e.g. qtype),
    with n_g the group's turns, n_ga those answered a and K_g the group's distinct answers, capped at
    ``data.answer_balance_max``. Each group keeps its total weight; answer priors that a training split skews (e.g.
    a changing-priors split) no longer steer the model. Reads the json member of every shard of the source once
    (images are not decoded): cheap for the demo, a full pass over the metadata for large sources. Empty when no
    turn carries the field (e.g. a caption stage)."""
    counts: Counter[tuple[str, str]] = Counter()
    for _, answer, meta in qa_turns(stream_spec(data, source, 0).urls):
        if data.answer_balance in meta:
            counts[str(meta[data.answer_balance]), answer.strip()] += 1
    groups: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    for group, _ in counts:
        answers[group] += 1
    for (group, _), n in counts.items():
        groups[group] += n
    return {key: min(groups[key[0]] / (answers[key[0]] * n), data.answer_balance_max) for key, n in counts.items()}


Position = tuple[int, int, int]  # one logical stream: (shard draw, samples taken from that draw, samples in all)


@dataclass(frozen=True)
class StreamSpec:
    """The logical training streams of one source. Stream ``s`` is a seeded sequence of shard draws (with replacement
    when ``resampled``, else its own shards ``urls[s::num_streams]`` in a fresh order each epoch); each drawn shard is
    read in a seeded buffer-shuffled order, reproducible from the shard's start. A stream's position is therefore just
    (draw, samples taken, samples in all), independent of which rank or worker reads it.

    A ``mixture`` source first picks a component for each draw, with probability proportional to its weight, seeded by
    (stream, draw) alone, then a shard of that component as above (without replacement: the stream's own shards of
    the component, one component epoch after another). Positions keep their meaning, so resume stays exact."""

    urls: tuple[str, ...]  # every shard of the source (all components of a mixture)
    num_streams: int
    seed: int
    resampled: bool
    shuffle_buffer: int
    mixture: tuple[tuple[tuple[str, ...], float], ...] = ()  # (shards, weight) per component; () = just ``urls``
    # stream -> (draws counted, draws per component before it): the non-resampled mixture's walk, memoised
    _tally: dict[int, tuple[int, list[int]]] = field(default_factory=dict, init=False, compare=False, repr=False)

    def component(self, stream: int, draw: int) -> int:
        """The mixture component a draw reads (0 without a mixture)."""
        if not self.mixture:
            return 0
        bounds = list(itertools.accumulate(weight for _, weight in self.mixture))
        point = random.Random(f"{self.seed}:{stream}:{draw}:mixture").random() * bounds[-1]
        return min(bisect.bisect_right(bounds, point), len(bounds) - 1)

    def _draws_before(self, stream: int, draw: int) -> list[int]:
        """How many of the stream's draws before ``draw`` read each component."""
        counted, counts = self._tally.get(stream, (0, [0] * len(self.mixture)))
        if counted > draw:
            counted, counts = 0, [0] * len(self.mixture)
        counts = list(counts)
        for earlier in range(counted, draw):
            counts[self.component(stream, earlier)] += 1
        self._tally[stream] = (draw, counts)
        return counts

    def shard(self, stream: int, draw: int) -> str:
        part = self.component(stream, draw)
        urls = self.mixture[part][0] if self.mixture else self.urls
        if self.resampled:
            return urls[random.Random(f"{self.seed}:{stream}:{draw}").randrange(len(urls))]
        mine = list(urls[stream :: self.num_streams])
        if not mine:
            raise ValueError(f"stream {stream} has no shard: {len(urls)} shards for {self.num_streams} streams")
        if self.mixture:
            epoch, index = divmod(self._draws_before(stream, draw)[part], len(mine))
            random.Random(f"{self.seed}:{stream}:part{part}:epoch{epoch}").shuffle(mine)
        else:
            epoch, index = divmod(draw, len(mine))
            random.Random(f"{self.seed}:{stream}:epoch{epoch}").shuffle(mine)
        return mine[index]

    def shard_samples(self, stream: int, draw: int, on_error) -> Iterator[dict]:
        """The drawn shard's samples through a seeded shuffle buffer (bounded memory, same order on every read)."""
        rng = random.Random(f"{self.seed}:{stream}:{draw}:order")
        pool: list[dict] = []
        for sample in wds.tarfile_to_samples(handler=on_error)([{"url": self.shard(stream, draw)}]):
            pool.append(sample)
            if len(pool) >= max(1, self.shuffle_buffer):
                pick = rng.randrange(len(pool))
                pool[pick], pool[-1] = pool[-1], pool[pick]
                yield pool.pop()
        rng.shuffle(pool)
        yield from pool

    def samples(self, stream: int, start: Position, on_error) -> Iterator[dict]:
        """Stream ``stream`` from ``start``; each sample carries ``__stream__`` = (stream, position after it)."""
        draw, offset, total = start
        empty = 0
        while True:
            taken = 0
            for taken, sample in enumerate(self.shard_samples(stream, draw, on_error), 1):
                if taken > offset:
                    total += 1
                    sample["__stream__"] = (stream, (draw, taken, total))
                    yield sample
            empty = empty + 1 if taken == 0 else 0
            if empty > 2 * len(self.urls):
                raise RuntimeError(f"stream {stream}: {empty} shard draws in a row held no readable sample")
            draw, offset = draw + 1, 0


def reader_streams(num_streams: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """The logical streams one reader (rank x DataLoader worker) owns; validation keeps this non-empty."""
    readers = world_size * max(1, num_workers)
    return list(range(rank * max(1, num_workers) + worker, num_streams, readers))


class TrainStream(torch.utils.data.IterableDataset):
    """Batches of ``batch_size`` samples from this reader's logical streams, one sample at a time from the stream that
    has given the fewest so far (ties: lowest id), a rule the positions alone determine, so a resumed reader picks up
    the interleaving where it was. Every batch carries ``positions``: where each of this reader's streams stands
    after it, the data state a checkpoint keeps."""

    def __init__(self, spec: StreamSpec, decoder: SampleDecoder, batch_size: int, rank: int, world_size: int,
                 start: dict[int, Position] | None = None):
        self.spec, self.decoder, self.batch_size = spec, decoder, batch_size
        self.rank, self.world_size = rank, world_size
        self.start = dict(start or {})

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = reader_streams(self.spec.num_streams, self.rank, self.world_size, worker, num_workers)
        positions = {s: tuple(self.start.get(s, (0, 0, 0))) for s in streams}
        readers = {s: self.spec.samples(s, positions[s], self.decoder.on_read_error) for s in streams}

        def interleaved() -> Iterator[dict]:
            while True:
                sample = next(readers[min(streams, key=lambda s: (positions[s][2], s))])
                stream, position = sample["__stream__"]
                positions[stream] = position
                yield sample

        for batch in self.decoder.batches(interleaved(), self.batch_size, 0, prompt_only=False):
            batch.positions = dict(positions)
            yield batch


def stream_spec(data: DataConfig, source: str | Mapping, seed: int) -> StreamSpec:
    """The logical streams of a ``data.sources`` value: a shard glob or a weighted mixture of globs."""
    parts = [(tuple(shard_files(data, part.glob)), part.weight) for part in source_parts("data.sources.<source>", source)]
    urls = tuple(url for shards, _ in parts for url in shards)
    mixture = tuple(parts) if len(parts) > 1 else ()
    for shards, _ in parts:
        if not shards:
            raise ValueError(f"a part of source {source!r} matches no shards under data.root={data.root!r}")
    return StreamSpec(urls, data.num_streams, seed, data.resampled, data.shuffle_buffer, mixture)


def train_loader(data: DataConfig, source: str | Mapping, decoder: SampleDecoder, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start: dict[int, Position] | None = None
                 ) -> torch.utils.data.DataLoader:
    """An endless stream of training batches from ``data.num_streams`` logical streams shared out over ranks and
    workers, resumed from ``start`` (stream -> position; missing streams start at the beginning). ``source`` is a
    ``data.sources`` value: a shard glob, or a mixture ``{component: {glob, weight}}``.

    The trainer takes exactly ``steps * grad_accum`` batches per stage, so every rank runs the same number of steps
    whatever the shard count.
    """
    spec = stream_spec(data, source, seed)
    decoder.use_data_config(data)
    return torch.utils.data.DataLoader(
        TrainStream(spec, decoder, batch_size, rank, world_size, start), batch_size=None,
        num_workers=data.num_workers, persistent_workers=False, prefetch_factor=4 if data.num_workers else None,
    )


def eval_batches(data: DataConfig, pattern: str, decoder: SampleDecoder, questions_per_batch: int,
                 max_questions: int = 0, prompt_only: bool = True) -> Iterator[Batch]:
    """Ordered generation prompts over all shards (first ``max_questions`` questions when set); with
    ``prompt_only=False`` the same questions as labelled sequences, answers included (for teacher-forced probes)."""
    decoder.use_data_config(data)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shard_files(data, pattern)),
        wds.tarfile_to_samples(handler=decoder.on_read_error),
    )
    return decoder.batches(iter(pipeline), 0, questions_per_batch, prompt_only=prompt_only,
                           max_sequences=max_questions)
