"""What every data recipe does the same way: deterministic shards, and idempotent, atomic builds with a manifest.

A recipe builds into a temporary directory next to its output and renames it into place at the end, so an interrupted
build never leaves a dataset that looks complete; an output built from the same parameters (recorded in its
``manifest.json`` with the recipe's name) and with all its files present is left alone unless forced; a directory
that is not the recipe's is never replaced.

The recipes import this file as a sibling module (``import recipe_common``): run as a script, a recipe's directory
is first on sys.path. Tests load the recipes by path and register this module first (tests/conftest.py); data_recipes/
is never put on sys.path, where easy_vqa.py would shadow the easy_vqa package.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from webdataset import TarWriter

Manifest = dict[str, Any]


def read_manifest(out: Path, recipe: str) -> Manifest | None:
    """The manifest of ``recipe`` in ``out``, or None if there is none (or it is another recipe's)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("recipe") == recipe else None


def up_to_date(out: Path, recipe: str, params: dict[str, Any], files: Callable[[Manifest], Iterable[str]]) -> Manifest | None:
    """The existing manifest if ``out`` was built with ``params`` and none of its ``files(manifest)`` is missing."""
    manifest = read_manifest(out, recipe)
    if manifest is None or manifest.get("params") != params:
        return None
    return manifest if all((out / name).is_file() for name in files(manifest)) else None


def existing_build(out: Path, recipe: str, params: dict[str, Any], files: Callable[[Manifest], Iterable[str]],
                   force: bool, what: str) -> Manifest | None:
    """The manifest of an up-to-date build in ``out`` (unless ``force``), else None: build it. Raises
    FileExistsError if ``out`` holds something that is not ``what`` (a build of ``recipe``)."""
    if not force:
        existing = up_to_date(out, recipe, params, files)
        if existing is not None:
            print(f"[{recipe}] {out}: up to date (use --force to rebuild)")
            return existing
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and read_manifest(out, recipe) is None)):
        raise FileExistsError(f"{out} exists and is not {what}; refusing to replace it")
    return None


def move_into_place(built: Path, out: Path) -> None:
    """Replace ``out`` with ``built``; ``out`` never holds a partial dataset."""
    os.chmod(built, 0o755)  # mkdtemp creates it 0700; the dataset should be as readable as any directory
    if out.exists():
        # os.replace onto an empty directory replaces it (POSIX), so mkdtemp gives a fresh, unique name.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old)
        os.replace(built, out)
        shutil.rmtree(old)
    else:
        os.replace(built, out)


def build_atomically(out: Path, build_into: Callable[[Path], Manifest]) -> Manifest:
    """Run ``build_into(staging)`` on an empty directory next to ``out`` (same file system, so the final rename is
    atomic), then publish it as ``out``; on any failure the staging directory is removed and ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = build_into(staging)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


class ShardSink:
    """Writes ``<prefix>-%06d.tar`` shards of ``samples_per_shard`` samples, one open shard at a time; ``shards``
    lists ``{"file", "samples"}`` per shard. Samples are webdataset dicts of bytes (``__key__`` plus extensions)."""

    def __init__(self, out_dir: Path, prefix: str, samples_per_shard: int):
        self.out_dir, self.prefix, self.samples_per_shard = out_dir, prefix, samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self._stream = self._writer = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None or self.shards[-1]["samples"] >= self.samples_per_shard:
            self.close()
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._stream = open(self.out_dir / name, "wb")
            # mtime=0: TarWriter otherwise stamps every member with the current time, breaking reproducibility.
            self._writer = TarWriter(self._stream, encoder=False, mtime=0)
            self.shards.append({"file": name, "samples": 0})
        self._writer.write(sample)
        self.shards[-1]["samples"] += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self._stream = self._writer = None


class QAPair(Protocol):
    qtype: str
    answer: str


PairT = TypeVar("PairT", bound=QAPair)


def changing_priors_split(
    pairs: Sequence[PairT], seed: int, major_fraction: float
) -> tuple[list[PairT], list[PairT], dict[str, dict[str, list[str]]]]:
    """Partition ``pairs`` (anything with ``qtype`` and ``answer``) into (cp_train, cp_test) with shifted answer
    priors per qtype, after Agrawal et al.'s VQA-CP.

    For every qtype, its sorted distinct answers are shuffled and cut into halves A (first ceil(n/2)) and B; a pair
    whose answer is in A goes to cp_train with probability ``major_fraction`` (else cp_test), one in B with
    probability ``1 - major_fraction``. Also returns, per qtype, its answer halves ``{"A": [...], "B": [...]}``
    (each sorted). Each qtype has its own string-seeded RNG (stable across runs, unlike ``hash()``), used first to
    shuffle the answers and then for the per-pair draws in dataset order, so adding or reordering other qtypes
    changes nothing.
    """
    indices_by_qtype: dict[str, list[int]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        indices_by_qtype[pair.qtype].append(index)
    to_cp_train = [False] * len(pairs)
    halves: dict[str, dict[str, list[str]]] = {}
    for qtype in sorted(indices_by_qtype):
        indices = indices_by_qtype[qtype]
        rng = random.Random(f"{seed}:{qtype}")
        answers = sorted({pairs[index].answer for index in indices})
        rng.shuffle(answers)
        cut = math.ceil(len(answers) / 2)
        half_a = set(answers[:cut])
        halves[qtype] = {"A": sorted(answers[:cut]), "B": sorted(answers[cut:])}
        for index in indices:
            keep_probability = major_fraction if pairs[index].answer in half_a else 1.0 - major_fraction
            to_cp_train[index] = rng.random() < keep_probability
    cp_train = [pair for pair, flag in zip(pairs, to_cp_train) if flag]
    cp_test = [pair for pair, flag in zip(pairs, to_cp_train) if not flag]
    return cp_train, cp_test, halves


def min_vocab_size(special_tokens: Sequence[str]) -> int:
    """The smallest BPE vocabulary :func:`train_tokenizer` accepts: the special tokens and the 256 byte symbols."""
    return len(special_tokens) + len(pre_tokenizers.ByteLevel.alphabet())


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str]) -> Tokenizer:
    """Byte-level BPE over ``texts``; ``special_tokens`` take ids 0, 1, ... in their order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(special_tokens),
        # All 256 byte symbols, so that any text (not just what the corpus contains) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for expected_id, token in enumerate(special_tokens):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"tokenizer gave {token!r} id {tokenizer.token_to_id(token)}, expected {expected_id}")
    return tokenizer
