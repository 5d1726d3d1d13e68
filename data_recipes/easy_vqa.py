"""Build the easy_vqa demo dataset: webdataset shards for captioning and VQA, plus a BPE tokenizer.

Usage::

    python data_recipes/easy_vqa.py --out data/easy_vqa [--seed 0] [--cp-major-fraction 0.9]
        [--images-per-shard 250] [--vocab-size 512] [--force]

Source: the ``easy_vqa`` package (4000 train / 1000 test synthetic images, each showing one shape of
one colour, with 38575 / 9673 templated questions over a 13-word answer vocabulary).

Layout of ``--out``::

    captions-train-000000.tar ...  one sample per train image whose colour or shape is derivable:
                                   <key>.png   the original PNG bytes, copied verbatim
                                   <key>.json  {"image_id", "conversations": [human "<image>\\n<prompt>",
                                               gpt "<caption>"], "shape", "color"} (unknown attribute: null)
    qa-train-000000.tar ...        standard train split, one multi-turn sample per image
    qa-test-000000.tar ...         standard test split
    qa-cp_train-000000.tar ...     changing-priors split of the standard train pairs (see below)
    qa-cp_test-000000.tar ...
    tokenizer.json                 byte-level BPE; <pad>, <s>, </s>, <image> have ids 0, 1, 2, 3
    manifest.json                  parameters, per-split counts and shard files, the colour/shape
                                   derivation report, each qtype's changing-priors answer halves

A QA sample's json is ``{"image_id", "conversations": [human q1, gpt a1, human q2, gpt a2, ...],
"qtype": [...], "family": [...], "answer": [...]}``; the lists hold one entry per QA turn, only the
first human value carries the ``<image>\\n`` prefix, and each gpt value is exactly the answer word.
``qtype`` is the question template (colour words -> ``<color>``, shape words -> ``<shape>``) and
``family`` is ``yes/no``, ``colour`` or ``shape``. Sample keys are ``<source split>_<image id:05d>``
(e.g. ``train_00012``), so an image has the same key in every shard set built from it.

Changing priors (after Agrawal et al.'s VQA-CP): for every qtype, its sorted distinct answers are
shuffled with ``random.Random(f"{seed}:{qtype}")`` and cut into halves A (first ceil(n/2)) and B.
A pair whose answer is in A goes to cp_train with probability ``cp_major_fraction`` (else cp_test),
a pair whose answer is in B with probability ``1 - cp_major_fraction``, so the answer prior of each
question type differs sharply between cp_train and cp_test. cp_train and cp_test partition the
standard train pairs.

The build is deterministic (same arguments give byte-identical files: sorted ids, string-seeded RNGs,
tar headers with mtime 0) and idempotent (an up-to-date output is left alone unless ``--force``).
It is written into a temporary directory next to ``--out`` and renamed into place at the end, so an
interrupted build never leaves a dataset that looks complete.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import recipe_common  # data_recipes/recipe_common.py (see its docstring for how it is found)
from tokenizers import Tokenizer, pre_tokenizers


def _import_easy_vqa_package() -> ModuleType:
    """The installed easy_vqa package, which this file's name shadows.

    Run as a script, this file's directory comes first on sys.path, so ``import easy_vqa`` would find
    this file; the package is located without this directory and loaded under a
    private name, leaving sys.modules["easy_vqa"] to whoever owns it.
    """
    name = "_easy_vqa_package"
    if name in sys.modules:
        return sys.modules[name]
    here = Path(__file__).resolve().parent
    search_path = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    found = importlib.machinery.PathFinder.find_spec("easy_vqa", search_path)
    if found is None or found.origin is None or not found.submodule_search_locations:
        raise ImportError("the easy_vqa package is not installed: pip install easy-vqa")
    spec = importlib.util.spec_from_file_location(
        name, found.origin, submodule_search_locations=list(found.submodule_search_locations)
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package  # its __init__ imports ``.easy_vqa``, which needs the parent registered
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[name]
        raise
    return package


easy_vqa = _import_easy_vqa_package()

RECIPE = "easy_vqa"
# Bump when the output format or content changes, so that existing outputs stop counting as up to date.
RECIPE_VERSION = 1

COLORS = ("green", "red", "gray", "teal", "black", "yellow", "brown", "blue")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
FAMILIES = ("yes/no", "colour", "shape")
# Words that flip a yes/no question: "is there not a ...", "does the image not contain ...", "is no ... present?".
NEGATORS = frozenset({"not", "no"})

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", IMAGE_TOKEN)
# Conversation templates wrap turns in these role markers; the tokenizer should have seen them.
ROLE_STRINGS = ("USER:", "ASSISTANT:", "USER", "ASSISTANT")

QA_SPLITS = ("train", "test", "cp_train", "cp_test")

CAPTION_PROMPTS = (
    "Describe the image.",
    "What is in the picture?",
    "What do you see in this image?",
    "Give a short caption for the image.",
    "Describe the shape in the image.",
)
CAPTIONS_COLOR_AND_SHAPE = (
    "a {color} {shape}.",
    "a {shape} that is {color}.",
    "there is a {color} {shape} in the image.",
    "the image shows a {color} {shape}.",
)
CAPTIONS_COLOR_ONLY = (
    "a {color} shape.",
    "a shape that is {color}.",
    "there is a {color} shape in the image.",
)
CAPTIONS_SHAPE_ONLY = (
    "a {shape}.",
    "there is a {shape} in the image.",
    "the image shows a {shape}.",
)

_WORD = re.compile(r"[a-z]+")
_COLOR_WORD = re.compile(r"\b(?:" + "|".join(COLORS) + r")\b")
_SHAPE_WORD = re.compile(r"\b(?:" + "|".join(SHAPES) + r")\b")


@dataclass(frozen=True)
class Pair:
    """One annotated question about one image."""

    image_id: int
    question: str
    answer: str
    qtype: str
    family: str


@dataclass(frozen=True)
class Attributes:
    """What the annotations reveal about an image; None where they do not pin the value down."""

    color: str | None
    shape: str | None


def question_type(question: str) -> str:
    """The question's template: colour words become ``<color>``, shape words ``<shape>``."""
    return _SHAPE_WORD.sub("<shape>", _COLOR_WORD.sub("<color>", question))


