"""Build the multi-object scenes dataset: rendered images, captions, VQA, a changing-priors split and POPE probes.

Usage::

    python data_recipes/scenes.py --out data/scenes [--seed 0] [--train-images 3000] [--test-images 300]
        [--pope-images 150] [--image-size 64] [--min-objects 2] [--max-objects 4] [--cooccurrence 0.8]
        [--popularity-skew 1.0] [--cp-major-fraction 0.9] [--images-per-shard 250] [--vocab-size 512] [--force]

Every image is drawn here with PIL: 2-4 (``--min/--max-objects``) objects on a dark background, each a shape
(circle, square, triangle, diamond) of a colour (red, green, blue, yellow, purple, orange) and a size (small, large),
in distinct cells of a 3 x 3 grid (so they never overlap) with a seeded jitter. An object's *class* is its colour and
shape ("red circle"); the classes of an image are distinct.

Training and standard-test scenes follow skewed statistics, so that answer priors can mislead: classes are drawn with
Zipf-like popularity (weight ``1 / rank**popularity_skew`` over a seeded ranking) and every class has a *partner*
(a seeded pairing of the 24 classes) that joins it with probability ``--cooccurrence``. The held-out POPE scenes
draw their classes uniformly and without partners, so "the partner of what I see is probably there too" is wrong
there as often as anywhere.

Layout of ``--out`` (the same webdataset layout as data_recipes/easy_vqa.py)::

    captions-train-*.tar        one sample per train image: <key>.png and <key>.json {"image_id", "conversations":
                                [human "<image>\\n<prompt>", gpt "<caption listing the objects left to right>"],
                                "scene": {"objects": [...]}}
    qa-train-*.tar, qa-test-*.tar   standard splits, one multi-turn sample per image; families existence (one present
                                and one absent class), counting, colour (of a shape the image holds once) and
                                position (left of / right of / above / below another object, yes or no)
    qa-cp_train-*.tar, qa-cp_test-*.tar   the changing-priors split of the train pairs, as in easy_vqa
    qa-pope_random-*.tar, qa-pope_popular-*.tar, qa-pope_adversarial-*.tar
                                POPE on the held-out images: "is there a/an <class> in the image?" for up to 3 present
                                classes and as many absent ones, sampled at random, among the most frequent training
                                classes (popular), or among those that co-occur most in training with the image's
                                classes (adversarial); turns carry "pope": <setting>
    tokenizer.json, manifest.json   as in easy_vqa; the manifest adds "statistics" (objects per image, questions per
                                family, class frequencies, partner rates in training and in the POPE images)

QA json is ``{"image_id", "conversations", "qtype", "family", "answer"[, "pope"], "scene"}``: per-turn lists, the
``<image>`` placeholder only in the first human turn, ``qtype`` the template with colour and shape words replaced.
The build is deterministic (same arguments, same bytes: string-seeded RNGs, PIL drawing without anti-aliasing, tar
headers with mtime 0) and idempotent, and is written next to ``--out`` and renamed into place (recipe_common).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import recipe_common  # data_recipes/recipe_common.py (see its docstring for how it is found)
from PIL import Image, ImageDraw

RECIPE = "scenes"
RECIPE_VERSION = 1  # bump when the output changes, so existing outputs stop counting as up to date

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
          "purple": (160, 60, 200), "orange": (250, 140, 20)}
SIZES = {"small": 0.18, "large": 0.30}  # object radius as a share of a grid cell's side
CLASSES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
GRID = 3  # objects sit in distinct cells of a GRID x GRID grid
BACKGROUND = (30, 30, 30)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FAMILIES = ("existence", "counting", "colour", "position")
POPE_SETTINGS = ("random", "popular", "adversarial")
POPE_PRESENT = 3  # present classes asked about per POPE image (all of them when fewer)
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", IMAGE_TOKEN)
ROLE_STRINGS = ("USER:", "ASSISTANT:", "USER", "ASSISTANT")
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "List the objects in the image.",
                   "What do you see in this image?")

_COLOR_WORD = re.compile(r"\b(?:" + "|".join(COLORS) + r")\b")
_SHAPE_WORD = re.compile(r"\b(?:" + "|".join(SHAPES) + r")\b")


@dataclass(frozen=True)
class Obj:
    """One object of a scene: its class parts, size and grid cell (column, row), centre in pixels."""

    color: str
    shape: str
    size: str
    column: int
    row: int
    x: int
    y: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Pair:
    """One question about one image (``pope``: the POPE setting, "" outside the POPE splits)."""

    image_id: int
    question: str
    answer: str
    family: str
    pope: str = ""

    @property
    def qtype(self) -> str:
        return _SHAPE_WORD.sub("<shape>", _COLOR_WORD.sub("<color>", self.question))


@dataclass(frozen=True)
class Priors:
    """The skewed class statistics of training scenes: popularity weights and each class's partner."""

    weights: dict[str, float]
    partner: dict[str, str]


