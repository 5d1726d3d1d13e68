"""Reading shards with honest accounting: a truncated or unreadable shard counts the samples it should have held.

webdataset reports a damaged tar once (one exception) however many samples it cut off. :class:`ShardReader` counts
what each shard gave and, when the shard ended in an error, charges the difference to ``unreadable_shard``: the
shard's sample count from the ``manifest.json`` beside it (what data_recipes/ write: ``{"file", "samples"}`` per
shard, under ``shards`` or a split's ``shard_samples``), else an estimate, stated as such in the warning: the mean of
the shard set's samples per shard from that manifest, or the mean of the shards this reader has read whole.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from functools import lru_cache

import webdataset as wds

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
UNREADABLE = "unreadable_shard"

# (samples the shard holds, how that is known: "manifest" = exact, anything else describes an estimate)
Expected = tuple[int, str]


@lru_cache(maxsize=64)
def _manifest_counts(directory: str) -> tuple[dict[str, int], dict[str, float]]:
    """(file -> samples, file -> mean samples per shard of its set) from ``directory/manifest.json``; empty if none."""
    exact: dict[str, int] = {}
    mean: dict[str, float] = {}
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return exact, mean
    if not isinstance(manifest, dict):
        return exact, mean
    entries = [manifest, *(v for v in (manifest.get("splits") or {}).values() if isinstance(v, dict))]
    for entry in entries:
        for key in ("shards", "shard_samples"):
            listed = entry.get(key)
            if isinstance(listed, list):
                for shard in listed:
                    if isinstance(shard, dict) and isinstance(shard.get("samples"), int):
                        exact[str(shard.get("file"))] = shard["samples"]
        files = entry.get("files")
        total = entry.get("samples", entry.get("images"))
        if isinstance(files, list) and files and isinstance(total, int):
            for name in files:
                mean[str(name)] = total / len(files)
    return exact, mean


def manifest_samples(url: str) -> Expected | None:
    """The samples a local shard holds according to the manifest beside it, or its set's mean (an estimate)."""
    if "://" in url or url.startswith("pipe:"):
        return None
    exact, mean = _manifest_counts(os.path.dirname(os.path.abspath(url)))
    name = os.path.basename(url)
    if name in exact:
        return exact[name], "manifest"
    if name in mean:
        return round(mean[name]), "estimated from the mean shard size in manifest.json"
    return None


class ShardReader:
    """Reads shards sample by sample; ``count(reason, n)`` receives the samples lost to damaged shards."""

    def __init__(self, count: Callable[[str, int], None]):
        self.count = count
        self.whole: list[int] = []  # samples of every shard read to its end without an error

    def expected(self, url: str, read: int) -> Expected:
        known = manifest_samples(url)
        if known is not None:
            return known
        if self.whole:
            return (round(sum(self.whole) / len(self.whole)),
                    f"estimated from the mean of {len(self.whole)} complete shards of this stream")
        return read + 1, "at least one more than it gave; no shard size is known yet (no manifest.json)"

    def samples(self, url: str) -> Iterator[dict]:
        """The samples of one shard, in file order; a read error ends the shard and its missing samples are counted."""
        errors: list[Exception] = []

        def on_error(exn: Exception) -> bool:
            errors.append(exn)
            return True

        read = 0
        for sample in wds.tarfile_to_samples(handler=on_error)([{"url": url}]):
            read += 1
            yield sample
        if not errors:
            self.whole.append(read)
            return
        expected, how = self.expected(url, read)
        lost = max(1, expected - read)
        self.count(UNREADABLE, lost)
        log.warning("shard %s is unreadable after %d samples (%s: %s); counting %d samples as %s (its size, %d, %s)",
                    url, read, type(errors[0]).__name__, errors[0], lost, UNREADABLE, expected,
                    "from manifest.json" if how == "manifest" else how)

    def urls(self, urls) -> Iterator[dict]:
        """The samples of every shard in ``urls``, one shard after another."""
        for url in urls:
            yield from self.samples(url)
