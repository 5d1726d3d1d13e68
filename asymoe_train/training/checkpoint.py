"""Checkpoints under ``<run_dir>/checkpoints``.

``<stage>/`` is written when a stage ends (the next stage starts from it, ``asymoe-train export`` reads it) and
``<stage>-step<NNNNNNN>/`` every ``checkpoint.every_steps`` and on SIGTERM/SIGUSR1. Each holds

* ``model.safetensors``: consolidated weights (no pickle), also under expert parallelism: the experts of every
  expert-parallel rank are gathered on rank 0, and loading gives each rank its own slice, for any ``ep_size``;
* ``optim_rank<r>.pt`` / ``rng_rank<r>.pt``: each rank's optimizer + lr-schedule state and RNG states, plain tensors
  and numbers loaded with ``torch.load(weights_only=True)``; ZeRO-0 fp32 optimizer files name the parameter of every
  state entry;
* ``optim_by_name_rank<r>.safetensors`` (DeepSpeed's optimizers: ZeRO-1/2, bf16): each rank's fragments of every
  parameter's fp32 master weights and optimizer state, addressed by parameter name. With either, a checkpoint
  resumes on another world size, ``ep_size``, ZeRO stage or precision (:func:`load_checkpoint`);
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
from safetensors.torch import save_file

from asymoe_train.config.schema import ModelConfig, StageConfig
from asymoe_train.models.vlm import VisionLanguageModel, build_model

WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"
BY_NAME = "optim_by_name_rank{rank}.safetensors"  # optimizer state by parameter name, see below
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
    """Load consolidated weights strictly; under expert parallelism each rank reads only its experts' rows. (Not
    safetensors' ``load_model``: it refuses parameters that are views into one flat buffer, as ZeRO-1/2 makes them.)"""
    slices = expert_slices(model)
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
    tensors = {name: (t.data_ptr(), tuple(t.shape), t.stride()) for name, t in model.state_dict().items()}
    loaded = {tensors[name] for name in state if name in tensors}
    missing = [name for name in missing if tensors[name] not in loaded]
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
    by_name = optimizer_fragments(engine.optimizer, model)  # DeepSpeed's optimizers: for other layouts
    if by_name is not None:
        save_file(by_name[0], os.path.join(tmp, BY_NAME.format(rank=rank)), metadata=by_name[1])
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


# ------------------------------------------------------------------------------------ optimizer state by parameter
# What lets a checkpoint resume on another layout (world size, ep_size, ZeRO stage, precision): each parameter's fp32
# master weights, optimizer state (Adam's moments) and step, found by the parameter's name, whatever optimizer wrote or
# reads them. A torch optimizer (ZeRO-0, fp32) holds whole parameters and its files name them. DeepSpeed's optimizers
# also write ``optim_by_name_rank<r>.safetensors``: ZeRO-1/2 hold fragments of flat fp32 partitions (each parameter
# cut at partition borders), bf16 with ZeRO-0 whole fp32 master copies; each rank writes the fragments it holds with
# where they lie in the whole parameter (every expert), so a save needs no collective and no gathering on one rank.
# Loading assembles the rows this rank's parameters need from every rank's file.
#
# Tensors of an ``optim_by_name`` file: ``<key>/<parameter name>``, 1-d fp32 fragments, key ``fp32`` (master
# weights) or an optimizer state key (``exp_avg``, ``exp_avg_sq``). Metadata: ``params`` (JSON: name -> shape of the
# whole parameter, start of the fragment in it flattened, step, keys) and ``param_groups`` (JSON: hyper-parameters).

def _holds_fragments(optimizer) -> bool:
    """DeepSpeed's ZeRO-1/2 optimizer (also its bf16 optimizer): parameters linked to fragments of flat partitions."""
    return hasattr(optimizer, "bit16_groups") or hasattr(optimizer, "bf16_groups")


def _holds_master_copies(optimizer) -> bool:
    """DeepSpeed's bf16 optimizer without ZeRO (``FP16_UnfusedOptimizer``): a whole fp32 copy of every parameter."""
    return hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups")


