"""The random number generators of a process (Python, NumPy, torch, CUDA) as one checkpointed component."""

from __future__ import annotations

import random

import numpy as np
import torch


class ProcessRng:
    """``state_dict``/``load_state_dict`` of every RNG a training process draws from: plain tensors and numbers,
    so the file loads with ``torch.load(weights_only=True)``."""

    def state_dict(self) -> dict:
        numpy = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (numpy[0], torch.from_numpy(numpy[1].copy()), *numpy[2:]),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy(), *rest))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
