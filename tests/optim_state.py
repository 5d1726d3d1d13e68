"""Test helper: the optimizer state of a ZeRO-0 fp32 checkpoint regrouped for another layout, as a torch state dict
to compare against (the trainer itself loads it straight into the optimizer)."""

from __future__ import annotations

import torch

from asymoe_train.checkpoint.optimizer import optimizer_param_names, state_from_torch_files, torch_state_dict


def reshard_optimizer_state(saved: list[dict], optimizer, model: torch.nn.Module) -> dict:
    """This rank's state dict for a torch optimizer from the files of a ZeRO-0 checkpoint of another layout (see
    :func:`asymoe_train.checkpoint.optimizer.state_from_torch_files`). Parameter groups keep this optimizer's
    structure and take the checkpoint's hyper-parameters."""
    names = optimizer_param_names(optimizer, model)
    if names is None:
        raise ValueError("resharding into a state dict needs a torch optimizer over the model's parameters")
    entries, groups = state_from_torch_files(saved, model, names)
    return torch_state_dict(optimizer, names, entries, groups)