def answer_family(answer: str) -> str:
    """``yes/no``, ``colour`` or ``shape``, from the answer word."""
    if answer in YES_NO:
        return "yes/no"
    if answer in COLORS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"answer {answer!r} is outside the easy_vqa vocabulary")


def check_answer_vocabulary() -> None:
    """Fail early if the installed easy_vqa answers differ from the vocabulary this recipe hard-codes."""
    expected = set(COLORS) | set(SHAPES) | set(YES_NO)
    actual = set(easy_vqa.get_answers())
    if actual != expected:
        raise ValueError(
            f"easy_vqa answers changed: unexpected {sorted(actual - expected)}, missing {sorted(expected - actual)}"
        )


def load_pairs(split: str) -> list[Pair]:
    """The standard ``train`` or ``test`` pairs, in the package's order."""
    loader = {"train": easy_vqa.get_train_questions, "test": easy_vqa.get_test_questions}[split]
    texts, answers, image_ids = loader()
    return [
        Pair(int(image_id), text, answer, question_type(text), answer_family(answer))
        for text, answer, image_id in zip(texts, answers, image_ids, strict=True)
    ]


def load_image_paths(split: str) -> dict[int, str]:
    """image id -> PNG path for the standard ``train`` or ``test`` split."""
    loader = {"train": easy_vqa.get_train_image_paths, "test": easy_vqa.get_test_image_paths}[split]
    return {int(image_id): path for image_id, path in loader().items()}


def _resolve(
    attribute: str, image_id: int, vocabulary: Sequence[str], confirmed: set[str], excluded: set[str]
) -> str | None:
    """The one value consistent with the evidence, or None if the evidence leaves several open."""
    if len(confirmed) > 1 or confirmed & excluded:
        # Each image shows exactly one shape of one colour; a clash means a question was misread.
        raise ValueError(
            f"image {image_id}: contradictory {attribute} evidence: "
            f"confirmed {sorted(confirmed)}, excluded {sorted(excluded)}"
        )
    if confirmed:
        return next(iter(confirmed))
    remaining = [value for value in vocabulary if value not in excluded]
    return remaining[0] if len(remaining) == 1 else None


