"""Token dispatch: route (token, expert, weight) assignments to experts and combine the outputs.

The protocol every dispatcher follows (the local one here, the all-to-all one of expert parallelism in
``asymoe_train.distributed.expert_parallel``):

* experts are numbered by *slot*, rank-major: expert-parallel rank r holds slots ``[r * E_r, (r + 1) * E_r)``, where
  ``E_r = num_experts / ep_size``, and within a rank its experts run pool by pool (the block maps its global expert
  indices to slots);
* ``run_experts(x_AD, counts, extra_AX)`` runs the experts held here on rows sorted by slot, ``counts[e]`` rows for
  local expert e, and returns their outputs in the same order; ``extra_AX`` (or None) are per-assignment rows that
  travel with the tokens (evidence outputs of evidence experts);
* the result is ``sum_k weight * expert_k(x)`` per token, zero for tokens without assignments.

A dispatcher exposes ``ep_rank`` and ``ep_size``: a block builds only the experts of its rank.

# T tokens, D model dim, A assignments (tokens x top-k), E experts (slots) in the block, X width of extra rows
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# (slot-sorted rows, rows per expert held here, slot-sorted extra rows or None) -> outputs in the same order
RunExperts = Callable[[torch.Tensor, list[int], torch.Tensor | None], torch.Tensor]


@dataclass
class SlotOrder:
    """Assignments sorted by slot, stably (each slot keeps its tokens in order): the prologue and epilogue every
    dispatcher shares."""

    order_A: torch.Tensor  # sorted position -> assignment index
    token_A: torch.Tensor  # the token of each sorted assignment
    counts_E: torch.Tensor  # assignments per slot

    @classmethod
    def sort(cls, token_A: torch.Tensor, expert_A: torch.Tensor, num_experts: int) -> SlotOrder:
        order_A = torch.argsort(expert_A, stable=True)
        return cls(order_A, token_A[order_A], torch.bincount(expert_A, minlength=num_experts))

    def combine(self, x_TD: torch.Tensor, y_AD: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
        """``sum_k weight * y`` per token from outputs ``y_AD`` in sorted order; zero for tokens without
        assignments."""
        y_AD = y_AD * weight_A[self.order_A].unsqueeze(-1).to(y_AD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, self.token_A, y_AD)


class LocalDispatcher:
    """Dropless single-device dispatch: sort assignments by expert, run each expert on a contiguous slice,
    scatter-add the weighted outputs back to their tokens."""

    ep_rank = 0
    ep_size = 1

    def __call__(
        self,
        x_TD: torch.Tensor,
        token_A: torch.Tensor,
        expert_A: torch.Tensor,
        weight_A: torch.Tensor,
        num_experts: int,
        run_experts: RunExperts,
        extra_AX: torch.Tensor | None = None,
        where: str = "",
    ) -> torch.Tensor:
        slots = SlotOrder.sort(token_A, expert_A, num_experts)
        extra_AX = None if extra_AX is None else extra_AX[slots.order_A]
        y_AD = run_experts(x_TD[slots.token_A], slots.counts_E.tolist(), extra_AX)
        return slots.combine(x_TD, y_AD, weight_A)
