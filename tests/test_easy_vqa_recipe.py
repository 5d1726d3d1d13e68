"""Tests of data_recipes/easy_vqa.py: the easy_vqa shards, changing-priors split, captions and tokenizer.

The dataset is built once per module (a few seconds) and read back with ``tarfile``; the checks recompute
what they verify (question templates, answer halves, colours and shapes) independently of the recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import webdataset
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data_recipes" / "easy_vqa.py"
SEED = 0
MAJOR = 0.9
COLORS = {"green", "red", "gray", "teal", "black", "yellow", "brown", "blue"}
SHAPES = {"circle", "rectangle", "triangle"}
QA_SPLITS = ("train", "test", "cp_train", "cp_test")


@pytest.fixture(scope="module")
def built(recipe, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("easy_vqa_build") / "easy_vqa"
    manifest = recipe.build(out, seed=SEED, cp_major_fraction=MAJOR, images_per_shard=250, vocab_size=512)
    return out, manifest


def read_shard(path: Path) -> list[dict[str, Any]]:
    """Samples of one tar shard as {"key", "png", "json"}, checking members come as <key>.png/<key>.json."""
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            members[key][extension] = tar.extractfile(member).read()
    samples = []
    for key, files in members.items():
        assert sorted(files) == ["json", "png"], (path.name, key, sorted(files))
        samples.append({"key": key, "png": files["png"], "json": json.loads(files["json"])})
    return samples


@pytest.fixture(scope="module")
def shards(built) -> dict[str, list[dict[str, Any]]]:
    """Every shard set's samples, in file order, keyed by manifest split name."""
    out, manifest = built
    return {
        name: [sample for file in entry["files"] for sample in read_shard(out / file)]
        for name, entry in manifest["splits"].items()
    }


@pytest.fixture(scope="module")
def package(recipe):
    """The easy_vqa package itself, as the recipe loaded it, after checking that it is one."""
    assert recipe.easy_vqa.__file__.endswith("easy_vqa/__init__.py")
    assert len(recipe.easy_vqa.get_answers()) == 13
    return recipe.easy_vqa


@pytest.fixture(scope="module")
def package_pairs(package) -> dict[str, list[tuple[int, str, str]]]:
    """(image_id, question, answer) of the standard splits, straight from the easy_vqa package."""
    result = {}
    for split, loader in (("train", package.get_train_questions), ("test", package.get_test_questions)):
        texts, answers, image_ids = loader()
        result[split] = list(zip(image_ids, texts, answers))
    return result


def turns(samples: list[dict[str, Any]]) -> list[tuple[int, str, str, str]]:
    """(image_id, question, answer, qtype) of every QA turn, the <image> prefix removed."""
    result = []
    for sample in samples:
        meta = sample["json"]
        conversations = meta["conversations"]
        for index, qtype in enumerate(meta["qtype"]):
            question = conversations[2 * index]["value"].removeprefix("<image>\n")
            result.append((meta["image_id"], question, conversations[2 * index + 1]["value"], qtype))
    return result


def template(question: str) -> str:
    """The qtype the recipe should assign, recomputed word by word."""
    words = question[:-1].split(" ")  # questions end with "?"
    return " ".join("<color>" if w in COLORS else "<shape>" if w in SHAPES else w for w in words) + "?"


def true_attributes(pairs: list[tuple[int, str, str]]) -> dict[int, dict[str, str]]:
    """Colour/shape of images asked a wh-question, from the answer words alone (no yes/no reasoning)."""
    truth: dict[int, dict[str, str]] = defaultdict(dict)
    for image_id, _question, answer in pairs:
        if answer in COLORS:
            truth[image_id]["color"] = answer
        elif answer in SHAPES:
            truth[image_id]["shape"] = answer
    return truth


