"""Token dispatch: route (token, expert, weight) assignments to experts and combine the outputs.

# T tokens, D model dim, A assignments (tokens x top-k), E experts in the block
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (expert-sorted rows, rows per expert, token index of each row) -> outputs in the same order
RunExperts = Callable[[torch.Tensor, list[int], torch.Tensor], torch.Tensor]


class LocalDispatcher:
    """Dropless single-device dispatch: sort assignments by expert, run each expert on a contiguous slice,
    scatter-add the weighted outputs back to their tokens."""

    def __call__(
        self,
        x_TD: torch.Tensor,
        token_A: torch.Tensor,
        expert_A: torch.Tensor,
        weight_A: torch.Tensor,
        num_experts: int,
        run_experts: RunExperts,
    ) -> torch.Tensor:
        order_A = torch.argsort(expert_A, stable=True)
        token_sorted_A = token_A[order_A]
        counts_E = torch.bincount(expert_A, minlength=num_experts)
        y_AD = run_experts(x_TD[token_sorted_A], counts_E.tolist(), token_sorted_A)
        y_AD = y_AD * weight_A[order_A].unsqueeze(-1).to(y_AD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_sorted_A, y_AD)
