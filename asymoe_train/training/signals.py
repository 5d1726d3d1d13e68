"""Stopping on the signals a scheduler or a user sends: checkpoint at the next step boundary, exit cleanly, then
hand the signal on.

Schedulers signal the whole process group (``scancel``, SLURM preemption, systemd, ``kill -- -PGID``), and a
terminal's Ctrl-C does too, so DataLoader workers receive the signal with their trainer: they ignore it (their
``worker_init_fn`` is :func:`asymoe_train.data.pipeline.quiet_worker`) and keep feeding the step the trainer finishes
before it saves.
"""

from __future__ import annotations

import signal

import torch

# What SLURM (SIGTERM, SIGUSR1 with --signal) and submitit (SIGUSR2) send before a time limit or a preemption.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# A first Ctrl-C stops like a preemption; a second one stops at once (KeyboardInterrupt).
INTERRUPT = signal.SIGINT


class Preempted(Exception):
    """Raised after the checkpoint that a stop signal asked for is written; carries its directory."""

    def __init__(self, checkpoint: str, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}: checkpoint {checkpoint}")
        self.checkpoint, self.signum = checkpoint, signum


class StopSignals:
    """While active (``with``), records a stop signal (or a first SIGINT) instead of dying; :meth:`requested` tells
    every rank whether any rank received one. A second SIGINT raises KeyboardInterrupt at once. On leaving with
    :class:`Preempted`, the handler installed before (e.g. submitit's requeue) gets the stop signal; the previous
    handlers are restored either way."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.received = 0
        self.previous: dict = {}

    def _record(self, signum, frame) -> None:
        if signum == INTERRUPT and self.received == INTERRUPT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = self.received or signum
        if self.rank == 0:
            again = "; press Ctrl-C again to stop at once" if signum == INTERRUPT else ""
            print(f"received {signal.Signals(signum).name}: checkpointing at the next step boundary{again}",
                  flush=True)

    def requested(self) -> int:
        """The stop signal any rank received, 0 if none (all ranks agree, so all save and stop at the same step)."""
        if self.world_size == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def __enter__(self) -> StopSignals:
        self.previous = {signum: signal.signal(signum, self._record) for signum in (*STOP_SIGNALS, INTERRUPT)}
        return self

    def __exit__(self, kind, exn, traceback) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        # Python's own SIGINT handler raises KeyboardInterrupt: a checkpointed Ctrl-C ends with status 0 instead
        if isinstance(exn, Preempted) and exn.signum != INTERRUPT and callable(self.previous.get(exn.signum)):
            self.previous[exn.signum](exn.signum, None)
