"""The checkpoint store: naming, the trainer state file, atomic publishing, finding and pruning.

A checkpoint is written under ``.tmp-<name>`` and published by renaming it once every file, its ``manifest.json``
(every file's SHA-256, :mod:`asymoe_train.checkpoint.integrity`) and the ``COMPLETE`` marker are there, so a kill at
any moment leaves the last complete checkpoint intact; leftovers are ignored with a warning and removed by the next
prune, and a save that fails (a full disk) removes its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from asymoe_train.checkpoint.integrity import write_manifest
from asymoe_train.config.errors import SaveError

STATE = "trainer_state.json"
MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-"
# Fault injection for crash-safety tests: a process SIGKILLs itself inside the save of the checkpoint named here.
CRASH_ENV = "ASYMOE_CRASH_IN_SAVE"

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """``trainer_state.json``: what a checkpoint records besides weights, optimizer and RNG states. The trainer
    assembles it from the state dicts of its components (progress, data streams, logger)."""

    stage: str
    stage_index: int
    step: int  # optimizer steps done in this stage
    global_step: int
    stage_done: bool
    # logical stream -> (shard draw, samples taken from it, samples in all); see asymoe_train.data.pipeline.StreamSpec
    data_position: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    wandb_id: str = ""
    config: str = ""  # resolved config (YAML)
    config_hash: str = ""
    layout: dict = field(default_factory=dict)  # world_size, ep_size, zero_stage, precision
    saved_at: float = 0.0

    @classmethod
    def load(cls, directory: str) -> TrainerState:
        with open(os.path.join(directory, STATE), encoding="utf-8") as f:
            raw = json.load(f)
        raw["data_position"] = {int(k): tuple(v) for k, v in raw["data_position"].items()}
        return cls(**raw)

    def save(self, directory: str) -> None:
        self.saved_at = time.time()
        with open(os.path.join(directory, STATE), "w", encoding="utf-8") as f:
            json.dump({**self.__dict__, "data_position": {str(k): list(v) for k, v in self.data_position.items()}},
                      f, indent=1)


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def checkpoint_name(stage: str, step: int, stage_done: bool) -> str:
    return stage if stage_done else f"{stage}-step{step:07d}"


def is_complete(directory: str) -> bool:
    """Whether ``directory`` is a published checkpoint (its marker and trainer state are there)."""
    return os.path.isfile(os.path.join(directory, MARKER)) and os.path.isfile(os.path.join(directory, STATE))


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _any_rank(failed: bool, world_size: int) -> bool:
    """Whether any rank failed (a collective that replaces a barrier, so no rank waits for one that gave up)."""
    if world_size == 1:
        return failed
    flag = torch.tensor([int(failed)], dtype=torch.int64)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def publish(run_dir: str, name: str, write: Callable[[str], None], rank: int = 0, world_size: int = 1) -> str:
    """Write checkpoint ``name`` atomically: every rank calls ``write(directory)`` into a temporary directory, which
    gets a manifest of every file's SHA-256 and is marked complete and renamed into place by rank 0 once all ranks
    are done; returns the published directory. If writing fails on any rank (a full disk, say), the temporary
    directory is removed and :class:`SaveError` names the checkpoint and the cause; the last complete checkpoint is
    untouched."""
    root = os.path.join(run_dir, "checkpoints")
    final, tmp = os.path.join(root, name), os.path.join(root, TMP_PREFIX + name)
    error: BaseException | None = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier(world_size)
        write(tmp)
    except Exception as exn:  # torch.save reports a full disk as RuntimeError, safetensors as its own error
        error = exn
    except BaseException:  # KeyboardInterrupt: no half-written directory stays behind
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _any_rank(error is not None, world_size):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(final, tmp, error or RuntimeError("another rank failed to write its files"))
    if os.environ.get(CRASH_ENV) == name:  # fault injection: die with every file written but nothing published
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        write_manifest(tmp, rank, world_size, skip=(MARKER,))
    except OSError as exn:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(final, tmp, exn) from None
    if rank == 0:
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            f.write(f"{world_size} ranks\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.isdir(final):  # a stage end written again after a resume: swap, then drop the old copy
            old = os.path.join(root, TMP_PREFIX + "old-" + name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    _barrier(world_size)
    return final


def save_error(final: str, tmp: str, exn: BaseException) -> SaveError:
    """The one-line error of a failed save: the checkpoint, the cause, the space left, what to do."""
    root = os.path.dirname(final)
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    cause = f"{type(exn).__name__}: {exn}".replace("\n", " ")
    return SaveError(f"could not save checkpoint {final} ({cause}; {free}); its partial copy {tmp} was removed and "
                     f"the checkpoints before it are intact. Free disk space under {root} (or move the run with "
                     "hydra.run.dir) and continue with resume=auto")


def complete_checkpoints(run_dir: str) -> list[tuple[TrainerState, str]]:
    """Complete checkpoints of a run, oldest first; incomplete ones are skipped with a warning."""
    root = os.path.join(run_dir, "checkpoints")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if name.startswith(TMP_PREFIX) or not os.path.isfile(os.path.join(path, MARKER)):
            log.warning("ignoring incomplete checkpoint %s (a save was interrupted)", path)
            continue
        try:
            found.append((TrainerState.load(path), path))
        except (OSError, ValueError, KeyError, TypeError) as exn:
            log.warning("ignoring checkpoint %s: its %s is unreadable (%s)", path, STATE, exn)
    return sorted(found, key=lambda item: (item[0].stage_index, item[0].step, item[0].stage_done))


def prune_checkpoints(run_dir: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` mid-stage checkpoints (stage ends stay); remove interrupted leftovers."""
    root = os.path.join(run_dir, "checkpoints")
    mid = [path for state, path in complete_checkpoints(run_dir) if not state.stage_done]
    for path in mid[: max(0, len(mid) - keep_last)]:
        shutil.rmtree(path)
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
