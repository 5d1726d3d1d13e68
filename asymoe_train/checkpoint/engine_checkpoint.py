"""A DeepSpeed engine's resumable checkpoint: weights, optimizer and lr schedule, RNG and trainer state, written
through the atomic store."""

from __future__ import annotations

import os

import torch

from asymoe_train.checkpoint.optimizer import load_optimizer, save_optimizer
from asymoe_train.checkpoint.rng import ProcessRng
from asymoe_train.checkpoint.store import TrainerState, checkpoint_name, publish
from asymoe_train.checkpoint.weights import WEIGHTS, consolidated_state, load_weights, save_weights

RNG_FILE = "rng_rank{rank}.pt"


def save_checkpoint(engine, model: torch.nn.Module, run_dir: str, state: TrainerState, rank: int = 0,
                    world_size: int = 1, expert_parallel=None) -> str:
    """Write a complete checkpoint atomically (every rank calls this); returns its directory. With expert parallelism
    (``expert_parallel``, the model's layout) the weights file still holds every expert."""

    def write(directory: str) -> None:
        save_optimizer(engine, model, directory, rank)
        torch.save(ProcessRng().state_dict(), os.path.join(directory, RNG_FILE.format(rank=rank)))
        full = consolidated_state(model, expert_parallel, rank)  # collective (first expert-parallel group, or ZeRO-3)
        if rank == 0:
            save_weights(model, os.path.join(directory, WEIGHTS), full)
            state.save(directory)

    return publish(run_dir, checkpoint_name(state.stage, state.step, state.stage_done), write, rank, world_size)


def load_checkpoint(engine, model: torch.nn.Module, directory: str, rank: int = 0, saved_layout: dict | None = None,
                    layout: dict | None = None) -> None:
    """Restore weights, this rank's optimizer, lr schedule and RNG states (no unpickling of code), on the layout
    that wrote the checkpoint or another one (:func:`asymoe_train.checkpoint.optimizer.load_optimizer`)."""
    load_weights(model, os.path.join(directory, WEIGHTS))
    load_optimizer(engine, model, directory, rank, saved_layout or {}, layout or {})
    rng = os.path.join(directory, RNG_FILE.format(rank=rank))
    if os.path.isfile(rng):  # a rank that did not exist when the checkpoint was written keeps its fresh seeds
        ProcessRng().load_state_dict(torch.load(rng, weights_only=True))
