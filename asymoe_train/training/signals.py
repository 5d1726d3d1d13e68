"""Stopping on the signals a scheduler sends before a time limit or a preemption: checkpoint at the next step
boundary, then hand the signal on."""

from __future__ import annotations

import signal

import torch

# What SLURM (SIGTERM, SIGUSR1 with --signal) and submitit (SIGUSR2) send before a time limit or a preemption.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Raised after the checkpoint that a stop signal asked for is written; carries its directory."""

    def __init__(self, checkpoint: str, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}: checkpoint {checkpoint}")
        self.checkpoint, self.signum = checkpoint, signum


class StopSignals:
    """While active (``with``), records a stop signal instead of dying; :meth:`requested` tells every rank whether
    any rank received one. On leaving with :class:`Preempted`, the handler installed before (e.g. submitit's requeue)
    gets the signal; the previous handlers are restored either way."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.received = 0
        self.previous: dict = {}

    def _record(self, signum, frame) -> None:
        self.received = signum
        if self.rank == 0:
            print(f"received {signal.Signals(signum).name}: checkpointing at the next step boundary", flush=True)

    def requested(self) -> int:
        """The stop signal any rank received, 0 if none (all ranks agree, so all save and stop at the same step)."""
        if self.world_size == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def __enter__(self) -> StopSignals:
        self.previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, kind, exn, traceback) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if isinstance(exn, Preempted) and callable(self.previous.get(exn.signum)):
            self.previous[exn.signum](exn.signum, None)
