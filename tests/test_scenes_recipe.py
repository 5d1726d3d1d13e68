"""Tests of data_recipes/scenes.py: rendered scenes, their questions, the changing-priors split and the POPE probes.

A small build (a second or two) is read back with ``tarfile``; answers are recomputed from each sample's stored scene
and the rendered pixels, POPE negatives from the training shards' own statistics, independently of the recipe.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import pytest
from conftest import load_recipe, unload_recipe
from PIL import Image

SMALL = {"train_images": 240, "test_images": 40, "pope_images": 30, "images_per_shard": 100}
CLASSES = {f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange")
           for s in ("circle", "square", "triangle", "diamond")}
NUMBERS = ("zero", "one", "two", "three", "four", "five")


@pytest.fixture(scope="module")
def scenes():
    module = load_recipe("scenes")
    yield module
    unload_recipe(module)


@pytest.fixture(scope="module")
def built(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes") / "scenes"
    return out, scenes.build(out, **SMALL)


def read(out: Path, entry: dict) -> list[dict]:
    samples = []
    for name in entry["files"]:
        members: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members[key][ext] = tar.extractfile(member).read()
        samples += [{"key": k, "png": m["png"], "json": json.loads(m["json"])} for k, m in members.items()]
    return samples


def names(scene: dict) -> set[str]:
    return {f"{o['color']} {o['shape']}" for o in scene["objects"]}


def turns(sample: dict) -> list[tuple[str, str, str]]:
    conv = sample["json"]["conversations"]
    return [(conv[i]["value"].replace("<image>\n", ""), conv[i + 1]["value"], sample["json"]["family"][i // 2])
            for i in range(0, len(conv), 2)]


def test_same_seed_same_bytes(scenes, built, tmp_path):
    out, manifest = built
    again = scenes.build(tmp_path / "again", **SMALL)
    assert again == manifest
    files = [*(f for e in manifest["splits"].values() for f in e["files"]), "tokenizer.json", "manifest.json"]
    digest = lambda root: {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}  # noqa: E731
    assert digest(out) == digest(tmp_path / "again")
    other = scenes.build(tmp_path / "other", **{**SMALL, "seed": 1})
    assert (tmp_path / "other" / other["splits"]["qa-train"]["files"][0]).read_bytes() != \
        (out / manifest["splits"]["qa-train"]["files"][0]).read_bytes()


def test_counts_and_turn_lists(built):
    out, manifest = built
    for name, entry in manifest["splits"].items():
        samples = read(out, entry)
        assert len(samples) == entry["images"] == sum(s["samples"] for s in entry["shard_samples"]), name
        if entry["kind"] != "qa":
            continue
        assert sum(len(s["json"]["conversations"]) // 2 for s in samples) == entry["pairs"]
        for sample in samples:
            n = len(sample["json"]["conversations"]) // 2
            assert all(len(sample["json"][field]) == n for field in ("qtype", "family", "answer"))
            assert isinstance(sample["json"]["scene"], dict)  # never a per-turn list
    assert manifest["splits"]["qa-train"]["images"] == SMALL["train_images"]


def test_objects_are_rendered_where_the_scene_says(built):
    out, manifest = built
    for sample in read(out, manifest["splits"]["qa-test"]):
        image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        assert image.size == (64, 64)
        for obj in sample["json"]["scene"]["objects"]:
            r, g, b = image.getpixel((obj["x"], obj["y"]))
            expected = {"red": "r", "green": "g", "blue": "b", "yellow": "rg", "purple": "rb", "orange": "r"}
            strong = {c for c, v in zip("rgb", (r, g, b)) if v > 150}
            assert set(expected[obj["color"]]) <= strong, (sample["key"], obj, (r, g, b))
        xs = [(o["x"], o["y"]) for o in sample["json"]["scene"]["objects"]]
        assert len(set(xs)) == len(xs)


def test_answers_follow_from_the_scene(built):
    out, manifest = built
    cell = 64 / 3
    relations = {"to the left of": lambda a, b: a[0] < b[0], "to the right of": lambda a, b: a[0] > b[0],
                 "above": lambda a, b: a[1] < b[1], "below": lambda a, b: a[1] > b[1]}
    families = Counter()
    for sample in read(out, manifest["splits"]["qa-train"]) + read(out, manifest["splits"]["qa-test"]):
        objects = sample["json"]["scene"]["objects"]
        cells = {f"{o['color']} {o['shape']}": (int(o["x"] // cell), int(o["y"] // cell)) for o in objects}
        for question, answer, family in turns(sample):
            families[family] += 1
            if family == "existence":
                name = re.fullmatch(r"is there an? (.+) in the image\?", question).group(1)
                assert question.startswith("is there an " if name[0] in "aeiou" else "is there a ")
                assert name in CLASSES and answer == ("yes" if name in cells else "no")
            elif family == "counting":
                what = question.removeprefix("how many ").removesuffix(" are there?")
                count = len(objects) if what == "shapes" else sum(o["shape"] + "s" == what for o in objects)
                assert answer == NUMBERS[count]
            elif family == "colour":
                shape = question.removeprefix("what color is the ").removesuffix("?")
                (match,) = [o for o in objects if o["shape"] == shape]
                assert answer == match["color"]
            else:
                relation = next(r for r in relations if f" {r} " in question)
                a, b = question.removeprefix("is the ").removesuffix("?").split(f" {relation} the ")
                axis = 0 if "left" in relation or "right" in relation else 1
                assert cells[a][axis] != cells[b][axis]  # only asked where the cells decide it
                assert answer == ("yes" if relations[relation](cells[a], cells[b]) else "no")
    assert set(families) == {"existence", "counting", "colour", "position"}


def test_captions_list_every_object(built):
    out, manifest = built
    for sample in read(out, manifest["splits"]["captions-train"]):
        text = sample["json"]["conversations"][1]["value"]
        for obj in sample["json"]["scene"]["objects"]:
            assert f"a {obj['size']} {obj['color']} {obj['shape']}" in text


def test_cp_split_partitions_train(built):
    out, manifest = built
    pairs = lambda split: Counter((s["key"], q, a) for s in read(out, manifest["splits"][f"qa-{split}"])  # noqa: E731
                                  for q, a, _ in turns(s))
    assert pairs("cp_train") + pairs("cp_test") == pairs("train")


def test_pope_probes(built):
    out, manifest = built
    frequency, together = Counter(), Counter()
    for sample in read(out, manifest["splits"]["captions-train"]):
        present = sorted(names(sample["json"]["scene"]))
        frequency.update(present)
        together.update(frozenset(p) for p in combinations(present, 2))
    assert manifest["statistics"]["class_frequency_train"] == dict(frequency)
    for setting in ("random", "popular", "adversarial"):
        samples = read(out, manifest["splits"][f"qa-pope_{setting}"])
        assert len(samples) == SMALL["pope_images"] and all(s["key"].startswith("pope_") for s in samples)
        for sample in samples:
            present = names(sample["json"]["scene"])
            asked = [(re.fullmatch(r"is there an? (.+) in the image\?", q).group(1), a) for q, a, _ in turns(sample)]
            assert sample["json"]["pope"] == [setting] * len(asked)
            yes = [n for n, a in asked if a == "yes"]
            no = [n for n, a in asked if a == "no"]
            assert len(yes) == len(no) == min(3, len(present)) and set(yes) <= present and not set(no) & present
            absent = CLASSES - present
            if setting == "popular":
                assert min(frequency[n] for n in no) >= max(frequency[n] for n in absent - set(no))
            elif setting == "adversarial":
                score = {n: sum(together[frozenset((n, p))] for p in present) for n in absent}
                assert min(score[n] for n in no) >= max(score[n] for n in absent - set(no))
    # the skew POPE exploits: partners share training images far more often than the POPE images
    rate = manifest["statistics"]["partner_rate"]
    assert rate["train"] > 0.5 > 0.2 > rate["pope"]


def test_rejects_bad_parameters(scenes, tmp_path):
    for bad in ({"min_objects": 5, "max_objects": 4}, {"max_objects": 10}, {"cooccurrence": 1.5},
                {"image_size": 16}, {"vocab_size": 100}):
        with pytest.raises(ValueError):
            scenes.build(tmp_path / "x", **{**SMALL, **bad})
    with pytest.raises(TypeError, match="unknown parameters"):
        scenes.build(tmp_path / "x", colours=3)
