"""Every access to DeepSpeed's private optimizer internals, in one place.

What a checkpoint needs from DeepSpeed's optimizers beyond ``state_dict``/``load_state_dict`` (each parameter's fp32
master weights and optimizer state, by parameter name) is not public API: ZeRO-1/2 and the bf16 optimizer link every
parameter to fragments of flat fp32 partitions (``param._hp_mapping``, ``bit16_groups``/``bf16_groups``), bf16 without
ZeRO keeps whole fp32 master copies (``fp16_groups``/``fp32_groups``), ZeRO-3 partitions every parameter itself
(``param.ds_tensor``, ``ds_shape``, ``ds_numel``, ``ds_process_group``: each rank holds one equal, zero-padded slice
of the flattened parameter) and its optimizer keeps one flat fp32 partition per sub-group
(``fp32_partitioned_groups_flat``), and the wrapped torch optimizer is ``optimizer.optimizer``. These fields change between DeepSpeed releases, so every function here first checks that the
installed DeepSpeed is in the range the package pins (setup.cfg's ``install_requires``) and raises otherwise.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os

import torch

PACKAGE = "asymoe_train"
# (name, parameter, start of the fragment in the parameter as this rank holds it, {key: 1-d fragment}, step)
Held = tuple[str, torch.nn.Parameter, int, dict[str, torch.Tensor], object]


class UnsupportedDeepSpeed(RuntimeError):
    """The installed DeepSpeed is outside the range whose optimizer internals this module knows."""


def pinned_range() -> str:
    """The DeepSpeed version specifier the package pins: from the installed package's metadata, else from the
    setup.cfg of the source tree it runs from."""
    try:
        requires = importlib.metadata.requires(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        import configparser

        setup = configparser.ConfigParser()
        setup.read(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "setup.cfg"))
        requires = setup.get("options", "install_requires", fallback="").split("\n")
    from packaging.requirements import Requirement

    for line in requires:
        if line.strip() and ";" not in line:
            requirement = Requirement(line.strip())
            if requirement.name == "deepspeed":
                return str(requirement.specifier)
    raise UnsupportedDeepSpeed(f"{PACKAGE} pins no deepspeed version (setup.cfg install_requires)")


def check_version(version: str, specifier: str) -> None:
    """Raise :class:`UnsupportedDeepSpeed` unless ``version`` satisfies ``specifier``."""
    from packaging.specifiers import SpecifierSet

    if not SpecifierSet(specifier).contains(version, prereleases=True):
        raise UnsupportedDeepSpeed(
            f"deepspeed {version} is installed, but {PACKAGE} reads and writes the optimizer state of DeepSpeed "
            f"{specifier} only (its checkpoints use DeepSpeed's private optimizer fields, which change between "
            f"releases); install `deepspeed{specifier}`, or train with engine.zero_stage=0 engine.precision=fp32 "
            "(a torch optimizer)"
        )


@functools.cache
def require_supported() -> None:
    """Check the installed DeepSpeed against the pinned range (once per process)."""
    import deepspeed

    check_version(deepspeed.__version__, pinned_range())


def holds_fragments(optimizer) -> bool:
    """DeepSpeed's ZeRO-1/2 optimizer (also its bf16 optimizer): parameters linked to fragments of flat partitions."""
    return hasattr(optimizer, "bit16_groups") or hasattr(optimizer, "bf16_groups")


