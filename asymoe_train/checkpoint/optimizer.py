"""Optimizer and lr-schedule state: each rank's own files, and the same state by parameter name.

What lets a checkpoint resume on another layout (world size, ep_size, ZeRO stage, precision): each parameter's fp32
master weights, optimizer state (Adam's moments) and step, found by the parameter's name, whatever optimizer wrote or
reads them. A torch optimizer (ZeRO-0, fp32) holds whole parameters and its files name them. DeepSpeed's optimizers
also write ``optim_by_name_rank<r>.safetensors``: ZeRO-1/2 hold fragments of flat fp32 partitions (each parameter
cut at partition borders), ZeRO-3 an equal slice of every flattened parameter, bf16 with ZeRO-0 whole fp32 master
copies; each rank writes the fragments it holds with
where they lie in the whole parameter (every expert), so a save needs no collective and no gathering on one rank.
Loading assembles the rows this rank's parameters need from every rank's file.

Tensors of an ``optim_by_name`` file: ``<key>/<parameter name>``, 1-d fp32 fragments, key ``fp32`` (master
weights) or an optimizer state key (``exp_avg``, ``exp_avg_sq``). Metadata: ``params`` (JSON: name -> shape of the
whole parameter, start of the fragment in it flattened, step, keys) and ``param_groups`` (JSON: hyper-parameters).
"""

from __future__ import annotations

import enum
import json
import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from asymoe_train.checkpoint import deepspeed_optim
from asymoe_train.checkpoint.weights import WEIGHTS, expert_slices, fp32_weights

RANK_FILE = "optim_rank{rank}.pt"
BY_NAME = "optim_by_name_rank{rank}.safetensors"

log = logging.getLogger(__name__)

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