def make_priors(seed: int, popularity_skew: float) -> Priors:
    """A seeded popularity ranking (weight ``1 / rank**skew``) and a seeded pairing of the classes into partners."""
    rng = random.Random(f"{seed}:priors")
    ranked = list(CLASSES)
    rng.shuffle(ranked)
    weights = {name: 1.0 / (rank + 1) ** popularity_skew for rank, name in enumerate(ranked)}
    paired = list(CLASSES)
    rng.shuffle(paired)
    partner = {}
    for a, b in zip(paired[::2], paired[1::2], strict=True):
        partner[a], partner[b] = b, a
    return Priors(weights, partner)


def sample_classes(rng: random.Random, count: int, priors: Priors | None, cooccurrence: float) -> list[str]:
    """``count`` distinct classes: popularity-weighted with partners joining (``priors``), or uniform (None)."""
    chosen: list[str] = []
    while len(chosen) < count:
        left = [name for name in CLASSES if name not in chosen]
        weights = [priors.weights[name] for name in left] if priors else None
        name = rng.choices(left, weights=weights)[0]
        chosen.append(name)
        if priors and len(chosen) < count and priors.partner[name] not in chosen and rng.random() < cooccurrence:
            chosen.append(priors.partner[name])
    return chosen


def sample_scene(rng: random.Random, params: dict[str, Any], priors: Priors | None) -> list[Obj]:
    """The objects of one scene, in distinct grid cells with a jitter that keeps them inside their cells."""
    count = rng.randint(params["min_objects"], params["max_objects"])
    classes = sample_classes(rng, count, priors, params["cooccurrence"])
    cells = rng.sample(range(GRID * GRID), count)
    cell = params["image_size"] / GRID
    objects = []
    for name, index in zip(classes, cells, strict=True):
        color, shape = name.split()
        size = rng.choice(tuple(SIZES))
        slack = cell / 2 - SIZES[size] * cell - 1  # room for the centre to move without leaving the cell
        column, row = index % GRID, index // GRID
        x = round((column + 0.5) * cell + rng.uniform(-slack, slack))
        y = round((row + 0.5) * cell + rng.uniform(-slack, slack))
        objects.append(Obj(color, shape, size, column, row, x, y))
    return objects