def derive_attributes(pairs: Iterable[Pair]) -> dict[int, Attributes]:
    """Each image's colour and shape, read off its question/answer pairs.

    Evidence, per mentioned colour or shape word:
    * a colour or shape answer names the attribute ("what color is the shape?" -> blue);
    * a wh-question presupposes what it mentions ("what is the blue shape?" -> the shape is blue);
    * a yes/no question confirms the mentioned value when its positive reading is true ("is there a
      red shape?" yes, "is there not a red shape?" no) and excludes it otherwise; excluding all but
      one value also determines the attribute.
    """
    confirmed: dict[tuple[int, str], set[str]] = defaultdict(set)
    excluded: dict[tuple[int, str], set[str]] = defaultdict(set)
    image_ids: set[int] = set()
    for pair in pairs:
        image_ids.add(pair.image_id)
        words = _WORD.findall(pair.question)
        mentioned = {
            "color": {word for word in words if word in COLORS},
            "shape": {word for word in words if word in SHAPES},
        }
        if pair.family == "yes/no":
            holds = (pair.answer == "yes") != bool(NEGATORS.intersection(words))
            target = confirmed if holds else excluded
        else:
            confirmed[pair.image_id, "color" if pair.family == "colour" else "shape"].add(pair.answer)
            target = confirmed  # a wh-question presupposes what it mentions
        for attribute, values in mentioned.items():
            target[pair.image_id, attribute].update(values)
    return {
        image_id: Attributes(
            color=_resolve("color", image_id, COLORS, confirmed[image_id, "color"], excluded[image_id, "color"]),
            shape=_resolve("shape", image_id, SHAPES, confirmed[image_id, "shape"], excluded[image_id, "shape"]),
        )
        for image_id in sorted(image_ids)
    }


changing_priors_split = recipe_common.changing_priors_split


def sample_key(source_split: str, image_id: int) -> str:
    """Shard key of an image; webdataset splits names at the first dot, so keys must not contain one."""
    return f"{source_split}_{image_id:05d}"


@dataclass(frozen=True)
class Sample:
    """One webdataset sample: ``<key>.png`` and ``<key>.json``."""

    key: str
    png: bytes
    meta: dict[str, Any]


def caption_text(image_id: int, attributes: Attributes, seed: int) -> tuple[str, str] | None:
    """(prompt, caption) for an image, naming only what is known; None if nothing is.

    Seeded per image, so an image's wording does not depend on which other images are captioned.
    """
    if attributes.color and attributes.shape:
        templates = CAPTIONS_COLOR_AND_SHAPE
    elif attributes.color:
        templates = CAPTIONS_COLOR_ONLY
    elif attributes.shape:
        templates = CAPTIONS_SHAPE_ONLY
    else:
        return None
    rng = random.Random(f"{seed}:caption:{image_id}")
    prompt = rng.choice(CAPTION_PROMPTS)
    caption = rng.choice(templates).format(color=attributes.color, shape=attributes.shape)
    return prompt, caption


def caption_samples(
    pngs: dict[int, bytes], attributes: dict[int, Attributes], seed: int
) -> tuple[list[Sample], list[int]]:
    """Caption samples for the train images, and the ids of images skipped because nothing is known."""
    samples: list[Sample] = []
    skipped: list[int] = []
    for image_id in sorted(pngs):
        known = attributes.get(image_id, Attributes(color=None, shape=None))
        text = caption_text(image_id, known, seed)
        if text is None:
            skipped.append(image_id)
            continue
        prompt, caption = text
        meta = {
            "image_id": image_id,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                {"from": "gpt", "value": caption},
            ],
            "shape": known.shape,
            "color": known.color,
        }
        samples.append(Sample(sample_key("train", image_id), pngs[image_id], meta))
    return samples, skipped


