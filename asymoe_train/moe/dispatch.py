"""Token dispatch: route (token, expert, weight) assignments to experts and combine the outputs.

The protocol every dispatcher follows (the local one here, the all-to-all one of expert parallelism in
``asymoe_train.distributed.expert_parallel``):

* experts are numbered by *slot*, rank-major: expert-parallel rank r holds slots ``[r * E_r, (r + 1) * E_r)``, where
  ``E_r = num_experts / ep_size``, and within a rank its experts run pool by pool (the block maps its global expert
  indices to slots); slot ``num_experts`` takes the assignments of tokens no expert serves (padding): they sort last,
  no expert runs them, and they add nothing;
* ``run_experts(x_AD, counts_E, extra_AX)`` runs the experts held here on rows sorted by slot, ``counts_E[e]`` rows
  for local expert e (a device tensor, or a host list where the dispatcher has read the counts anyway), and returns
  their outputs in the same order; rows after the last expert's are ignored and their outputs discarded;
  ``extra_AX`` (or None) are per-assignment rows that travel with the tokens (evidence outputs of evidence experts);
* the result is ``sum_k weight * expert_k(x)`` per token, zero for tokens without assignments.

The local dispatcher reads nothing on the host: sizes are static (every token has top-k assignments), counts stay on
the device, and padding rows gather from, and scatter to, one extra zero row that is dropped.

A dispatcher exposes ``ep_rank`` and ``ep_size``: a block builds only the experts of its rank.

# T tokens, D model dim, A assignments (tokens x top-k), E experts (slots) in the block, X width of extra rows
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from asymoe_train.moe.grouped import count_of

# (slot-sorted rows, rows per expert held here, slot-sorted extra rows or None) -> outputs in the same order
RunExperts = Callable[[torch.Tensor, "torch.Tensor | list[int]", "torch.Tensor | None"], torch.Tensor]


@dataclass
class SlotOrder:
    """Assignments sorted by slot, stably (each slot keeps its tokens in order): the prologue and epilogue every
    dispatcher shares."""

    order_A: torch.Tensor  # sorted position -> assignment index
    token_A: torch.Tensor  # the token of each sorted assignment; T (the extra zero row) for padding assignments
    counts_E: torch.Tensor  # assignments per slot (device), padding not included

    @classmethod
    def sort(cls, token_A: torch.Tensor, expert_A: torch.Tensor, num_experts: int, num_tokens: int) -> SlotOrder:
        order_A = torch.argsort(expert_A, stable=True)
        sorted_A = expert_A[order_A]
        token_A = torch.where(sorted_A < num_experts, token_A[order_A], num_tokens)
        return cls(order_A, token_A, count_of(expert_A, num_experts + 1)[:num_experts])

    def gather(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The sorted rows ``[A, D]``; padding assignments read a zero row."""
        return torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[-1])])[self.token_A]

    def combine(self, x_TD: torch.Tensor, y_ND: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
        """``sum_k weight * y`` per token from outputs ``y_ND`` of the first N sorted assignments (N = A, or the
        non-padding ones); zero for tokens without assignments. Padding rows land in the dropped extra row."""
        n = y_ND.shape[0]
        y_ND = y_ND * weight_A[self.order_A[:n]].unsqueeze(-1).to(y_ND.dtype)
        out_TD = x_TD.new_zeros(x_TD.shape[0] + 1, x_TD.shape[-1]).index_add_(0, self.token_A[:n], y_ND)
        return out_TD[:-1]


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
        slots = SlotOrder.sort(token_A, expert_A, num_experts, x_TD.shape[0])
        extra_AX = None if extra_AX is None else extra_AX[slots.order_A]
        y_AD = run_experts(slots.gather(x_TD), slots.counts_E, extra_AX)
        return slots.combine(x_TD, y_AD, weight_A)
