"""Consolidated weights: ``model.safetensors`` of a checkpoint or export, and the model a finished stage saved.

Weights are written whole (no pickle), also under expert parallelism: the experts of every expert-parallel rank are
gathered on rank 0, and loading gives each rank its own slice, for any ``ep_size``; under ZeRO-3 every parameter is
gathered for saving and loading, one at a time. Nothing here needs DeepSpeed or a process group except
:func:`consolidated_state` under expert parallelism or ZeRO-3 and :func:`load_weights` under ZeRO-3.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from asymoe_train.checkpoint.deepspeed_optim import gathered, is_partitioned
from asymoe_train.checkpoint.integrity import verify
from asymoe_train.config.derive import upcycled_after
from asymoe_train.config.errors import CheckpointError
from asymoe_train.config.schema import ModelConfig, StageConfig
from asymoe_train.models.vlm import VisionLanguageModel, build_model

WEIGHTS = "model.safetensors"


def stage_dir(run_dir: str, stage: str) -> str:
    """Where a finished stage's checkpoint lives: ``<run_dir>/checkpoints/<stage>``."""
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


def _aliases(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, list[str]]]:
    """Every parameter once, with all its names (a tied weight has several)."""
    found: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(param), (param, []))[1].append(name)
    return list(found.values())


def _load_partitioned(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[set[str], list[str]]:
    """ZeRO-3: copy each partitioned parameter from ``state`` while it is gathered (a collective per parameter);
    returns the names handled and the parameters ``state`` lacks."""
    handled, missing = set(), []
    for param, names in _aliases(model):
        if not is_partitioned(param):
            continue
        handled.update(names)
        found = next((name for name in names if name in state), None)
        if found is None:
            missing.append(names[0])
            continue
        with gathered([param], modifier_rank=0), torch.no_grad():
            param.copy_(state[found])
    return handled, missing


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load consolidated weights strictly; under expert parallelism each rank reads only its experts' rows, under
    ZeRO-3 each parameter is gathered, loaded and partitioned again (every rank calls this then). (Not safetensors'
    ``load_model``: it refuses parameters that are views into one flat buffer, as ZeRO-1/2 makes them.)"""
    slices = expert_slices(model)
    state = {}
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            if name in slices:
                first, count = slices[name]
                state[name] = f.get_slice(name)[first : first + count]
            else:
                state[name] = f.get_tensor(name)
    partitioned, missing_partitioned = _load_partitioned(model, state)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in partitioned},
                                                strict=False)
    # a tied weight is stored once, under one of its names
    tensors = {name: (t.data_ptr(), tuple(t.shape), t.stride()) for name, t in model.state_dict().items()}
    loaded = {tensors[name] for name in state if name in tensors}
    missing = [name for name in missing if name not in partitioned and tensors[name] not in loaded]
    missing += missing_partitioned
    if missing or unexpected:
        raise RuntimeError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def fp32_weights(path: str, model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The named weights as this rank holds them (its experts' rows), in fp32, from a consolidated weights file."""
    slices, out = expert_slices(model), {}
    with safe_open(path, framework="pt") as f:
        stored = set(f.keys())
        for name in (n for n in names if n in stored):
            first, count = slices.get(name, (0, None))
            out[name] = (f.get_slice(name)[first : first + count] if count else f.get_tensor(name)).float()
    return out


def consolidated_state(model: torch.nn.Module, expert_parallel, rank: int = 0) -> dict[str, torch.Tensor] | None:
    """The model's state dict with every expert of every expert-parallel rank, or every ZeRO-3 parameter gathered, on
    global rank 0 (None elsewhere, and without either, where the model's own state dict is whole). Every rank calls
    this."""
    if any(is_partitioned(p) for p in model.parameters()):
        full = {}
        for param, names in _aliases(model):
            if is_partitioned(param):
                with gathered([param]):
                    copy = param.detach().to("cpu", copy=True) if rank == 0 else None
                full.update(dict.fromkeys(names, copy))  # one tensor for all names of a tied weight
        return {**model.state_dict(), **full} if rank == 0 else None
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
    ``checkpoints/<stage>`` of ``run_dir`` or from ``directory``, after checking them against the checkpoint's
    manifest (:class:`CheckpointError` names a damaged file)."""
    directory = directory or stage_dir(run_dir, stage)
    path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"stage {stage!r} left no weights at {path}; train that stage (resume=auto) or name "
                              "a checkpoint that has them")
    verify(directory, [WEIGHTS], fix=f"the weights of stage {stage!r} are damaged: restore them, or train that stage "
           "again (resume=auto falls back to the newest checkpoint that verifies)")
    load_weights(model, path)


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