def qa_samples(source_split: str, pairs: Sequence[Pair], pngs: dict[int, bytes]) -> list[Sample]:
    """One multi-turn sample per image that has pairs, turns in dataset order."""
    pairs_by_image: dict[int, list[Pair]] = defaultdict(list)
    for pair in pairs:
        pairs_by_image[pair.image_id].append(pair)
    samples = []
    for image_id in sorted(pairs_by_image):
        turns = pairs_by_image[image_id]
        conversations = []
        for index, pair in enumerate(turns):
            # The image is shown once, with the first question; later turns refer back to it.
            prefix = f"{IMAGE_TOKEN}\n" if index == 0 else ""
            conversations.append({"from": "human", "value": prefix + pair.question})
            conversations.append({"from": "gpt", "value": pair.answer})
        meta = {
            "image_id": image_id,
            "conversations": conversations,
            "qtype": [pair.qtype for pair in turns],
            "family": [pair.family for pair in turns],
            "answer": [pair.answer for pair in turns],
        }
        samples.append(Sample(sample_key(source_split, image_id), pngs[image_id], meta))
    return samples


def write_shards(out_dir: Path, prefix: str, samples: Sequence[Sample], images_per_shard: int) -> list[dict[str, Any]]:
    """Write ``<prefix>-%06d.tar`` shards of ``images_per_shard`` samples; returns ``{"file", "samples"}`` per shard."""
    sink = recipe_common.ShardSink(out_dir, prefix, images_per_shard)
    for sample in samples:
        sink.write({"__key__": sample.key, "png": sample.png, "json": json.dumps(sample.meta).encode()})
    sink.close()
    return sink.shards


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE over ``texts``; the special tokens take ids 0..3 in ``SPECIAL_TOKENS`` order."""
    return recipe_common.train_tokenizer(texts, vocab_size, SPECIAL_TOKENS)


def _split_entry(kind: str, source: str, samples: Sequence[Sample], shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Manifest entry of one shard set. ``shard_samples`` ({"file", "samples"} per shard) is what the trainer counts
    as lost when a shard turns out truncated or unreadable."""
    files = [shard["file"] for shard in shards]
    entry: dict[str, Any] = {"kind": kind, "source": source, "images": len(samples)}
    if kind == "captions":
        entry["captions"] = len(samples)
    else:
        families = Counter(family for sample in samples for family in sample.meta["family"])
        entry["pairs"] = sum(families.values())
        entry["families"] = {family: families[family] for family in FAMILIES}
    entry["shards"] = len(files)
    entry["files"] = files
    entry["shard_samples"] = shards
    return entry