def render(objects: Sequence[Obj], image_size: int) -> bytes:
    """The scene as PNG bytes (no anti-aliasing, fixed compression: the same scene gives the same bytes)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for obj in objects:
        r = SIZES[obj.size] * cell
        x, y, fill = obj.x, obj.y, COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        else:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def caption(objects: Sequence[Obj], rng: random.Random) -> tuple[str, str]:
    """(prompt, caption): the objects listed left to right, top to bottom."""
    names = [f"a {o.size} {o.name}" for o in sorted(objects, key=lambda o: (o.column, o.row))]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return rng.choice(CAPTION_PROMPTS), f"{listed}."


def relation_holds(a: Obj, b: Obj, relation: str) -> bool | None:
    """Whether ``a`` is ``relation`` of ``b``; None when their cells do not decide it (same column or row)."""
    if relation in ("left", "right"):
        if a.column == b.column:
            return None
        return (a.column < b.column) == (relation == "left")
    if a.row == b.row:
        return None
    return (a.row < b.row) == (relation == "above")


def existence_question(name: str) -> str:
    return f"is there {'an' if name[0] in 'aeiou' else 'a'} {name} in the image?"


def qa_pairs(image_id: int, objects: Sequence[Obj], rng: random.Random) -> list[Pair]:
    """The standard questions of one image: one per family (two for existence), where the image allows it."""
    present = [o.name for o in objects]
    absent = [name for name in CLASSES if name not in present]
    pairs = [Pair(image_id, existence_question(rng.choice(present)), "yes", "existence"),
             Pair(image_id, existence_question(rng.choice(absent)), "no", "existence")]
    if rng.random() < 0.5:
        pairs.append(Pair(image_id, "how many shapes are there?", NUMBERS[len(objects)], "counting"))
    else:
        shape = rng.choice(SHAPES)
        pairs.append(Pair(image_id, f"how many {shape}s are there?",
                          NUMBERS[sum(o.shape == shape for o in objects)], "counting"))
    shapes = Counter(o.shape for o in objects)
    single = [o for o in objects if shapes[o.shape] == 1]
    if single:
        obj = rng.choice(single)
        pairs.append(Pair(image_id, f"what color is the {obj.shape}?", obj.color, "colour"))
    decidable = [(a, b, rel) for a, b in combinations(objects, 2) for a, b in ((a, b), (b, a))
                 for rel in RELATIONS if relation_holds(a, b, rel) is not None]
    if decidable:
        a, b, rel = rng.choice(decidable)
        answer = "yes" if relation_holds(a, b, rel) else "no"
        pairs.append(Pair(image_id, f"is the {a.name} {RELATIONS[rel]} the {b.name}?", answer, "position"))
    return pairs


def pope_pairs(image_id: int, objects: Sequence[Obj], setting: str, frequency: Counter, together: Counter,
               rng: random.Random) -> list[Pair]:
    """POPE questions of one held-out image: up to POPE_PRESENT present classes ("yes") and as many absent ones
    ("no"), the absent ones drawn by ``setting``; yes and no turns in a seeded order."""
    present = sorted(o.name for o in objects)
    asked = rng.sample(present, min(POPE_PRESENT, len(present)))
    absent = [name for name in CLASSES if name not in present]
    if setting == "random":
        negatives = rng.sample(absent, len(asked))
    elif setting == "popular":  # the most frequent training classes (ties: class order)
        negatives = sorted(absent, key=lambda n: -frequency[n])[: len(asked)]
    else:  # adversarial: the classes seen most often together with this image's classes in training
        negatives = sorted(absent, key=lambda n: -sum(together[frozenset((n, p))] for p in present))[: len(asked)]
    pairs = [Pair(image_id, existence_question(name), "yes", "existence", setting) for name in asked]
    pairs += [Pair(image_id, existence_question(name), "no", "existence", setting) for name in negatives]
    rng.shuffle(pairs)
    return pairs


def scene_meta(objects: Sequence[Obj]) -> dict[str, Any]:
    # a dict, not a list: list fields as long as the turns would read as per-turn metadata (data.decode.turn_meta)
    return {"objects": [{"color": o.color, "shape": o.shape, "size": o.size, "x": o.x, "y": o.y} for o in objects]}


def qa_sample(key: str, image_id: int, png: bytes, objects: Sequence[Obj], pairs: Sequence[Pair]) -> dict:
    conversations = []
    for index, pair in enumerate(pairs):
        prefix = f"{IMAGE_TOKEN}\n" if index == 0 else ""  # the image is shown once, with the first question
        conversations += [{"from": "human", "value": prefix + pair.question}, {"from": "gpt", "value": pair.answer}]
    meta: dict[str, Any] = {"image_id": image_id, "conversations": conversations, "qtype": [p.qtype for p in pairs],
                            "family": [p.family for p in pairs], "answer": [p.answer for p in pairs]}
    if pairs[0].pope:
        meta["pope"] = [p.pope for p in pairs]
    meta["scene"] = scene_meta(objects)
    return {"__key__": key, "png": png, "json": json.dumps(meta).encode()}


def write_split(out_dir: Path, name: str, samples: Sequence[dict], images_per_shard: int, kind: str) -> dict:
    """Write one shard set; its manifest entry (images, pairs per family or captions, files, shard_samples)."""
    sink = recipe_common.ShardSink(out_dir, name, images_per_shard)
    for sample in samples:
        sink.write(sample)
    sink.close()
    metas = [json.loads(sample["json"]) for sample in samples]
    entry: dict[str, Any] = {"kind": kind, "images": len(samples)}
    if kind == "qa":
        families = Counter(family for meta in metas for family in meta["family"])
        entry["pairs"] = sum(families.values())
        entry["families"] = {family: families[family] for family in FAMILIES if families[family]}
    else:
        entry["captions"] = len(samples)
    entry.update(shards=len(sink.shards), files=[s["file"] for s in sink.shards], shard_samples=sink.shards)
    print(f"[{RECIPE}] {name}: {entry['images']} images, {entry.get('pairs', entry.get('captions'))} "
          f"{'pairs' if kind == 'qa' else 'captions'}", flush=True)
    return entry


def partner_rate(scenes: Sequence[Sequence[Obj]], priors: Priors) -> float:
    """Share of (image, object) whose class's partner is in the image too."""
    hits = [priors.partner[o.name] in {p.name for p in scene} for scene in scenes for o in scene]
    return round(sum(hits) / max(len(hits), 1), 4)


