"""Convert LLaVA-format JSON plus an image folder into webdataset shards (LLaVA-Pretrain, LLaVA-Instruct, or any other).

Usage::

    python data_recipes/llava.py pretrain --root /datasets/LLaVA-Pretrain --out data/llava/lcs558k
    python data_recipes/llava.py instruct --root /datasets/llava_instruct --out data/llava/mix665k
    python data_recipes/llava.py convert --json my.json --images /datasets/my_images --prefix mine \\
        --out data/llava/mine
    common options: [--samples-per-shard 2000] [--workers 8] [--force]

Presets (one generic converter underneath):

    pretrain  LCS-558K: <root>/blip_laion_cc_sbu_558k.json, image paths relative to <root>/images; prefix lcs558k
    instruct  LLaVA-1.5 mix: <root>/llava_v1_5_mix665k.json, image paths relative to <root>, which holds the coco,
              gqa, ocr_vqa, textvqa and vg folders; text-only samples (no ``image``) are kept; prefix mix665k

Input: a JSON list of ``{"id", "image": <relative path> | [<path>, ...] | absent, "conversations": [{"from":
"human"|"gpt", "value": str}, ...]}`` (human first, alternating; ``<image>`` placeholders in human turns).

Output in ``--out``::

    <prefix>-000000.tar ...   <key>.jpg|png|webp  the first image's bytes, copied verbatim (other formats, e.g. the
                                                  GIFs among OCR-VQA downloads, are re-encoded losslessly to PNG)
                              <key>.<n>.<ext>     image n >= 1 of a multi-image sample
                              <key>.json          the JSON record, verbatim
    manifest.json             parameters (with the input JSON's sha256), counts (written, with image, text-only,
                              multi-image), skipped samples by reason with examples, per-folder counts, shard files

Keys are ``<prefix>_<index in the JSON:09d>``, so a key names its record whatever else was skipped. Skipped and
counted, never fatal: a record that is not a well-formed conversation (``bad_record``), ``<image>`` in a sample
without images (``placeholder_without_image``), an image file that does not exist (``missing_image``; a file with the
same stem and another image suffix is taken instead, counted as ``extension_fallbacks``) or does not decode
(``unreadable_image``: every image is fully decoded once). Multi-image samples are written as they are; the training
pipeline skips those with more images than the model takes, counting them.

The build is deterministic (records in JSON order, fixed-size shards, tar headers with mtime 0: same input, same
bytes, whatever ``--workers``) and idempotent (an output built from the same parameters and JSON is left alone unless
``--force``; changed image files need ``--force``). It is written into a temporary directory next to ``--out`` and
renamed into place at the end, so an interrupted build never leaves a dataset that looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import recipe_common  # data_recipes/recipe_common.py (see its docstring for how it is found)
from PIL import Image
from tqdm import tqdm

RECIPE = "llava"
# Bump when the output format or content changes, so that existing outputs stop counting as up to date.
RECIPE_VERSION = 1

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt")
# Formats the training pipeline decodes, stored verbatim under these extensions; anything else becomes PNG.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
FALLBACK_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
SKIP_REASONS = ("bad_record", "placeholder_without_image", "missing_image", "unreadable_image")
EXAMPLES_PER_REASON = 20
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+$")  # webdataset splits member names at the first dot: keys hold none
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Preset:
    """Where a published LLaVA data set keeps its JSON and images, relative to its ``--root``."""

    json: str
    images: str
    prefix: str
    folders: tuple[str, ...] = ()  # image folders expected under ``images``; samples are counted per folder


PRESETS = {
    "pretrain": Preset(json="blip_laion_cc_sbu_558k.json", images="images", prefix="lcs558k"),
    "instruct": Preset(
        json="llava_v1_5_mix665k.json", images=".", prefix="mix665k",
        folders=("coco", "gqa", "ocr_vqa", "textvqa", "vg"),
    ),
}


class Skip(Exception):
    """A record that is left out, with the manifest's reason and a detail for the examples."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    ext: str
    reencoded: bool
    fallback: bool


@dataclass
class Converted:
    """One record's outcome: the sample to write, or why it was skipped."""

    index: int
    record_id: str
    sample: dict[str, Any] | None = None
    skip: Skip | None = None
    images: list[StoredImage] = field(default_factory=list)
    folder: str = ""


def image_paths(record: Any) -> list[str]:
    """The record's image paths (empty: text-only); raises Skip unless it is a well-formed conversation."""
    if not isinstance(record, dict):
        raise Skip("bad_record", f"a {type(record).__name__}, not an object")
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages or len(messages) % 2:
        raise Skip("bad_record", "conversations is not a non-empty list of human/gpt pairs")
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("from") != ROLES[n % 2]:
            raise Skip("bad_record", f"message {n} is not from {ROLES[n % 2]!r}")
        if not isinstance(message.get("value"), str):
            raise Skip("bad_record", f"message {n} has no text value")
    images = record.get("image")
    if images is None or images == "":
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(path, str) and path for path in images):
        raise Skip("bad_record", f"image={record.get('image')!r} is not a path or a list of paths")
    if not images and any(IMAGE_PLACEHOLDER in message["value"] for message in messages):
        raise Skip("placeholder_without_image", f"{IMAGE_PLACEHOLDER} in a sample without an image")
    return images