def _build_into(out_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Write all shards, the tokenizer and the manifest into the (empty) ``out_dir``."""
    seed = params["seed"]
    check_answer_vocabulary()
    pairs = {split: load_pairs(split) for split in ("train", "test")}
    image_paths = {split: load_image_paths(split) for split in ("train", "test")}
    # Train images are all read (captions cover those without pairs too); test images only where asked about.
    wanted = {"train": sorted(image_paths["train"]), "test": sorted({pair.image_id for pair in pairs["test"]})}
    pngs = {
        split: {image_id: Path(image_paths[split][image_id]).read_bytes() for image_id in wanted[split]}
        for split in ("train", "test")
    }
    splits: dict[str, dict[str, Any]] = {}

    attributes = derive_attributes(pairs["train"])
    captions, skipped = caption_samples(pngs["train"], attributes, seed)
    shards = write_shards(out_dir, "captions-train", captions, params["images_per_shard"])
    splits["captions-train"] = _split_entry("captions", "train", captions, shards)
    _progress("captions-train", splits["captions-train"])
    known = [attributes.get(image_id, Attributes(color=None, shape=None)) for image_id in sorted(pngs["train"])]
    derivation = {
        "images_without_color": sum(1 for item in known if item.color is None),
        "images_without_shape": sum(1 for item in known if item.shape is None),
        "images_skipped": len(skipped),
        "skipped_image_ids": skipped,
    }

    cp_train, cp_test, halves = changing_priors_split(pairs["train"], seed, params["cp_major_fraction"])
    qa_pairs = {"train": pairs["train"], "test": pairs["test"], "cp_train": cp_train, "cp_test": cp_test}
    for split in QA_SPLITS:
        source = "test" if split == "test" else "train"
        samples = qa_samples(source, qa_pairs[split], pngs[source])
        name = f"qa-{split}"
        splits[name] = _split_entry(
            "qa", source, samples, write_shards(out_dir, name, samples, params["images_per_shard"])
        )
        _progress(name, splits[name])

    corpus = [pair.question for split in ("train", "test") for pair in pairs[split]]
    corpus += [*COLORS, *SHAPES, *YES_NO, *CAPTION_PROMPTS, *ROLE_STRINGS]
    corpus += [sample.meta["conversations"][1]["value"] for sample in captions]
    tokenizer = train_tokenizer(corpus, params["vocab_size"])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    print(f"[{RECIPE}] tokenizer.json: vocab size {tokenizer.get_vocab_size()}", flush=True)

    manifest = {
        "recipe": RECIPE,
        "params": params,
        "splits": splits,
        "captions": derivation,
        "changing_priors": halves,
        "tokenizer": {
            "file": "tokenizer.json",
            "vocab_size": tokenizer.get_vocab_size(),
            "special_tokens": list(SPECIAL_TOKENS),
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _progress(name: str, entry: dict[str, Any]) -> None:
    unit = "pairs" if "pairs" in entry else "captions"
    print(f"[{RECIPE}] {name}: {entry['images']} images, {entry[unit]} {unit}, {entry['shards']} shards", flush=True)


def _files(manifest: dict[str, Any]) -> list[str]:
    """The files a complete build holds, besides the manifest."""
    return [name for entry in manifest["splits"].values() for name in entry["files"]] + [manifest["tokenizer"]["file"]]


def check_params(cp_major_fraction: float, images_per_shard: int, vocab_size: int) -> None:
    """Reject parameters that cannot give a usable dataset (any integer is a valid seed)."""
    if not 0.0 <= cp_major_fraction <= 1.0:
        raise ValueError(f"cp_major_fraction={cp_major_fraction} must be in [0, 1]")
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard={images_per_shard} must be >= 1")
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} must be >= {minimum} (special tokens + 256 byte symbols)")


def build(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    cp_major_fraction: float = 0.9,
    images_per_shard: int = 250,
    vocab_size: int = 512,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Build the dataset into ``out_dir`` (unless it is already up to date) and return its manifest."""
    check_params(cp_major_fraction, images_per_shard, vocab_size)
    out = Path(out_dir).resolve()
    params = {
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "cp_major_fraction": cp_major_fraction,
        "images_per_shard": images_per_shard,
        "vocab_size": vocab_size,
    }
    existing = recipe_common.existing_build(out, RECIPE, params, _files, force, f"an {RECIPE} dataset")
    if existing is not None:
        return existing
    started = time.perf_counter()
    manifest = recipe_common.build_atomically(out, lambda staging: _build_into(staging, params))
    _print_summary(out, manifest, time.perf_counter() - started)
    return manifest


def _print_summary(out: Path, manifest: dict[str, Any], seconds: float) -> None:
    rows = [("split", "images", "pairs", "shards")]
    for name, entry in manifest["splits"].items():
        rows.append((name, str(entry["images"]), str(entry.get("pairs", entry.get("captions"))), str(entry["shards"])))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]))
    derivation = manifest["captions"]
    print(
        f"train images without derivable colour: {derivation['images_without_color']}, "
        f"without shape: {derivation['images_without_shape']}, skipped (neither): {derivation['images_skipped']}"
    )
    print(f"tokenizer vocab size: {manifest['tokenizer']['vocab_size']}")
    print(f"built {out} in {seconds:.1f}s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory, e.g. data/easy_vqa")
    parser.add_argument("--seed", type=int, default=0, help="seed of captions and the changing-priors split")
    parser.add_argument(
        "--cp-major-fraction",
        type=float,
        default=0.9,
        help="probability that a pair whose answer is in its qtype's half A goes to cp_train",
    )
    parser.add_argument("--images-per-shard", type=int, default=250)
    parser.add_argument("--vocab-size", type=int, default=512, help="requested BPE vocabulary size")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    args = parser.parse_args(argv)
    try:
        check_params(args.cp_major_fraction, args.images_per_shard, args.vocab_size)
    except ValueError as error:
        parser.error(str(error))
    build(
        args.out,
        seed=args.seed,
        cp_major_fraction=args.cp_major_fraction,
        images_per_shard=args.images_per_shard,
        vocab_size=args.vocab_size,
        force=args.force,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