def test_manifest_counts_match_shards(built, shards):
    out, manifest = built
    splits = manifest["splits"]
    assert list(splits) == ["captions-train", "qa-train", "qa-test", "qa-cp_train", "qa-cp_test"]
    assert (splits["qa-train"]["images"], splits["qa-train"]["pairs"]) == (4000, 38575)
    assert (splits["qa-test"]["images"], splits["qa-test"]["pairs"]) == (1000, 9673)
    assert splits["qa-cp_train"]["pairs"] + splits["qa-cp_test"]["pairs"] == 38575
    for name, entry in splits.items():
        samples = shards[name]
        assert entry["images"] == len(samples)
        assert entry["shards"] == len(entry["files"]) == math.ceil(len(samples) / 250)
        assert entry["files"] == [f"{name}-{index:06d}.tar" for index in range(entry["shards"])]
        assert all((out / file).is_file() for file in entry["files"])
        if entry["kind"] == "qa":
            families = Counter(f for sample in samples for f in sample["json"]["family"])
            assert entry["families"] == {family: families[family] for family in ("yes/no", "colour", "shape")}
            assert entry["pairs"] == sum(families.values())
        else:
            assert entry["captions"] == len(samples)
    assert sorted(os.listdir(out)) == sorted(
        [file for entry in splits.values() for file in entry["files"]] + ["manifest.json", "tokenizer.json"]
    )


def test_keys_and_pngs_are_verbatim(shards, package):
    image_paths = {"train": package.get_train_image_paths(), "test": package.get_test_image_paths()}
    for name, samples in shards.items():
        source = "test" if name == "qa-test" else "train"
        ids = [sample["json"]["image_id"] for sample in samples]
        assert ids == sorted(set(ids)), name  # sorted, one sample per image
        for sample in samples:
            image_id = sample["json"]["image_id"]
            assert sample["key"] == f"{source}_{image_id:05d}"
            assert "." not in sample["key"]
            assert sample["png"] == Path(image_paths[source][image_id]).read_bytes()


def test_qa_turn_lists_are_aligned(shards):
    for split in QA_SPLITS:
        for sample in shards[f"qa-{split}"]:
            meta = sample["json"]
            assert set(meta) == {"image_id", "conversations", "qtype", "family", "answer"}
            conversations = meta["conversations"]
            n = len(meta["qtype"])
            assert n >= 1 and len(conversations) == 2 * n == 2 * len(meta["family"]) == 2 * len(meta["answer"])
            for index in range(n):
                human, gpt = conversations[2 * index], conversations[2 * index + 1]
                assert (human["from"], gpt["from"]) == ("human", "gpt")
                assert human["value"].startswith("<image>\n") == (index == 0)
                assert "<image>" not in human["value"].removeprefix("<image>\n")
                question = human["value"].removeprefix("<image>\n")
                answer = meta["answer"][index]
                assert gpt["value"] == answer
                assert meta["qtype"][index] == template(question)
                expected_family = "colour" if answer in COLORS else "shape" if answer in SHAPES else "yes/no"
                assert meta["family"][index] == expected_family
                assert expected_family != "yes/no" or answer in {"yes", "no"}


def test_standard_splits_hold_every_package_pair(shards, package_pairs):
    for split in ("train", "test"):
        built_pairs = Counter((image_id, q, a) for image_id, q, a, _ in turns(shards[f"qa-{split}"]))
        assert built_pairs == Counter(package_pairs[split])


def test_cp_splits_partition_train(shards):
    train = Counter((image_id, q) for image_id, q, _, _ in turns(shards["qa-train"]))
    cp_train = Counter((image_id, q) for image_id, q, _, _ in turns(shards["qa-cp_train"]))
    cp_test = Counter((image_id, q) for image_id, q, _, _ in turns(shards["qa-cp_test"]))
    assert sum(cp_train.values()) + sum(cp_test.values()) == sum(train.values()) == 38575
    assert cp_train + cp_test == train
    assert not set(cp_train) & set(cp_test)
    assert sum(cp_train.values()) > 0 and sum(cp_test.values()) > 0