def read_image(image_root: Path, relative: str) -> StoredImage:
    """The image's bytes as stored in the shard; raises Skip if it is missing or does not decode."""
    path = image_root / relative.lstrip("/")
    fallback = False
    if not path.is_file():
        found = next((c for c in (path.with_suffix(s) for s in FALLBACK_SUFFIXES) if c != path and c.is_file()), None)
        if found is None:
            raise Skip("missing_image", relative)
        path, fallback = found, True
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: truncated files pass a header check
            if img.format in STORED_FORMATS:
                return StoredImage(data, STORED_FORMATS[img.format], False, fallback)
            buffer = io.BytesIO()
            img.convert("RGB").save(buffer, format="PNG")  # first frame of animations
            return StoredImage(buffer.getvalue(), "png", True, fallback)
    except Exception as exn:  # PIL raises many types for corrupt or unsupported files
        # The message may name the in-memory buffer by address: dropped, so manifests stay reproducible.
        raise Skip("unreadable_image", f"{relative}: {_ADDRESS.sub('<data>', str(exn))}") from exn


def convert(index: int, record: Any, image_root: Path, prefix: str, folders: bool) -> Converted:
    """The shard sample of one record (or why it is skipped)."""
    record_id = str(record.get("id", "")) if isinstance(record, dict) else ""
    try:
        paths = image_paths(record)
        images = [read_image(image_root, path) for path in paths]
    except Skip as skip:
        return Converted(index, record_id, skip=skip)
    sample: dict[str, Any] = {"__key__": f"{prefix}_{index:09d}"}
    for n, image in enumerate(images):
        sample[image.ext if n == 0 else f"{n}.{image.ext}"] = image.data
    sample["json"] = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    folder = ""
    if folders:  # the top folder of the first image (coco, gqa, ...)
        folder = "text-only" if not paths else Path(paths[0]).parts[0] if len(Path(paths[0]).parts) > 1 else "."
    return Converted(index, record_id, sample=sample, images=images, folder=folder)


