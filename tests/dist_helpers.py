"""Test helpers for process groups."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def group_timeout(group: dist.ProcessGroup) -> datetime.timedelta:
    """The collective timeout of a process group (its CPU backend's, else its GPU backend's)."""
    device = torch.device("cpu") if torch.device("cpu") in group._device_types else torch.device("cuda")
    return group._get_backend(device).options._timeout