def test_cp_splits_shift_answer_priors(built, shards):
    _, manifest = built
    halves = manifest["changing_priors"]
    cp_train = Counter((qtype, answer) for _, _, answer, qtype in turns(shards["qa-cp_train"]))
    cp_test = Counter((qtype, answer) for _, _, answer, qtype in turns(shards["qa-cp_test"]))
    answers_by_qtype: dict[str, set[str]] = defaultdict(set)
    for qtype, answer in cp_train + cp_test:
        answers_by_qtype[qtype].add(answer)
    assert sorted(halves) == sorted(answers_by_qtype)
    b_in_cp_test = 0
    for qtype, answers in answers_by_qtype.items():
        assert len(answers) >= 2, qtype  # every easy_vqa qtype has several answers
        # The halves follow the documented recipe: sorted answers, shuffled by a string-seeded RNG.
        ordered = sorted(answers)
        random.Random(f"{SEED}:{qtype}").shuffle(ordered)
        cut = math.ceil(len(ordered) / 2)
        assert halves[qtype] == {"A": sorted(ordered[:cut]), "B": sorted(ordered[cut:])}
        half_a, half_b = set(ordered[:cut]), set(ordered[cut:])
        a_train = sum(cp_train[qtype, answer] for answer in half_a)
        a_total = a_train + sum(cp_test[qtype, answer] for answer in half_a)
        b_test = sum(cp_test[qtype, answer] for answer in half_b)
        b_total = b_test + sum(cp_train[qtype, answer] for answer in half_b)
        # Binomial draws: allow 4 standard deviations around the target probability.
        assert abs(a_train / a_total - MAJOR) < 4 * math.sqrt(MAJOR * (1 - MAJOR) / a_total), qtype
        assert abs(b_test / b_total - MAJOR) < 4 * math.sqrt(MAJOR * (1 - MAJOR) / b_total), qtype
        n_test = sum(cp_test[qtype, answer] for answer in answers)
        n_train = sum(cp_train[qtype, answer] for answer in answers)
        assert b_test / n_test > 0.5, qtype  # cp_test is dominated by B answers...
        assert b_test / n_test > (b_total - b_test) / n_train + 0.3, qtype  # ...far more than cp_train is
        b_in_cp_test += b_test
    assert b_in_cp_test / sum(cp_test.values()) > 0.8


def test_cp_split_follows_seed(recipe, shards):
    pairs = recipe.load_pairs("train")
    built_cp_train = Counter((image_id, q) for image_id, q, _, _ in turns(shards["qa-cp_train"]))
    same, _, _ = recipe.changing_priors_split(pairs, SEED, MAJOR)
    assert Counter((pair.image_id, pair.question) for pair in same) == built_cp_train
    other, _, other_halves = recipe.changing_priors_split(pairs, SEED + 1, MAJOR)
    other_cp_train = Counter((pair.image_id, pair.question) for pair in other)
    assert other_cp_train != built_cp_train
    assert len(set(other_cp_train) ^ set(built_cp_train)) > 1000  # a reshuffle, not a few flipped pairs