def _chunks(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _build_into(out_dir: Path, records: list[Any], image_root: Path, params: dict[str, Any], workers: int,
                folders: bool) -> dict[str, Any]:
    """Write the shards and manifest of ``records`` into the (empty) ``out_dir``."""
    prefix = params["prefix"]
    counts = Counter({"records": len(records)})
    skipped = Counter({reason: 0 for reason in SKIP_REASONS})
    examples: dict[str, list[dict[str, Any]]] = {}
    by_folder: Counter[str] = Counter()
    sink = recipe_common.ShardSink(out_dir, prefix, params["samples_per_shard"])
    progress = tqdm(total=len(records), desc=f"[{RECIPE}] {prefix}", unit="sample", mininterval=1.0,
                    dynamic_ncols=True, file=sys.stderr)
    # Images are read and decoded by a thread pool (PIL releases the GIL while decoding), in bounded ordered
    # chunks, so the output does not depend on the number of workers.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start, chunk in _chunks(records, 64 * max(1, workers)):
            indices = range(start, start + len(chunk))
            results = pool.map(lambda n, r: convert(n, r, image_root, prefix, folders), indices, chunk)
            for result in results:
                if result.skip is not None:
                    skipped[result.skip.reason] += 1
                    shown = examples.setdefault(result.skip.reason, [])
                    if len(shown) < EXAMPLES_PER_REASON:
                        shown.append({"index": result.index, "id": result.record_id, "detail": result.skip.detail})
                    continue
                sink.write(result.sample)
                counts["written"] += 1
                counts["with_image" if result.images else "text_only"] += 1
                counts["multi_image"] += int(len(result.images) > 1)
                counts["reencoded_images"] += sum(image.reencoded for image in result.images)
                counts["extension_fallbacks"] += sum(image.fallback for image in result.images)
                if folders:
                    by_folder[result.folder] += 1
            progress.update(len(chunk))
            progress.set_postfix(written=counts["written"], skipped=sum(skipped.values()), refresh=False)
    sink.close()
    progress.close()
    if not counts["written"]:
        raise ValueError(f"no sample was written from {params['json']}: skipped {dict(skipped)}, e.g. "
                         f"{next(iter(examples.values()), [])[:3]}; check the JSON and --images/--root")
    keys = ("records", "written", "with_image", "text_only", "multi_image", "reencoded_images", "extension_fallbacks")
    manifest = {
        "recipe": RECIPE,
        "params": params,
        "counts": {key: counts[key] for key in keys},
        "skipped": dict(skipped),
        "skipped_examples": {reason: examples[reason] for reason in SKIP_REASONS if reason in examples},
        "shards": sink.shards,
    }
    if folders:
        manifest["by_folder"] = dict(sorted(by_folder.items()))
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _files(manifest: dict[str, Any]) -> list[str]:
    """The files a complete build holds, besides the manifest."""
    return [shard["file"] for shard in manifest["shards"]]


def check_params(prefix: str, samples_per_shard: int) -> None:
    """Reject parameters that cannot give a usable shard set."""
    if not _PREFIX.match(prefix):
        raise ValueError(f"prefix={prefix!r} must be letters, digits, '_' or '-' (shard keys cannot hold dots)")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")


def build(
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    prefix: str,
    samples_per_shard: int = 2000,
    *,
    workers: int = 1,
    preset: str = "convert",
    force: bool = False,
) -> dict[str, Any]:
    """Convert the LLaVA JSON at ``json_path`` (image paths relative to ``image_root``) into shards in ``out_dir``,
    unless it is already up to date, and return the manifest."""
    check_params(prefix, samples_per_shard)
    source = Path(json_path).resolve()
    images = Path(image_root).resolve()
    out = Path(out_dir).resolve()
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such JSON file")
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such image folder")
    raw = source.read_bytes()
    params = {
        "recipe_version": RECIPE_VERSION,
        "preset": preset,
        "json": str(source),
        "json_sha256": hashlib.sha256(raw).hexdigest(),
        "images": str(images),
        "prefix": prefix,
        "samples_per_shard": samples_per_shard,
    }
    existing = recipe_common.existing_build(out, RECIPE, params, _files, force, f"a {RECIPE} shard set")
    if existing is not None:
        return existing
    records = json.loads(raw)
    del raw
    if not isinstance(records, list):
        raise ValueError(f"{source} holds a {type(records).__name__}; expected a JSON list of LLaVA records")
    folders = PRESETS[preset].folders if preset in PRESETS else ()
    missing = [folder for folder in folders if not (images / folder).is_dir()]
    if missing:
        print(f"[{RECIPE}] warning: no {missing} folder(s) under {images}; their samples will count as missing_image",
              file=sys.stderr)

    started = time.perf_counter()
    manifest = recipe_common.build_atomically(
        out, lambda staging: _build_into(staging, records, images, params, workers, bool(folders)))
    _print_summary(out, manifest, time.perf_counter() - started)
    return manifest


def _print_summary(out: Path, manifest: dict[str, Any], seconds: float) -> None:
    counts, skipped = manifest["counts"], manifest["skipped"]
    print(f"[{RECIPE}] {counts['records']} records -> {counts['written']} samples in {len(manifest['shards'])} shards "
          f"(with image {counts['with_image']}, text-only {counts['text_only']}, multi-image {counts['multi_image']}; "
          f"images re-encoded to PNG {counts['reencoded_images']}, found under another suffix "
          f"{counts['extension_fallbacks']})")
    print(f"[{RECIPE}] skipped {sum(skipped.values())}: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    for reason, shown in manifest["skipped_examples"].items():
        print(f"[{RECIPE}]   e.g. {reason}: " + "; ".join(f"#{e['index']} {e['detail']}" for e in shown[:3]))
    if "by_folder" in manifest:
        print(f"[{RECIPE}] per folder: " + ", ".join(f"{k} {v}" for k, v in manifest["by_folder"].items()))
    print(f"[{RECIPE}] shards: {out}/{manifest['params']['prefix']}-*.tar; "
          f"data.source_sizes.<source>: {counts['written']}")
    print(f"built {out} in {seconds:.1f}s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, preset in PRESETS.items():
        where = "<root>" if preset.images == "." else f"<root>/{preset.images}"
        sub = commands.add_parser(name, help=f"{preset.json} with image paths relative to {where}")
        sub.add_argument("--root", required=True, help=f"folder holding {preset.json}")
        sub.add_argument("--prefix", default=preset.prefix, help="shard file and key prefix")
    sub = commands.add_parser("convert", help="any LLaVA-format JSON with its image folder")
    sub.add_argument("--json", required=True, help="the LLaVA-format JSON list")
    sub.add_argument("--images", help="folder the image paths are relative to (default: the JSON's folder)")
    sub.add_argument("--prefix", required=True, help="shard file and key prefix, e.g. mine")
    for sub in commands.choices.values():
        sub.add_argument("--out", required=True, help="output folder, e.g. data/llava/<prefix>")
        sub.add_argument("--samples-per-shard", type=int, default=2000,
                         help="samples per shard (with data.resampled=false every stream needs a shard)")
        sub.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="image-reading threads")
        sub.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    args = parser.parse_args(argv)
    try:
        check_params(args.prefix, args.samples_per_shard)
    except ValueError as error:
        parser.error(str(error))
    if args.command in PRESETS:
        preset = PRESETS[args.command]
        json_path, image_root = Path(args.root) / preset.json, Path(args.root) / preset.images
    else:
        json_path = Path(args.json)
        image_root = Path(args.images) if args.images else json_path.parent
    build(json_path, image_root, args.out, args.prefix, args.samples_per_shard, workers=args.workers,
          preset=args.command, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
