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
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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
