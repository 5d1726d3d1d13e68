"""Checksums of checkpoint and export directories: ``manifest.json`` holds every file's size and SHA-256.

A checkpoint's manifest is written after all of its files and before its ``COMPLETE`` marker; an export's after its
files. Whoever reads a directory back (``resume``, ``init_from``, the next stage, ``export``, ``load_pretrained``)
checks the files it reads against it, so a truncated or silently corrupted file (same size, other bytes) is named
instead of loaded. Directories written before manifests existed load with a warning that they are unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from asymoe_train.config.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 1 << 22  # bytes hashed per read

log = logging.getLogger(__name__)


def digest(path: str) -> dict:
    """Size and SHA-256 of one file."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
            size += len(block)
    return {"bytes": size, "sha256": sha.hexdigest()}


def listed_files(directory: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Every regular file under ``directory``, as sorted relative paths, except the manifest and ``skip``."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST and rel not in skip:
                found.append(rel)
    return sorted(found)


def _gather(part: dict, world_size: int) -> dict:
    """Merge a dict over all ranks (a collective when ``world_size`` > 1)."""
    if world_size == 1:
        return part
    parts: list = [None] * world_size
    torch.distributed.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def write_manifest(directory: str, rank: int = 0, world_size: int = 1, skip: tuple[str, ...] = ()) -> None:
    """Hash every file of ``directory`` (each rank a share of them; a collective with several ranks) and write
    ``manifest.json`` there (rank 0)."""
    names = listed_files(directory, skip)
    files = _gather({name: digest(os.path.join(directory, name)) for name in names[rank::world_size]}, world_size)
    if rank == 0:
        with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "algorithm": "sha256", "files": dict(sorted(files.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def read_manifest(directory: str) -> dict[str, dict] | None:
    """``files`` of a directory's manifest, None when it has none; raises :class:`CheckpointError` if unreadable."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise CheckpointError(f"{path} is unreadable ({exn}), so {directory} cannot be verified") from None
    return files


def problems(directory: str, names: list[str] | None = None, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with ``directory`` against its manifest: ``names`` (default: every file it lists), each rank
    checking a share (a collective with several ranks). Each problem names the file. A directory without a manifest
    has none (it is unverified: see :func:`verify`)."""
    try:
        files = read_manifest(directory)
    except CheckpointError as exn:
        return [str(exn)]
    if files is None:
        return []
    names = sorted(files) if names is None else sorted(names)
    found = {}
    for name in names[rank::world_size]:
        path = os.path.join(directory, name)
        expected = files.get(name)
        if expected is None:
            found[name] = f"{path} is not listed in {MANIFEST}"
        elif not os.path.isfile(path):
            found[name] = f"{path} is missing"
        else:
            actual = digest(path)
            if actual["bytes"] != expected["bytes"]:
                found[name] = (f"{path} has {actual['bytes']} bytes, {MANIFEST} says {expected['bytes']} "
                               f"({'truncated' if actual['bytes'] < expected['bytes'] else 'grown'})")
            elif actual["sha256"] != expected["sha256"]:
                found[name] = f"{path} does not match its SHA-256 in {MANIFEST} (corrupted: same size, other bytes)"
    found = _gather(found, world_size)
    return [found[name] for name in sorted(found)]


def verify(directory: str, names: list[str] | None = None, fix: str = "", rank: int = 0,
           world_size: int = 1) -> None:
    """Raise :class:`CheckpointError` naming the first bad file of ``directory`` (and ``fix``); warn when the
    directory has no manifest (written before checksums existed)."""
    found = problems(directory, names, rank, world_size)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CheckpointError(f"{found[0]}{more}; {fix or 'restore it, or write it again'}")
    if rank == 0 and not os.path.isfile(os.path.join(directory, MANIFEST)):
        log.warning("%s has no %s (written by an older version): its files are not verified", directory, MANIFEST)
