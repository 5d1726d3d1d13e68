"""Checkpoints under ``<run_dir>/checkpoints``.

``<stage>/`` is written when a stage ends (the next stage starts from it, ``asymoe-train export`` reads it) and
``<stage>-step<NNNNNNN>/`` every ``checkpoint.every_steps`` and on SIGTERM/SIGUSR1. Each holds

* ``model.safetensors``: consolidated weights (no pickle), also under expert parallelism: the experts of every
  expert-parallel rank are gathered on rank 0, and loading gives each rank its own slice, for any ``ep_size``;
* ``optim_rank<r>.pt`` / ``rng_rank<r>.pt``: each rank's optimizer + lr-schedule state and RNG states, plain tensors
  and numbers loaded with ``torch.load(weights_only=True)``; ZeRO-0 optimizer files name the parameter of every
  state entry, so they reshard to another world size or ``ep_size`` (:func:`reshard_optimizer_state`);
* ``trainer_state.json``: stage, step, data position (logical stream -> shard draw, sample), W&B run id, the resolved
  config and its hash, and the parallel layout;
* ``COMPLETE``: the completion marker.

A checkpoint is written under ``.tmp-<name>`` and published by renaming it once every file and the marker are
there, so a kill at any moment leaves the last complete checkpoint intact; leftovers are ignored with a warning.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file

from asymoe_train.config.schema import ModelConfig, StageConfig
from asymoe_train.models.vlm import VisionLanguageModel, build_model

WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"
MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-"
# Fault injection for crash-safety tests: a process SIGKILLs itself inside the save of the checkpoint named here.
CRASH_ENV = "ASYMOE_CRASH_IN_SAVE"

log = logging.getLogger(__name__)


def stage_dir(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, "checkpoints", stage)


def expert_slices(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Weights of which this process holds a slice of experts (expert parallelism): name -> (first expert, experts
    held), the slice being rows of dim 0. Empty without expert parallelism."""
    dispatcher = getattr(model, "dispatcher", None)
    if dispatcher is None or dispatcher.ep_size == 1:
        return {}
    return {name: (dispatcher.ep_rank * len(p), len(p)) for name, p in model.expert_parameters().items()}