def holds_partitions(optimizer) -> bool:
    """DeepSpeed's ZeRO-3 optimizer: every parameter partitioned over the data-parallel ranks."""
    return hasattr(optimizer, "fp32_partitioned_groups_flat")


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its ``data`` is empty while it is not gathered)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter, also of a ZeRO-3 one."""
    return param.ds_shape if is_partitioned(param) else param.shape


def partition_range(param: torch.Tensor) -> tuple[int, int, int]:
    """ZeRO-3: (start, end, partition size) of this rank's slice of the flattened parameter; ``end`` is clipped to
    the parameter (the last ranks' partitions are zero-padded)."""
    size = param.ds_tensor.ds_numel
    start = torch.distributed.get_rank(group=param.ds_process_group) * size
    return min(start, param.ds_numel), min(start + size, param.ds_numel), size


def local_data(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition (1-d, padded), else the parameter."""
    return param.ds_tensor if is_partitioned(param) else param


def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """A context in which ZeRO-3 parameters are whole on every rank (DeepSpeed's ``GatheredParameters``: a
    collective); with ``modifier_rank`` that rank's changes are kept. A no-op for other parameters."""
    import contextlib

    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def _stage3_state_keys_and_step(optimizer) -> tuple[list[str], object]:
    states = [st for st in optimizer.optimizer.state.values() if st]
    keys = sorted(k for k, v in states[0].items() if _stacked(v)) if states else []
    return keys, states[0].get("step") if states else None


def held_partitions(optimizer, model: torch.nn.Module) -> list[Held]:
    """ZeRO-3: this rank's slice of every trainable parameter's fp32 master weights and optimizer state (DeepSpeed's
    ``safe_get_local_*`` API), padding cut off."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    keys, step = _stage3_state_keys_and_step(optimizer)
    held = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        start, end, _ = partition_range(param)
        fragments = {"fp32": safe_get_local_fp32_param(param)[: end - start],
                     **{k: safe_get_local_optimizer_state(param, k)[: end - start] for k in keys}}
        held.append((name, param, start, fragments, step))
    return held


def set_held_partitions(optimizer, model: torch.nn.Module, entries: dict[str, dict[str, torch.Tensor]]) -> None:
    """ZeRO-3: give every trainable parameter's slice its fp32 master weights and optimizer state from ``entries``
    (this rank's unpadded slice, see :func:`partition_range`, or the whole parameter); master weights missing there come from the
    model's (just loaded) partitions."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    base = optimizer.optimizer
    keys = sorted({k for entry in entries.values() for k in entry if k not in ("fp32", "step")})
    steps = {float(entry["step"]) for entry in entries.values() if "step" in entry}
    if len(steps) > 1:
        raise ValueError(f"the checkpoint's parameters have different optimizer steps {steps}")
    if keys:  # the state Adam would create at its first step, for every sub-group's flat partition
        step = steps.pop() if steps else 0.0
        for flat in optimizer.fp32_partitioned_groups_flat:
            base.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                                **{k: torch.zeros_like(flat) for k in keys}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        start, end, size = partition_range(param)
        entry = entries.get(name, {})
        for key in ("fp32", *keys):
            value = torch.zeros(size, dtype=torch.float32, device=param.ds_tensor.device)
            if key in entry:
                flat = entry[key].reshape(-1)
                if flat.numel() == param.ds_numel:  # the whole parameter (from a ZeRO-0 file, or fp32 weights)
                    flat = flat[start:end]
                value[: end - start] = flat
            elif key == "fp32":
                value.copy_(param.ds_tensor.detach().reshape(-1).float())
            else:
                continue
            if key == "fp32":
                safe_set_local_fp32_param(param, value)
            else:
                safe_set_local_optimizer_state(param, value, key)


def holds_master_copies(optimizer) -> bool:
    """DeepSpeed's bf16 optimizer without ZeRO (``FP16_UnfusedOptimizer``): a whole fp32 copy of every parameter."""
    return hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups")


def base_param_groups(optimizer) -> list[dict]:
    """The parameter groups (and hyper-parameters) of the torch optimizer DeepSpeed's optimizer wraps."""
    require_supported()
    return optimizer.optimizer.param_groups


def link_optimizer_state(optimizer, model: torch.nn.Module) -> dict[int, list[tuple[str, torch.nn.Parameter]]]:
    """ZeRO-1/2: point every parameter's fragment (``_hp_mapping``) at its optimizer group's state; returns, per group,
    the parameters with a fragment on this rank. DeepSpeed 0.19 links them once, inside the step of group 0 only
    (``_optimizer_step`` restricts the groups to one, then ``_lazy_init_hp_params_optimizer_state`` marks all linked),
    so the state of every later group (the experts' under expert parallelism) stays out of reach of
    ``safe_get_full_optimizer_state`` & co.; linking again is harmless (views of the same tensors)."""
    require_supported()
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


def _stacked(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0  # exp_avg & co., not Adam's scalar step


def held_state(optimizer, model: torch.nn.Module) -> list[Held] | None:
    """This rank's share of every parameter's fp32 master weights (key ``fp32``) and optimizer state, with where it
    lies in the parameter as this rank holds it; None for an optimizer of another kind."""
    require_supported()
    base, held = optimizer.optimizer, []
    if holds_partitions(optimizer):
        return held_partitions(optimizer, model)
    if holds_fragments(optimizer):
        linked = link_optimizer_state(optimizer, model)
        for name, param in (item for params in linked.values() for item in params):
            mapping = param._hp_mapping
            state = base.state.get(base.param_groups[mapping.param_group_index]["params"][0], {})
            keys = mapping.get_optim_state_keys() if mapping.optim_fragment else []  # empty before the first step
            held.append((name, param, mapping.lp_fragment_address.start,
                         {"fp32": mapping.get_hp_fragment(), **{k: mapping.get_hp_fragment(k) for k in keys}},
                         state.get("step")))
    elif holds_master_copies(optimizer):
        names = {id(p): n for n, p in model.named_parameters()}
        for params, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for param, master in zip(params, masters):
                state = base.state.get(master, {})
                moments = {k: v.flatten() for k, v in state.items() if _stacked(v) and v.shape == master.shape}
                held.append((names[id(param)], param, 0, {"fp32": master.flatten(), **moments}, state.get("step")))
    else:
        return None
    return held


def set_held_state(optimizer, model: torch.nn.Module, entries: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give DeepSpeed's optimizer the state of ``entries`` (parameter name -> ``fp32`` master weights, optimizer
    state and ``step``, as this rank holds the parameter). Master weights missing from ``entries`` are taken from the
    model's (just loaded) parameters."""
    require_supported()
    base = optimizer.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    if holds_partitions(optimizer):
        set_held_partitions(optimizer, model, entries)
    elif holds_fragments(optimizer):
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
    elif holds_master_copies(optimizer):
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


def load_rank_state(optimizer, state: dict, rank: int, world_size: int) -> None:
    """Load this rank's own optimizer state dict on the layout that wrote it."""
    if holds_fragments(optimizer):  # ZeRO-1/2 take every rank's state, indexed by data-parallel rank (= rank)
        require_supported()
        states = [None] * world_size
        states[rank] = state
        # fp32 master weights from the checkpoint, not from the (possibly lower precision) model
        optimizer.load_state_dict(states, load_from_fp32_weights=True)
    else:  # a torch optimizer, or DeepSpeed's bf16 one (its state dict holds the fp32 master copies)
        optimizer.load_state_dict(state)
