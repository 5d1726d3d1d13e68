"""webdataset pipelines: resampled, rank-balanced training streams and ordered evaluation streams.

A training source is a set of logical streams (:class:`StreamSpec`), each a seeded sequence of shard draws whose
position (draw, samples taken) is independent of the rank or worker that reads it; ranks x DataLoader workers share
the streams out. Samples become sequences in :mod:`asymoe_train.data.decode`, sequences batches in
:mod:`asymoe_train.data.batch`; the skipped-sample counts travel with each batch.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import random
import signal
import tarfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from asymoe_train.config.paths import shard_files
from asymoe_train.config.schema import DataConfig
from asymoe_train.config.sources import source_parts
from asymoe_train.data.batch import Batch
from asymoe_train.data.conversation import IMAGE_PLACEHOLDER, turns
from asymoe_train.data.decode import SampleDecoder, turn_meta
from asymoe_train.data.shards import ShardReader

log = logging.getLogger(__name__)


def qa_turns(urls: Iterable[str]) -> Iterator[tuple[str, str, dict]]:
    """(question, answer, per-turn metadata) of every turn of every shard in ``urls``, in shard and turn order (the
    order evaluation reads them in); only the json members are read, no image is decoded. Malformed records are
    left out, as the decoder skips them."""
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                try:
                    record = json.load(tar.extractfile(member))
                    pairs = turns(record.get("conversations", []))
                except (ValueError, AttributeError):  # malformed samples: training and evaluation skip them too
                    continue
                for meta, (question, answer) in zip(turn_meta(record, len(pairs)), pairs, strict=True):
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

    def shard_samples(self, stream: int, draw: int, reader: ShardReader) -> Iterator[dict]:
        """The drawn shard's samples through a seeded shuffle buffer (bounded memory, same order on every read);
        ``reader`` counts the samples a damaged shard loses."""
        rng = random.Random(f"{self.seed}:{stream}:{draw}:order")
        pool: list[dict] = []
        for sample in reader.samples(self.shard(stream, draw)):
            pool.append(sample)
            if len(pool) >= max(1, self.shuffle_buffer):
                pick = rng.randrange(len(pool))
                pool[pick], pool[-1] = pool[-1], pool[pick]
                yield pool.pop()
        rng.shuffle(pool)
        yield from pool

    def samples(self, stream: int, start: Position, reader: ShardReader) -> Iterator[dict]:
        """Stream ``stream`` from ``start``; each sample carries ``__stream__`` = (stream, position after it)."""
        draw, offset, total = start
        empty = 0
        while True:
            taken = 0
            for taken, sample in enumerate(self.shard_samples(stream, draw, reader), 1):
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
        shards = ShardReader(self.decoder.skip)
        readers = {s: self.spec.samples(s, positions[s], shards) for s in streams}

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
    parts = [(tuple(shard_files(data, part.glob, f"data.sources ({part.glob})")), part.weight)
             for part in source_parts("data.sources.<source>", source)]
    urls = tuple(url for shards, _ in parts for url in shards)
    mixture = tuple(parts) if len(parts) > 1 else ()
    for shards, _ in parts:
        if not shards:
            raise ValueError(f"a part of source {source!r} matches no shards under data.root={data.root!r}")
    return StreamSpec(urls, data.num_streams, seed, data.resampled, data.shuffle_buffer, mixture)


def quiet_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the DataLoader workers: schedulers and terminals signal the whole process group, and the
    trainer handles those signals (asymoe_train.training.signals: it finishes its step, saves and shuts its workers
    down), while a worker that died of one would abort the step it feeds. So a worker ignores SIGINT, SIGUSR1 and
    SIGUSR2, and SIGTERM from anyone but its trainer; the trainer's own SIGTERM (how the DataLoader or Python's exit
    stops a worker that does not stop by itself) still ends it at once."""
    for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    # Only sigwaitinfo tells who sent a signal: SIGTERM is blocked here (threads started later inherit that) and a
    # thread of its own waits for it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True, name="sigterm").start()
    threading.excepthook = _quiet_when_trainer_left


def _quiet_when_trainer_left(args) -> None:
    """A worker thread that was handing a batch to its trainer when the trainer stopped at once (a second Ctrl-C)
    finds the connection gone; that is expected, not a traceback to show."""
    if not issubclass(args.exc_type, BrokenPipeError | ConnectionResetError | EOFError):
        threading.__excepthook__(args)


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


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
        worker_init_fn=quiet_worker,  # a group SIGTERM or Ctrl-C is the trainer's to handle (training.signals)
        # on a GPU, batches arrive in page-locked memory, so their copies to the device overlap the step
        pin_memory=torch.cuda.is_available(),
    )


def eval_batches(data: DataConfig, pattern: str, decoder: SampleDecoder, questions_per_batch: int,
                 max_questions: int = 0, prompt_only: bool = True) -> Iterator[Batch]:
    """Ordered generation prompts over all shards (first ``max_questions`` questions when set); with
    ``prompt_only=False`` the same questions as labelled sequences, answers included (for teacher-forced probes)."""
    decoder.use_data_config(data)
    samples = ShardReader(decoder.skip).urls(shard_files(data, pattern, f"data.eval_sources ({pattern})"))
    return decoder.batches(samples, 0, questions_per_batch, prompt_only=prompt_only, max_sequences=max_questions)