def _for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor once (tied weights share storage: one name is kept, as safetensors' ``save_model`` does), copied
    to CPU memory of its own (ZeRO-1/2 parameters are views into one flat buffer, which safetensors refuses)."""
    kept, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in seen:
            seen.add(key)
            kept[name] = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)
    return kept


def save_weights(model: torch.nn.Module, path: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's weights (or ``state``, a consolidated state dict of it) to ``path`` atomically: a crash
    never leaves a half-written file."""
    tmp = path + ".tmp"
    save_file(_for_saving(model.state_dict() if state is None else state), tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600; weights are shared like the run's other outputs
    os.replace(tmp, path)


def save_stage_weights(model: torch.nn.Module, run_dir: str, stage: str) -> str:
    """The consolidated weights of a finished stage, ``checkpoints/<stage>/model.safetensors``; returns the path."""
    directory = stage_dir(run_dir, stage)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS)
    save_weights(model, path)
    return path


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load consolidated weights strictly; under expert parallelism each rank reads only its experts' rows."""
    slices = expert_slices(model)
    if not slices:
        missing, unexpected = load_model(model, path, strict=True)
        assert not missing and not unexpected, (missing, unexpected)
        return
    state = {}
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            if name in slices:
                first, count = slices[name]
                state[name] = f.get_slice(name)[first : first + count]
            else:
                state[name] = f.get_tensor(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied weight is stored once, under one of its names
    storage = {name: t.untyped_storage().data_ptr() for name, t in model.state_dict().items()}
    loaded = {storage[name] for name in state if name in storage}
    missing = [name for name in missing if storage[name] not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def consolidated_state(model: torch.nn.Module, expert_parallel) -> dict[str, torch.Tensor] | None:
    """The model's state dict with every expert of every expert-parallel rank, on global rank 0 (None elsewhere,
    and without expert parallelism, where the model's own state dict is whole). Every rank calls this."""
    slices = expert_slices(model)
    if not slices:
        return None
    from asymoe_train.distributed.expert_parallel import gather_experts

    experts = model.expert_parameters()
    full = gather_experts({name: experts[name].detach() for name in slices}, expert_parallel)
    if not full:
        return None
    return {**model.state_dict(), **full}


def load_stage_weights(model: torch.nn.Module, run_dir: str, stage: str, directory: str | None = None) -> None:
    """Load a previous stage's consolidated weights (strict: the structures must match), from
    ``checkpoints/<stage>`` of ``run_dir`` or from ``directory``."""
    path = os.path.join(directory or stage_dir(run_dir, stage), WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage {stage!r} left no weights at {path}")
    load_weights(model, path)


def upcycled_after(stages: Mapping[str, StageConfig], stage: str) -> bool:
    """Whether the weights a stage saves are upcycled: that stage or an earlier one sets ``upcycle``."""
    names = list(stages)
    if stage not in names:
        raise ValueError(f"stage {stage!r} is not in curriculum.stages {names}")
    return any(s.upcycle for s in list(stages.values())[: names.index(stage) + 1])


def load_stage_model(model_cfg: ModelConfig, stages: Mapping[str, StageConfig], run_dir: str, stage: str,
                     vocab_size: int, pad_token_id: int, seed: int = 0, directory: str | None = None,
                     setup: Callable[[VisionLanguageModel], None] | None = None) -> VisionLanguageModel:
    """The model exactly as ``stage`` saved it: built from ``model_cfg``, upcycled if that stage or an earlier one
    upcycled, its weights loaded strictly from ``checkpoints/<stage>/model.safetensors``. ``setup`` prepares the
    dense model before upcycling (the trainer injects its dispatcher and block class there)."""
    model = build_model(model_cfg, vocab_size, pad_token_id, seed)
    if setup is not None:
        setup(model)
    if upcycled_after(stages, stage):
        model.upcycle()  # structure only: every upcycled tensor is overwritten by the stage's weights
    load_stage_weights(model, run_dir, stage, directory)
    return model


# ------------------------------------------------------------------------------------------------ resumable state
@dataclass
class TrainerState:
    """What a checkpoint records besides weights and optimizer state."""

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


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def checkpoint_name(stage: str, step: int, stage_done: bool) -> str:
    return stage if stage_done else f"{stage}-step{step:07d}"


def rng_state() -> dict:
    numpy = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (numpy[0], torch.from_numpy(numpy[1].copy()), *numpy[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DROP = object()


def _plain(value):
    """What ``torch.load(weights_only=True)`` reads back: tensors, numbers, strings and containers of them, enums as
    their values. DeepSpeed's ZeRO/bf16 optimizer states also hold its loss-scaler object (static in fp32 and bf16:
    nothing to restore) and fragment addresses (for its universal checkpoints); those entries are dropped."""
    if isinstance(value, dict):
        return {k: v for k, v in ((k, _plain(v)) for k, v in value.items()) if v is not _DROP}
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return _DROP if any(v is _DROP for v in items) else type(value)(items)
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, torch.Tensor | int | float | str | bool):
        return value
    return _DROP


def optimizer_param_names(optimizer, model: torch.nn.Module) -> list[str] | None:
    """The model's name of every parameter of a torch optimizer, in its state-dict order (None for DeepSpeed's
    ZeRO/bf16 optimizers, whose state holds flat partitions rather than parameters)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    return None if None in ordered else ordered


def save_checkpoint(engine, model: torch.nn.Module, run_dir: str, state: TrainerState, rank: int = 0,
                    world_size: int = 1, expert_parallel=None) -> str:
    """Write a complete checkpoint atomically (every rank calls this); returns its directory. With expert parallelism
    (``expert_parallel``, the model's layout) the weights file still holds every expert."""
    root = os.path.join(run_dir, "checkpoints")
    name = checkpoint_name(state.stage, state.step, state.stage_done)
    final, tmp = os.path.join(root, name), os.path.join(root, TMP_PREFIX + name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(world_size)
    torch.save({"optimizer": _plain(engine.optimizer.state_dict()), "lr_scheduler": engine.lr_scheduler.state_dict(),
                "param_names": optimizer_param_names(engine.optimizer, model)},
               os.path.join(tmp, f"optim_rank{rank}.pt"))
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    full = consolidated_state(model, expert_parallel)  # collective within the first expert-parallel group
    if rank == 0:
        save_weights(model, os.path.join(tmp, WEIGHTS), full)
        state.saved_at = time.time()
        with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as f:
            json.dump({**state.__dict__, "data_position": {str(k): list(v) for k, v in state.data_position.items()}},
                      f, indent=1)
    _barrier(world_size)
    if os.environ.get(CRASH_ENV) == name:  # fault injection: die with every file written but nothing published
        os.kill(os.getpid(), signal.SIGKILL)
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
        found.append((TrainerState.load(path), path))
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


def _stacked(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0  # exp_avg & co., not Adam's scalar step


def reshard_optimizer_state(saved: list[dict], optimizer, model: torch.nn.Module) -> dict:
    """This rank's optimizer state dict from a ZeRO-0 checkpoint of another layout.

    ``saved``: the optimizer files of ranks 0..S-1 of the checkpoint, S its expert-parallel size (one copy of every
    expert, in expert order; ZeRO-0 replicates everything else on every rank). The state of each parameter is found
    by name; an expert parameter's state is concatenated over those files, then this rank's experts are cut out.
    Parameter groups keep this optimizer's structure and take the checkpoint's hyper-parameters."""
    names = optimizer_param_names(optimizer, model)
    if names is None:
        raise ValueError("resharding optimizer state needs a torch optimizer over the model's parameters (ZeRO-0, "
                         "fp32); this engine's optimizer is DeepSpeed's")
    by_name = []
    for part in saved:
        if part.get("param_names") is None:
            raise ValueError("the checkpoint's optimizer files do not name their parameters (written by a "
                             "ZeRO-partitioned or bf16 optimizer, or an older version); it resumes on its own layout")
        states = part["optimizer"]["state"]
        by_name.append({n: states[i] for i, n in enumerate(part["param_names"]) if i in states})
    experts, slices = set(model.expert_parameters()), expert_slices(model)
    state = {}
    for index, name in enumerate(names):
        if name not in by_name[0]:
            continue  # no state yet (e.g. frozen when the checkpoint was written): starts fresh like a new param
        entry = by_name[0][name]
        if name in experts and len(by_name) > 1:
            entry = {k: torch.cat([part[name][k] for part in by_name]) if _stacked(v) else v for k, v in entry.items()}
        if name in slices:
            first, count = slices[name]
            entry = {k: v[first : first + count] if _stacked(v) else v for k, v in entry.items()}
        state[index] = entry
    hyper = [{k: v for k, v in g.items() if k not in ("params", "name", "moe")}
             for g in saved[0]["optimizer"]["param_groups"]]
    if any(h != hyper[0] for h in hyper):
        raise ValueError("the checkpoint's optimizer groups have different hyper-parameters; cannot regroup them")
    groups = [{**g, **hyper[0]} for g in optimizer.state_dict()["param_groups"]]
    return {"state": state, "param_groups": groups}


def reshard_scheduler_state(state: dict, num_groups: int) -> dict:
    """An lr-schedule state for ``num_groups`` optimizer groups (expert parallelism adds groups for experts); every
    group of the checkpoint must follow the same schedule."""
    state = dict(state)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        values = state.get(key)
        if isinstance(values, list) and len(values) != num_groups:
            if any(v != values[0] for v in values):
                raise ValueError(f"lr schedule {key}={values}: groups differ; cannot regroup them")
            state[key] = [values[0]] * num_groups
    return state


def load_checkpoint(engine, model: torch.nn.Module, directory: str, rank: int = 0, saved_layout: dict | None = None,
                    layout: dict | None = None) -> None:
    """Restore weights, this rank's optimizer, lr schedule and RNG states (no unpickling of code).

    On the layout that wrote it (``saved_layout == layout``) each rank reads its own files. A ZeRO-0 checkpoint also
    resumes on another world size or expert-parallel size: weights are consolidated, and the optimizer state is
    whole on every rank except for experts, which :func:`reshard_optimizer_state` regroups."""
    load_weights(model, os.path.join(directory, WEIGHTS))
    saved_layout, layout = saved_layout or {}, layout or {}
    optimizer, scheduler = engine.optimizer, engine.lr_scheduler
    if saved_layout == layout:
        path = os.path.join(directory, f"optim_rank{rank}.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no optimizer state for rank {rank}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.load_state_dict(saved["optimizer"])
        else:  # DeepSpeed's ZeRO/bf16 optimizers take every rank's state, indexed by data-parallel rank (= rank)
            states = [None] * layout.get("world_size", 1)
            states[rank] = saved["optimizer"]
            # fp32 master weights from the checkpoint, not from the (possibly lower precision) model
            optimizer.load_state_dict(states, load_from_fp32_weights=True)
        scheduler.load_state_dict(saved["lr_scheduler"])
    elif saved_layout.get("zero_stage", 0) == 0 and layout.get("zero_stage", 0) == 0:
        saved_ep = saved_layout.get("ep_size", 1)
        saved = [torch.load(os.path.join(directory, f"optim_rank{r}.pt"), map_location="cpu", weights_only=True)
                 for r in range(saved_ep)]
        if saved_ep == 1 and layout.get("ep_size", 1) == 1 and saved[0].get("param_names") is None:
            optimizer.load_state_dict(saved[0]["optimizer"])  # whole on every rank: rank 0's serves any world size
        else:
            optimizer.load_state_dict(reshard_optimizer_state(saved, optimizer, model))
        scheduler.load_state_dict(reshard_scheduler_state(saved[0]["lr_scheduler"], len(optimizer.param_groups)))
    else:
        raise ValueError(f"{directory} was written with layout {saved_layout}, this run has {layout}: ZeRO-partitioned "
                         "optimizer state only resumes on its own layout")
    rng = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.isfile(rng):  # a rank that did not exist when the checkpoint was written keeps its fresh seeds
        set_rng_state(torch.load(rng, weights_only=True))