def _stacked(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0  # exp_avg & co., not Adam's scalar step


def _read(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def optimizer_param_names(optimizer, model: torch.nn.Module) -> list[str] | None:
    """The model's name of every parameter of a torch optimizer, in its state-dict order (None for DeepSpeed's
    ZeRO/bf16 optimizers, whose state holds flat partitions rather than parameters)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    return None if None in ordered else ordered


def _tag(group: dict) -> str:
    """An optimizer group's learning-rate tag (``lr_group``: training.groups.optimizer_groups; ``default`` in
    checkpoints written before groups had one)."""
    return group.get("lr_group", "default")


def _hyper_parameters(groups: list[dict]) -> dict[str, dict]:
    """The hyper-parameters (lr of the step a checkpoint stopped at, betas, ...) of the checkpoint's optimizer groups
    by lr tag: every group of a tag (expert parallelism splits one into several) shares them."""
    by_tag: dict[str, dict] = {}
    for g in groups:
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in g.items()
                 if k not in ("params", "name", "moe", "lr_group")}
        if by_tag.setdefault(_tag(g), hyper) != hyper:
            raise ValueError(f"the checkpoint's optimizer groups of lr group {_tag(g)!r} have different "
                             "hyper-parameters; cannot regroup them")
    return by_tag


def _hyper_for(by_tag: dict[str, dict], group: dict) -> dict:
    """The checkpoint's hyper-parameters for an optimizer group of this run: those of its lr tag (a tag the
    checkpoint lacks takes ``default``'s; the trainer then sets its lr from the config: rebase_schedule)."""
    return by_tag.get(_tag(group), by_tag.get("default", next(iter(by_tag.values()))))


def optimizer_fragments(optimizer, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """This rank's share of every parameter's fp32 master weights and optimizer state, by parameter name: the
    tensors and metadata of ``optim_by_name_rank<r>.safetensors`` (module docstring). None for a torch optimizer,
    whose own files name their parameters."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return None
    held = deepspeed_optim.held_state(optimizer, model)
    if held is None:
        log.warning("%s: optimizer state not saved by parameter name; this checkpoint resumes on its own layout only",
                    type(optimizer).__name__)
        return None
    slices = expert_slices(model)
    tensors, index = {}, {}
    for name, param, start, fragments, step in held:
        shape = list(deepspeed_optim.full_shape(param))
        if name in slices:  # this rank holds rows [first, first + count) of the experts' dim 0
            first, count = slices[name]
            start += first * (param.numel() // count)
            shape[0] = count * model.dispatcher.ep_size
        for key, fragment in fragments.items():
            tensors[f"{key}/{name}"] = fragment.detach().to("cpu", torch.float32).clone()  # own storage: safetensors
        index[name] = {"shape": shape, "start": start, "step": None if step is None else float(step),
                       "keys": list(fragments)}
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in deepspeed_optim.base_param_groups(optimizer)]
    return tensors, {"params": json.dumps(index), "param_groups": json.dumps(hyper, default=float)}


def save_optimizer(engine, model: torch.nn.Module, directory: str, rank: int) -> None:
    """This rank's optimizer and lr-schedule state (``optim_rank<r>.pt``) and, for DeepSpeed's optimizers, the same
    by parameter name (``optim_by_name_rank<r>.safetensors``)."""
    # ZeRO-3's own state dict would repeat the by-name file (it resumes from that one on every layout)
    own = {} if deepspeed_optim.holds_partitions(engine.optimizer) else _plain(engine.optimizer.state_dict())
    torch.save({"optimizer": own, "lr_scheduler": engine.lr_scheduler.state_dict(),
                "param_names": optimizer_param_names(engine.optimizer, model)},
               os.path.join(directory, RANK_FILE.format(rank=rank)))
    by_name = optimizer_fragments(engine.optimizer, model)
    if by_name is not None:
        save_file(by_name[0], os.path.join(directory, BY_NAME.format(rank=rank)), metadata=by_name[1])


def _wanted(model: torch.nn.Module, names: list[str]) -> dict[str, tuple[int, int, list[int]]]:
    """name -> (lo, hi, shape): the part [lo, hi) of the whole flattened parameter (every expert) that this rank holds,
    and the whole parameter's shape."""
    params, slices = dict(model.named_parameters()), expert_slices(model)
    wanted = {}
    for name in names:
        shape, numel = list(params[name].shape), params[name].numel()
        if deepspeed_optim.is_partitioned(params[name]):  # ZeRO-3: this rank's slice
            lo, hi, _ = deepspeed_optim.partition_range(params[name])
            wanted[name] = (lo, hi, list(params[name].ds_shape))
        elif name in slices:
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
        if not deepspeed_optim.is_partitioned(params[name]):  # ZeRO-3 slices stay flat
            entries[name] = {k: v if k == "step" else v.view(params[name].shape) for k, v in entries[name].items()}
    return entries, groups


def state_from_torch_files(saved: list[dict], model: torch.nn.Module,
                           names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    """The optimizer state of the named parameters as this rank holds them, from the files of ranks 0..S-1 of a
    ZeRO-0 fp32 checkpoint, S its expert-parallel size (one copy of every expert, in expert order; everything else is
    whole on every rank): an expert parameter's state is concatenated over the files, then this rank's rows cut out."""
    by_name = []
    for part in saved:
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


def torch_state_dict(optimizer, names: list[str], entries: dict, groups: list[dict]) -> dict:
    """A torch optimizer's state dict holding ``entries`` (by parameter name) and the hyper-parameters of
    ``groups``, in the structure of ``optimizer``'s own groups."""
    hyper = _hyper_parameters(groups)
    state = {i: {k: v for k, v in entries.get(n, {}).items() if k != "fp32"} for i, n in enumerate(names)}
    state = {i: entry for i, entry in state.items() if entry}
    return {"state": state, "param_groups": [{**g, **_hyper_for(hyper, g)}
                                             for g in optimizer.state_dict()["param_groups"]]}


def set_optimizer_state(optimizer, model: torch.nn.Module, entries: dict[str, dict[str, torch.Tensor]],
                        groups: list[dict]) -> None:
    """Give an optimizer of any kind the state of ``entries`` (parameter name -> fp32 master weights ``fp32``,
    optimizer state and ``step``, as this rank holds the parameter) and the hyper-parameters of ``groups``. Master
    weights missing from ``entries`` are taken from the model's (just loaded) parameters."""
    if isinstance(optimizer, torch.optim.Optimizer):  # the parameters are the master weights
        order = optimizer_param_names(optimizer, model)
        if order is None:
            raise ValueError("the optimizer holds tensors that are not the model's parameters; cannot regroup")
        names = {id(p): n for n, p in model.named_parameters()}
        with torch.no_grad():
            for param in (p for group in optimizer.param_groups for p in group["params"]):
                if "fp32" in entries.get(names[id(param)], {}):
                    param.copy_(entries[names[id(param)]]["fp32"])
        optimizer.load_state_dict(torch_state_dict(optimizer, order, entries, groups))
        return
    deepspeed_optim.set_held_state(optimizer, model, entries)
    hyper = _hyper_parameters(groups)
    for group in deepspeed_optim.base_param_groups(optimizer):
        group.update(_hyper_for(hyper, group))


def reshard_scheduler_state(state: dict, saved_tags: list[str], tags: list[str]) -> dict:
    """An lr-schedule state for optimizer groups tagged ``tags`` (expert parallelism adds groups for experts) from
    one whose groups were tagged ``saved_tags``: each list entry is found by lr tag, and the groups of one tag must
    follow the same schedule (a tag the checkpoint lacks takes ``default``'s)."""
    state = dict(state)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        values = state.get(key)
        if not isinstance(values, list) or (len(values) == len(tags) and saved_tags == tags):
            continue
        if len(values) != len(saved_tags):  # a checkpoint without tags: one schedule for every group
            saved_tags = ["default"] * len(values)
        by_tag: dict[str, object] = {}
        for tag, value in zip(saved_tags, values):
            if by_tag.setdefault(tag, value) != value:
                raise ValueError(f"lr schedule {key}={values}: groups of lr group {tag!r} differ; cannot regroup")
        state[key] = [by_tag.get(tag, by_tag.get("default", values[0])) for tag in tags]
    return state


def _torch_layout(layout: dict) -> bool:
    """Whether a layout trains with a torch optimizer (ZeRO-0 in fp32) rather than one of DeepSpeed's."""
    return layout.get("zero_stage", 0) == 0 and layout.get("precision", "fp32") == "fp32"


def resumes_on_any_layout(directory: str, layout: dict) -> bool:
    """Whether a checkpoint written with ``layout`` holds its optimizer state by parameter name: ZeRO-0 fp32 files
    name their parameters, DeepSpeed's optimizers write ``optim_by_name`` files (unless their kind was unknown)."""
    if _torch_layout(layout):
        return True
    return all(os.path.isfile(os.path.join(directory, BY_NAME.format(rank=r)))
               for r in range(layout.get("world_size", 1)))


def _saved_state_by_name(directory: str, layout: dict, model: torch.nn.Module, names: list[str],
                         first: dict) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    """The optimizer state of a checkpoint written with ``layout`` for the named parameters as this rank holds them,
    and its groups' hyper-parameters; ``first`` is its rank-0 optimizer file."""
    if first.get("param_names") is not None:  # a torch optimizer's files
        others = [os.path.join(directory, RANK_FILE.format(rank=r)) for r in range(1, layout.get("ep_size", 1))]
        return state_from_torch_files([first, *map(_read, others)], model, names)
    return _state_from_fragments(directory, layout.get("world_size", 1), model, names)


def load_optimizer(engine, model: torch.nn.Module, directory: str, rank: int, saved_layout: dict,
                   layout: dict) -> None:
    """Restore this rank's optimizer and lr schedule; ``model`` holds the checkpoint's weights already.

    On the layout that wrote it each rank reads its own file. On another world size, ``ep_size``, ZeRO stage or
    precision the optimizer state is found by parameter name (:func:`resumes_on_any_layout`): each rank takes its
    share of every parameter's master weights, optimizer state and step, and every group the checkpoint's
    hyper-parameters and lr schedule."""
    optimizer, scheduler = engine.optimizer, engine.lr_scheduler
    if saved_layout == layout and not deepspeed_optim.holds_partitions(optimizer):
        path = os.path.join(directory, RANK_FILE.format(rank=rank))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no optimizer state for rank {rank}")
        saved = _read(path)
        deepspeed_optim.load_rank_state(optimizer, saved["optimizer"], rank, layout.get("world_size", 1))
        scheduler.load_state_dict(saved["lr_scheduler"])
        return
    first = _read(os.path.join(directory, RANK_FILE.format(rank=0)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    entries, groups = _saved_state_by_name(directory, saved_layout, model, names, first)
    if not any("fp32" in entry for entry in entries.values()) and \
            any(p.dtype != torch.float32 for p in model.parameters()):
        # an fp32 checkpoint for a lower-precision run: master weights from the fp32 weights, not a bf16 copy
        for name, weight in fp32_weights(os.path.join(directory, WEIGHTS), model, names).items():
            entries.setdefault(name, {})["fp32"] = weight
    set_optimizer_state(optimizer, model, entries, groups)
    tags = [_tag(g) for g in scheduler.optimizer.param_groups]
    scheduler.load_state_dict(reshard_scheduler_state(first["lr_scheduler"], [_tag(g) for g in groups], tags))