def test_captions_name_true_colour_and_shape(built, shards, package_pairs):
    _, manifest = built
    truth = true_attributes(package_pairs["train"])
    samples = shards["captions-train"]
    derivation = manifest["captions"]
    assert len(samples) + derivation["images_skipped"] == 4000
    assert len(derivation["skipped_image_ids"]) == derivation["images_skipped"]
    captioned = {sample["json"]["image_id"] for sample in samples}
    assert not captioned & set(derivation["skipped_image_ids"])
    without_color = derivation["images_skipped"] + sum(sample["json"]["color"] is None for sample in samples)
    without_shape = derivation["images_skipped"] + sum(sample["json"]["shape"] is None for sample in samples)
    assert (without_color, without_shape) == (derivation["images_without_color"], derivation["images_without_shape"])
    # The derivation reaches far beyond the wh-answers: most images get both attributes.
    assert without_color < 400 and without_shape < 400

    checked = Counter()
    for sample in samples:
        meta = sample["json"]
        assert set(meta) == {"image_id", "conversations", "shape", "color"}
        human, gpt = meta["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith("<image>\n") and len(human["value"]) > len("<image>\n")
        caption_words = set(re.findall(r"[a-z]+", gpt["value"]))
        # The caption names exactly the known attributes, with the answer-vocabulary words.
        assert caption_words & COLORS == ({meta["color"]} if meta["color"] else set())
        assert caption_words & SHAPES == ({meta["shape"]} if meta["shape"] else set())
        assert meta["color"] or meta["shape"]
        for attribute in ("color", "shape"):
            expected = truth[meta["image_id"]].get(attribute)
            if expected is not None:
                assert meta[attribute] == expected, (meta["image_id"], attribute)
                checked[attribute] += 1
    assert checked["color"] > 2500 and checked["shape"] > 2500  # the cross-check covered most images
    assert len({sample["json"]["conversations"][1]["value"].split(" ")[0] for sample in samples}) > 1
    assert len({sample["json"]["conversations"][0]["value"] for sample in samples}) > 1


def test_derive_attributes_reads_negations_and_eliminations(recipe):
    def pairs(*items: tuple[str, str]) -> list:
        return [
            recipe.Pair(7, question, answer, recipe.question_type(question), recipe.answer_family(answer))
            for question, answer in items
        ]

    derive = recipe.derive_attributes
    assert derive(pairs(("is there not a red shape?", "no"), ("is a circle present?", "yes")))[7] == (
        recipe.Attributes(color="red", shape="circle")
    )
    assert derive(pairs(("is no blue shape present?", "yes"), ("is there a teal shape?", "no")))[7] == (
        recipe.Attributes(color=None, shape=None)
    )
    eliminated = pairs(("does the image not contain a circle?", "yes"), ("is there a triangle?", "no"))
    assert derive(eliminated)[7].shape == "rectangle"
    assert derive(pairs(("what is the yellow shape?", "triangle")))[7] == recipe.Attributes("yellow", "triangle")
    with pytest.raises(ValueError, match="contradictory"):
        derive(pairs(("what color is the shape?", "red"), ("is there a red shape?", "no")))


def test_tokenizer(built, package_pairs):
    out, manifest = built
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [tokenizer.token_to_id(token) for token in ("<pad>", "<s>", "</s>", "<image>")] == [0, 1, 2, 3]
    assert tokenizer.get_vocab_size() == manifest["tokenizer"]["vocab_size"] <= 512
    for text in (package_pairs["train"][0][1], package_pairs["test"][-1][1], "a teal triangle.", "USER: é?"):
        encoding = tokenizer.encode(text)
        assert 3 not in encoding.ids
        assert tokenizer.decode(encoding.ids) == text
    question = package_pairs["test"][0][1]
    encoding = tokenizer.encode(f"<image>\n{question}")
    assert encoding.ids[0] == 3
    assert tokenizer.decode(encoding.ids[1:]) == f"\n{question}"
    # Trained on the recipe text, whole words are single tokens.
    assert len(tokenizer.encode("what color is the shape?").ids) < len("what color is the shape?") // 3


def test_webdataset_reads_shards(built):
    out, manifest = built
    entry = manifest["splits"]["qa-test"]
    samples = list(webdataset.WebDataset(str(out / entry["files"][0]), shardshuffle=False))
    assert len(samples) == 250
    assert all({"png", "json"} <= set(sample) for sample in samples)
    meta = json.loads(samples[0]["json"])
    assert samples[0]["__key__"] == f"test_{meta['image_id']:05d}"
    assert samples[0]["png"].startswith(b"\x89PNG")


def test_rebuild_is_byte_identical(built, tmp_path):
    """A second build, in a fresh process with another hash seed, writes the very same bytes."""
    out, _ = built
    again = tmp_path / "easy_vqa"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    command = [sys.executable, str(SCRIPT), "--out", str(again), "--seed", str(SEED)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "qa-cp_test" in result.stdout  # the summary table

    def digests(directory: Path) -> dict[str, str]:
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}

    assert digests(again) == digests(out)
    assert sorted(os.listdir(tmp_path)) == ["easy_vqa"]  # no staging leftovers


def test_up_to_date_output_is_left_alone(recipe, built, capsys):
    out, manifest = built
    mtimes = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    assert recipe.build(out, seed=SEED, cp_major_fraction=MAJOR) == manifest
    assert "up to date" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == mtimes


def test_failed_build_leaves_nothing(recipe, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(recipe, "qa_samples", fail)  # after the caption shards are written
    with pytest.raises(RuntimeError, match="simulated crash"):
        recipe.build(tmp_path / "easy_vqa")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_foreign_directory(recipe, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        recipe.build(foreign, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_rejects_bad_parameters(recipe, tmp_path):
    for kwargs in ({"cp_major_fraction": 1.5}, {"images_per_shard": 0}, {"vocab_size": 100}):
        with pytest.raises(ValueError):
            recipe.build(tmp_path / "easy_vqa", **kwargs)
    assert list(tmp_path.iterdir()) == []