def _build_into(out_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    seed, size = params["seed"], params["image_size"]
    priors = make_priors(seed, params["popularity_skew"])
    scenes = {split: [sample_scene(random.Random(f"{seed}:scene:{split}:{i}"), params,
                                   None if split == "pope" else priors) for i in range(params[f"{split}_images"])]
              for split in ("train", "test", "pope")}
    pngs = {split: [render(objects, size) for objects in scenes[split]] for split in scenes}
    key = "{}_{:05d}".format
    splits: dict[str, dict[str, Any]] = {}
    captions = []
    for i, objects in enumerate(scenes["train"]):
        prompt, text = caption(objects, random.Random(f"{seed}:caption:{i}"))
        meta = {"image_id": i, "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                                                 {"from": "gpt", "value": text}], "scene": scene_meta(objects)}
        captions.append({"__key__": key("train", i), "png": pngs["train"][i], "json": json.dumps(meta).encode()})
    per_shard = params["images_per_shard"]
    splits["captions-train"] = write_split(out_dir, "captions-train", captions, per_shard, "captions")

    pairs = {split: [p for i, objects in enumerate(scenes[split])
                     for p in qa_pairs(i, objects, random.Random(f"{seed}:qa:{split}:{i}"))]
             for split in ("train", "test")}
    cp_train, cp_test, halves = recipe_common.changing_priors_split(pairs["train"], seed, params["cp_major_fraction"])
    frequency = Counter(o.name for objects in scenes["train"] for o in objects)
    together = Counter(frozenset((a.name, b.name)) for objects in scenes["train"] for a, b in combinations(objects, 2))
    for setting in POPE_SETTINGS:
        pairs[f"pope_{setting}"] = [
            p for i, objects in enumerate(scenes["pope"])
            for p in pope_pairs(i, objects, setting, frequency, together, random.Random(f"{seed}:pope:{setting}:{i}"))]
    pairs.update(cp_train=cp_train, cp_test=cp_test)
    qa_splits = ("train", "test", "cp_train", "cp_test", *(f"pope_{s}" for s in POPE_SETTINGS))
    for split in qa_splits:
        source = split.split("_")[0] if split.startswith(("test", "pope")) else "train"
        by_image: dict[int, list[Pair]] = {}
        for pair in pairs[split]:
            by_image.setdefault(pair.image_id, []).append(pair)
        samples = [qa_sample(key(source, i), i, pngs[source][i], scenes[source][i], turns)
                   for i, turns in sorted(by_image.items())]
        splits[f"qa-{split}"] = {**write_split(out_dir, f"qa-{split}", samples, per_shard, "qa"), "source": source}

    corpus = [p.question for split in qa_splits for p in pairs[split]]
    corpus += [json.loads(c["json"])["conversations"][1]["value"] for c in captions]
    corpus += [*COLORS, *SHAPES, *NUMBERS, "yes", "no", *CAPTION_PROMPTS, *ROLE_STRINGS]
    tokenizer = recipe_common.train_tokenizer(corpus, params["vocab_size"], SPECIAL_TOKENS)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    statistics = {
        "objects_per_image": {split: dict(sorted(Counter(len(s) for s in scenes[split]).items())) for split in scenes},
        "class_frequency_train": dict(frequency.most_common()),
        "partners": {a: b for a, b in sorted(priors.partner.items()) if a < b},
        # how often a class's partner is in the same image: the co-occurrence prior POPE's adversarial setting tests
        "partner_rate": {split: partner_rate(scenes[split], priors) for split in scenes},
    }
    manifest = {"recipe": RECIPE, "params": params, "splits": splits, "statistics": statistics,
                "changing_priors": halves,
                "tokenizer": {"file": "tokenizer.json", "vocab_size": tokenizer.get_vocab_size(),
                              "special_tokens": list(SPECIAL_TOKENS)}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _files(manifest: dict[str, Any]) -> list[str]:
    return [name for entry in manifest["splits"].values() for name in entry["files"]] + [manifest["tokenizer"]["file"]]


def check_params(params: dict[str, Any]) -> None:
    """Reject parameters that cannot give a usable dataset (any integer is a valid seed)."""
    if not 1 <= params["min_objects"] <= params["max_objects"] <= GRID * GRID:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID}, got "
                         f"{params['min_objects']}..{params['max_objects']}")
    if params["image_size"] < 8 * GRID:
        raise ValueError(f"image_size={params['image_size']} must be >= {8 * GRID} pixels")
    for name in ("train_images", "test_images", "pope_images", "images_per_shard"):
        if params[name] < 1:
            raise ValueError(f"{name}={params[name]} must be >= 1")
    for name in ("cooccurrence", "cp_major_fraction"):
        if not 0.0 <= params[name] <= 1.0:
            raise ValueError(f"{name}={params[name]} must be in [0, 1]")
    if params["popularity_skew"] < 0:
        raise ValueError(f"popularity_skew={params['popularity_skew']} must be >= 0 (0 = uniform)")
    if params["vocab_size"] < recipe_common.min_vocab_size(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={params['vocab_size']} must be >= "
                         f"{recipe_common.min_vocab_size(SPECIAL_TOKENS)} (special tokens + 256 byte symbols)")


DEFAULTS = {"seed": 0, "train_images": 3000, "test_images": 300, "pope_images": 150, "image_size": 64,
            "min_objects": 2, "max_objects": 4, "cooccurrence": 0.8, "popularity_skew": 1.0,
            "cp_major_fraction": 0.9, "images_per_shard": 250, "vocab_size": 512}


def build(out_dir: str | os.PathLike[str], *, force: bool = False, **overrides: Any) -> dict[str, Any]:
    """Build the dataset into ``out_dir`` (unless it is already up to date) and return its manifest; keyword
    arguments override :data:`DEFAULTS`."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown parameters {sorted(unknown)}; expected some of {sorted(DEFAULTS)}")
    params = {"recipe_version": RECIPE_VERSION, **DEFAULTS, **overrides}
    check_params(params)
    out = Path(out_dir).resolve()
    existing = recipe_common.existing_build(out, RECIPE, params, _files, force, f"a {RECIPE} dataset")
    if existing is not None:
        return existing
    started = time.perf_counter()
    manifest = recipe_common.build_atomically(out, lambda staging: _build_into(staging, params))
    stats = manifest["statistics"]
    print(f"[{RECIPE}] partner rate (share of objects whose partner is in the image): {stats['partner_rate']}")
    print(f"[{RECIPE}] tokenizer vocab size {manifest['tokenizer']['vocab_size']}; built {out} in "
          f"{time.perf_counter() - started:.1f}s")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory, e.g. data/scenes")
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    args = vars(parser.parse_args(argv))
    out, force = args.pop("out"), args.pop("force")
    try:
        check_params({"recipe_version": RECIPE_VERSION, **args})
    except ValueError as error:
        parser.error(str(error))
    build(out, force=force, **args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
