"""The divergence guard: an optimizer step whose loss or gradient norm is not finite is skipped, before it can touch
the weights, and counted; ``training.max_skipped_steps`` skipped steps in a row stop the run.

How a step is skipped, on every optimizer path: a non-finite loss is turned into NaN gradients (the loss times NaN),
so the gradient norm of the step is NaN on every rank once gradients are reduced. DeepSpeed's own optimizers (ZeRO-1/2,
bf16) then skip the step themselves (their overflow check: no update, no lr-schedule step, gradients cleared). A
plain torch optimizer (ZeRO-0, fp32) has no such check: :func:`torch_step_skipped` turns its step into a no-op and
raises the ``overflow`` flag DeepSpeed's engine reads after the step, so the lr schedule does not advance either.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

import torch

from asymoe_train.checkpoint.deepspeed_optim import local_data
from asymoe_train.config.errors import DivergenceError

# Fault injection for tests: "<stage>:<step>,<step>,..." makes the loss of those (0-based) optimizer steps NaN.
NAN_ENV = "ASYMOE_NAN_LOSS_STEPS"

log = logging.getLogger(__name__)


def injected_nan_steps(stage: str) -> set[int]:
    """The steps of ``stage`` whose loss :data:`NAN_ENV` makes NaN."""
    spec = os.environ.get(NAN_ENV, "")
    name, _, steps = spec.partition(":")
    return {int(s) for s in steps.split(",") if s.strip()} if name == stage else set()


def guarded_loss(loss: torch.Tensor, poisoned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to backpropagate and whether it is finite (a device bool, read once per optimizer step by the
    caller). A non-finite (or ``poisoned``) loss becomes NaN, so its gradients are NaN on every rank after the
    reduction and every optimizer path skips the step (module docstring)."""
    if poisoned:
        loss = loss * float("nan")
    finite = torch.isfinite(loss.detach()).all()
    # a factor, not torch.where(finite, loss, loss * nan): the untaken branch's backward would still multiply by NaN
    return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype), finite


@contextlib.contextmanager
def torch_step_skipped(optimizer, skip: bool) -> Iterator[None]:
    """Around ``engine.step()`` with a torch optimizer: when ``skip``, its ``step`` does nothing (no weight and no
    optimizer state changes) and its ``overflow`` flag, which DeepSpeed's engine reads after a step as its own
    optimizers set it, is up, so the engine counts the step as skipped (``engine.was_step_applied()``) and leaves the
    lr schedule where it is. (Clipping the NaN gradients first is harmless: the engine clears them after the step.)"""
    optimizer.overflow = skip
    if not skip:
        yield
        return
    wrapped = optimizer.__dict__.get("step")  # the lr scheduler's step-counting wrapper, if any
    optimizer.step = _no_step
    try:
        yield
    finally:
        if wrapped is None:
            del optimizer.step
        else:
            optimizer.step = wrapped


def _no_step(*args, **kwargs) -> None:
    return None


class SkippedSteps:
    """Counts a stage's skipped optimizer steps; raises :class:`DivergenceError` at ``max_consecutive`` in a row."""

    def __init__(self, stage: str, max_consecutive: int, rank: int = 0):
        self.stage, self.max_consecutive, self.rank = stage, max_consecutive, rank
        self.total = self.consecutive = 0

    def record(self, skipped: bool, step: int, metrics: dict) -> None:
        """After optimizer step ``step`` (0-based) of the stage."""
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        loss, norm = float(metrics.get("loss/total", math.nan)), metrics.get("grad_norm")
        if self.rank == 0:
            log.warning(f"stage {self.stage} step {step + 1}: skipped (loss {loss}"
                        + (f", gradient norm {norm}" if norm is not None else "")
                        + f"); weights and optimizer state unchanged ({self.consecutive} in a row, {self.total} "
                        "in this stage)")
        if self.consecutive >= self.max_consecutive:
            raise DivergenceError(
                f"stage {self.stage}: {self.consecutive} optimizer steps in a row up to step {step + 1} had a "
                f"non-finite loss or gradient norm (training.max_skipped_steps={self.max_consecutive}); the weights "
                "were not updated by them and every checkpoint holds finite weights. Lower "
                f"curriculum.stages.{self.stage}.lr (a resume may change it), check the data, or raise "
                "training.max_skipped_steps; then continue with resume=auto")


def all_finite(model: torch.nn.Module, world_size: int = 1) -> bool:
    """Whether every weight of the model is finite on every rank (a collective with several ranks)."""
    # what this rank holds: under ZeRO-3 its partition of each parameter
    finite = all(bool(torch.isfinite(local_data(p).detach()).all()) for p in model.parameters())
    if world_size > 1:
        flag = torch.tensor([int(not finite)], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        finite = not flag.item()
    return finite