def link_optimizer_state(optimizer, model: torch.nn.Module) -> dict[int, list[tuple[str, torch.nn.Parameter]]]:
    """ZeRO-1/2: point every parameter's fragment (``_hp_mapping``) at its optimizer group's state; returns, per group,
    the parameters with a fragment on this rank. DeepSpeed 0.19 links them once, inside the step of group 0 only
    (``_optimizer_step`` restricts the groups to one, then ``_lazy_init_hp_params_optimizer_state`` marks all linked),
    so the state of every later group (the experts' under expert parallelism) stays out of reach of
    ``safe_get_full_optimizer_state`` & co.; linking again is harmless (views of the same tensors)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    linked: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if getattr(param, "_hp_mapping", None) is not None:
            linked.setdefault(param._hp_mapping.param_group_index, []).append((name, param))
    base = optimizer.optimizer
    for index, params in linked.items():
        flat = base.param_groups[index]["params"][0]
        if base.state.get(flat):
            lazy_init_hp_params_optimizer_state([p for _, p in params], flat, base.state)
    return linked


def _hyper_parameters(groups: list[dict]) -> dict:
    """The hyper-parameters (lr of the step a checkpoint stopped at, betas, ...) shared by all optimizer groups."""
    hyper = [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items() if k not in ("params", "name", "moe")}
             for g in groups]
    if any(h != hyper[0] for h in hyper):
        raise ValueError("the checkpoint's optimizer groups have different hyper-parameters; cannot regroup them")
    return hyper[0]


def optimizer_fragments(optimizer, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """This rank's share of every parameter's fp32 master weights and optimizer state, by parameter name: the
    tensors and metadata of ``optim_by_name_rank<r>.safetensors`` (section comment above). None for a torch optimizer,
    whose own files name their parameters."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return None
    base = optimizer.optimizer
    held = []  # (name, parameter, start in the parameter as this rank holds it, {key: 1-d fragment}, step)
    if _holds_fragments(optimizer):
        linked = link_optimizer_state(optimizer, model)
        for name, param in (item for params in linked.values() for item in params):
            mapping = param._hp_mapping
            state = base.state.get(base.param_groups[mapping.param_group_index]["params"][0], {})
            keys = mapping.get_optim_state_keys() if mapping.optim_fragment else []  # empty before the first step
            held.append((name, param, mapping.lp_fragment_address.start,
                         {"fp32": mapping.get_hp_fragment(), **{k: mapping.get_hp_fragment(k) for k in keys}},
                         state.get("step")))
    elif _holds_master_copies(optimizer):
        names = {id(p): n for n, p in model.named_parameters()}
        for params, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for param, master in zip(params, masters):
                state = base.state.get(master, {})
                moments = {k: v.flatten() for k, v in state.items() if _stacked(v) and v.shape == master.shape}
                held.append((names[id(param)], param, 0, {"fp32": master.flatten(), **moments}, state.get("step")))
    else:
        log.warning("%s: optimizer state not saved by parameter name; this checkpoint resumes on its own layout only",
                    type(optimizer).__name__)
        return None
    slices = expert_slices(model)
    tensors, index = {}, {}
    for name, param, start, fragments, step in held:
        shape = list(param.shape)
        if name in slices:  # this rank holds rows [first, first + count) of the experts' dim 0
            first, count = slices[name]
            start += first * (param.numel() // count)
            shape[0] = count * model.dispatcher.ep_size
        for key, fragment in fragments.items():
            tensors[f"{key}/{name}"] = fragment.detach().to("cpu", torch.float32).clone()  # own storage: safetensors
        index[name] = {"shape": shape, "start": start, "step": None if step is None else float(step),
                       "keys": list(fragments)}
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    return tensors, {"params": json.dumps(index), "param_groups": json.dumps(hyper, default=float)}


def _wanted(model: torch.nn.Module, names: list[str]) -> dict[str, tuple[int, int, list[int]]]:
    """name -> (lo, hi, shape): the part [lo, hi) of the whole flattened parameter (every expert) that this rank holds,
    and the whole parameter's shape."""
    params, slices = dict(model.named_parameters()), expert_slices(model)
    wanted = {}
    for name in names:
        shape, numel = list(params[name].shape), params[name].numel()
        if name in slices:
            first, count = slices[name]
            wanted[name] = (first * numel // count, (first + count) * numel // count,
                            [count * model.dispatcher.ep_size, *shape[1:]])
        else:
            wanted[name] = (0, numel, shape)
    return wanted


def _state_from_fragments(directory: str, world_size: int, model: torch.nn.Module,
                          names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    """The fp32 master weights and optimizer state of the named parameters as this rank holds them (its experts'
    rows), assembled from the ``optim_by_name`` files of ranks 0..world_size-1 of a checkpoint; and the optimizer
    groups' hyper-parameters."""
    params, wanted = dict(model.named_parameters()), _wanted(model, names)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    covered: dict[str, torch.Tensor] = {}
    groups: list[dict] = []
    for rank in range(world_size):
        path = os.path.join(directory, BY_NAME.format(rank=rank))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint's optimizer state cannot be regrouped")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            groups = groups or json.loads(meta["param_groups"])
            for name, info in json.loads(meta["params"]).items():
                if name not in wanted:
                    continue  # frozen in this run: no optimizer state
                lo, hi, shape = wanted[name]
                if info["shape"] != shape:
                    raise ValueError(f"{path}: {name} has shape {info['shape']} in the checkpoint, {shape} here")
                entry = entries.setdefault(name, {})
                if info["step"] is not None:
                    entry["step"] = torch.tensor(info["step"], dtype=torch.float32)
                mask = covered.setdefault(name, torch.zeros(hi - lo, dtype=torch.bool))
                for key in info["keys"]:
                    fragment, start = f.get_slice(f"{key}/{name}"), info["start"]
                    a, b = max(start, lo), min(start + fragment.get_shape()[0], hi)  # overlap with this rank's part
                    if a < b:
                        part = fragment[a - start : b - start]
                        entry.setdefault(key, torch.zeros(hi - lo, dtype=part.dtype))[a - lo : b - lo] = part
                        mask[a - lo : b - lo] = True
    for name, mask in covered.items():
        if not bool(mask.all()):
            raise ValueError(f"{directory}: the optimizer state of {name} is incomplete ({int(mask.sum())} of "
                             f"{mask.numel()} values found)")
        entries[name] = {k: v if k == "step" else v.view(params[name].shape) for k, v in entries[name].items()}
    return entries, groups


def _state_from_torch_files(saved: list[dict], model: torch.nn.Module,
                            names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    """The optimizer state of the named parameters as this rank holds them, from the files of ranks 0..S-1 of a
    ZeRO-0 fp32 checkpoint, S its expert-parallel size (one copy of every expert, in expert order; everything else is
    whole on every rank): an expert parameter's state is concatenated over the files, then this rank's rows cut out."""
    by_name = []
    for part in saved:
        if part.get("param_names") is None:
            raise ValueError("the checkpoint's optimizer files do not name their parameters (written by an older "
                             "version); it resumes on its own layout")
        states = part["optimizer"]["state"]
        by_name.append({n: states[i] for i, n in enumerate(part["param_names"]) if i in states})
    experts, slices = set(model.expert_parameters()), expert_slices(model)
    entries = {}
    for name in names:
        if name not in by_name[0]:
            continue  # no state yet (e.g. frozen when the checkpoint was written): starts fresh like a new param
        entry = by_name[0][name]
        if name in experts and len(by_name) > 1:
            entry = {k: torch.cat([part[name][k] for part in by_name]) if _stacked(v) else v for k, v in entry.items()}
        if name in slices:
            first, count = slices[name]
            entry = {k: v[first : first + count] if _stacked(v) else v for k, v in entry.items()}
        entries[name] = entry
    return entries, saved[0]["optimizer"]["param_groups"]


def reshard_optimizer_state(saved: list[dict], optimizer, model: torch.nn.Module) -> dict:
    """This rank's state dict for a torch optimizer from the files of a ZeRO-0 checkpoint of another layout (see
    :func:`_state_from_torch_files`). Parameter groups keep this optimizer's structure and take the checkpoint's
    hyper-parameters."""
    names = optimizer_param_names(optimizer, model)
    if names is None:
        raise ValueError("resharding into a state dict needs a torch optimizer over the model's parameters")
    entries, groups = _state_from_torch_files(saved, model, names)
    return _torch_state_dict(optimizer, names, entries, groups)


def _torch_state_dict(optimizer, names: list[str], entries: dict, groups: list[dict]) -> dict:
    hyper = _hyper_parameters(groups)
    state = {i: {k: v for k, v in entries.get(n, {}).items() if k != "fp32"} for i, n in enumerate(names)}
    state = {i: entry for i, entry in state.items() if entry}
    return {"state": state, "param_groups": [{**g, **hyper} for g in optimizer.state_dict()["param_groups"]]}


def set_optimizer_state(optimizer, model: torch.nn.Module, entries: dict[str, dict[str, torch.Tensor]],
                        groups: list[dict]) -> None:
    """Give an optimizer of any kind the state of ``entries`` (parameter name -> fp32 master weights ``fp32``,
    optimizer state and ``step``, as this rank holds the parameter) and the hyper-parameters of ``groups``. Master
    weights missing from ``entries`` are taken from the model's (just loaded) parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(optimizer, torch.optim.Optimizer):  # the parameters are the master weights
        order = optimizer_param_names(optimizer, model)
        if order is None:
            raise ValueError("the optimizer holds tensors that are not the model's parameters; cannot regroup")
        with torch.no_grad():
            for param in (p for group in optimizer.param_groups for p in group["params"]):
                if "fp32" in entries.get(names[id(param)], {}):
                    param.copy_(entries[names[id(param)]]["fp32"])
        optimizer.load_state_dict(_torch_state_dict(optimizer, order, entries, groups))
        return
    base, hyper = optimizer.optimizer, _hyper_parameters(groups)
    if _holds_fragments(optimizer):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        linked = link_optimizer_state(optimizer, model)  # group -> parameters with a fragment here
        keys = sorted({k for entry in entries.values() for k in entry if k not in ("fp32", "step")})
        for index, group in enumerate(base.param_groups):
            # the state Adam would create at its first step, then this rank's fragments of the checkpoint's
            flat = group["params"][0]
            steps = {float(entries[n]["step"]) for n, _ in linked.get(index, []) if "step" in entries.get(n, {})}
            if len(steps) > 1:
                raise ValueError(f"the checkpoint's parameters of one optimizer group have different steps {steps}")
            if keys:  # else Adam creates its state at the next step
                base.state[flat] = {"step": torch.tensor(steps.pop() if steps else 0.0, dtype=torch.float32),
                                    **{k: torch.zeros_like(flat) for k in keys}}
        link_optimizer_state(optimizer, model)
        for name, param in (item for params in linked.values() for item in params):
            entry = entries.get(name, {})
            safe_set_full_fp32_param(param, entry.get("fp32", param.detach().float()))
            for key in keys:
                if key in entry:
                    safe_set_full_optimizer_state(param, entry[key], key)
    elif _holds_master_copies(optimizer):
        with torch.no_grad():
            for params, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
                for param, master in zip(params, masters):
                    entry = entries.get(names[id(param)], {})
                    master.copy_(entry.get("fp32", param.detach().float()))
                    # Adam keeps its (non-capturable) step on the CPU, the moments beside the parameter
                    state = {k: v.clone() if k == "step" else v.to(master.device, copy=True)
                             for k, v in entry.items() if k != "fp32"}
                    if state:
                        base.state[master] = state
    else:
        raise ValueError(f"cannot give optimizer state by parameter name to {type(optimizer).__name__}")
    for group in base.param_groups:
        group.update(hyper)


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


def _torch_layout(layout: dict) -> bool:
    """Whether a layout trains with a torch optimizer (ZeRO-0 in fp32) rather than one of DeepSpeed's."""
    return layout.get("zero_stage", 0) == 0 and layout.get("precision", "fp32") == "fp32"


def resumes_on_any_layout(directory: str, layout: dict) -> bool:
    """Whether a checkpoint written with ``layout`` holds its optimizer state by parameter name: ZeRO-0 fp32 files
    name their parameters, DeepSpeed's optimizers write ``optim_by_name`` files (not before they existed)."""
    if _torch_layout(layout):
        return True
    return all(os.path.isfile(os.path.join(directory, BY_NAME.format(rank=r)))
               for r in range(layout.get("world_size", 1)))


def _read(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _fp32_weights(path: str, model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The named weights as this rank holds them, in fp32, from a consolidated weights file."""
    slices, out = expert_slices(model), {}
    with safe_open(path, framework="pt") as f:
        stored = set(f.keys())
        for name in (n for n in names if n in stored):
            first, count = slices.get(name, (0, None))
            out[name] = (f.get_slice(name)[first : first + count] if count else f.get_tensor(name)).float()
    return out


def _saved_state_by_name(directory: str, layout: dict, model: torch.nn.Module, names: list[str],
                         first: dict) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    """The optimizer state of a checkpoint written with ``layout`` for the named parameters as this rank holds them,
    and its groups' hyper-parameters; ``first`` is its rank-0 optimizer file."""
    if first.get("param_names") is not None:  # a torch optimizer's files
        others = [os.path.join(directory, f"optim_rank{r}.pt") for r in range(1, layout.get("ep_size", 1))]
        saved = [first, *map(_read, others)]
        return _state_from_torch_files(saved, model, names)
    if resumes_on_any_layout(directory, layout):
        return _state_from_fragments(directory, layout.get("world_size", 1), model, names)
    raise ValueError(f"{directory} (layout {layout}) holds no optimizer state by parameter name (written before "
                     "checkpoints had optim_by_name files); it resumes on its own layout only")


def load_checkpoint(engine, model: torch.nn.Module, directory: str, rank: int = 0, saved_layout: dict | None = None,
                    layout: dict | None = None) -> None:
    """Restore weights, this rank's optimizer, lr schedule and RNG states (no unpickling of code).

    On the layout that wrote it (``saved_layout == layout``) each rank reads its own files. On another world size,
    ``ep_size``, ZeRO stage or precision, weights are consolidated and the optimizer state is found by parameter name
    (:func:`resumes_on_any_layout`): each rank takes its share of every parameter's master weights, optimizer state
    and step, and every group the checkpoint's hyper-parameters and lr schedule."""
    load_weights(model, os.path.join(directory, WEIGHTS))
    saved_layout, layout = saved_layout or {}, layout or {}
    optimizer, scheduler = engine.optimizer, engine.lr_scheduler
    if saved_layout == layout:
        path = os.path.join(directory, f"optim_rank{rank}.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no optimizer state for rank {rank}")
        saved = _read(path)
        if _holds_fragments(optimizer):  # ZeRO-1/2 take every rank's state, indexed by data-parallel rank (= rank)
            states = [None] * layout.get("world_size", 1)
            states[rank] = saved["optimizer"]
            # fp32 master weights from the checkpoint, not from the (possibly lower precision) model
            optimizer.load_state_dict(states, load_from_fp32_weights=True)
        else:  # a torch optimizer, or DeepSpeed's bf16 one (its state dict holds the fp32 master copies)
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["lr_scheduler"])
    else:
        first = _read(os.path.join(directory, "optim_rank0.pt"))
        if first.get("param_names") is None and _torch_layout(saved_layout):
            # ZeRO-0 fp32 files of an older version: whole, in the order of this optimizer's parameters
            if saved_layout.get("ep_size", 1) == layout.get("ep_size", 1) == 1 and _torch_layout(layout):
                optimizer.load_state_dict(first["optimizer"])
            else:
                raise ValueError(f"{directory}: the optimizer files do not name their parameters (written by an older "
                                 "version); it resumes on its own layout or on another world size with ep_size=1")
        else:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            entries, groups = _saved_state_by_name(directory, saved_layout, model, names, first)
            if not any("fp32" in entry for entry in entries.values()) and \
                    any(p.dtype != torch.float32 for p in model.parameters()):
                # an fp32 checkpoint for a lower-precision run: master weights from the fp32 weights, not a bf16 copy
                for name, weight in _fp32_weights(os.path.join(directory, WEIGHTS), model, names).items():
                    entries.setdefault(name, {})["fp32"] = weight
            set_optimizer_state(optimizer, model, entries, groups)
        scheduler.load_state_dict(reshard_scheduler_state(first["lr_scheduler"], len(optimizer.param_groups)))
    rng = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.isfile(rng):  # a rank that did not exist when the checkpoint was written keeps its fresh seeds
        set_rng_state(torch.load(rng, weights_only=True))
