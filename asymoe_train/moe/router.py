"""Top-k router with fp32 logits and softmax, renormalised top-k weights, and its auxiliary losses.

# N tokens this router serves, D model dim, R experts it can reach, K top-k
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from asymoe_train.moe.grouped import count_of


@dataclass
class Routing:
    """One router's decision for its tokens."""

    weights_NK: torch.Tensor  # renormalised top-k weights (fp32)
    experts_NK: torch.Tensor  # router-local expert index in [0, R)
    probs_NR: torch.Tensor  # full softmax (fp32)
    logits_NR: torch.Tensor  # fp32


class TopKRouter(nn.Module):
    """Linear router without bias; no noise, so training and eval route identically."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02):
        super().__init__()
        self.top_k = top_k
        self.weight_RD = nn.Parameter(torch.zeros(num_experts, hidden_size))
        if init_std > 0:
            nn.init.normal_(self.weight_RD, std=init_std)

    def forward(self, x_ND: torch.Tensor, bias_NR: torch.Tensor | None = None) -> Routing:
        """Route tokens; ``bias_NR`` is added to the logits (e.g. beta * s_evd on evidence experts)."""
        # fp32 logits and softmax: bf16 logits make near-ties flip between steps and destabilise routing.
        logits_NR = nn.functional.linear(x_ND.float(), self.weight_RD.float())
        if bias_NR is not None:
            logits_NR = logits_NR + bias_NR
        probs_NR = logits_NR.softmax(dim=-1)
        top_NK, experts_NK = probs_NR.topk(self.top_k, dim=-1)
        weights_NK = top_NK / top_NK.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        return Routing(weights_NK, experts_NK, probs_NR, logits_NR)


def balance_loss(routing: Routing) -> torch.Tensor:
    """Switch-style load-balancing loss R * sum_i f_i * P_i over this router's tokens and reachable experts.

    f_i is the fraction of top-k assignments that go to expert i, P_i the mean router probability of expert i.
    Equals 1 under perfectly uniform routing. A router with no tokens contributes 0 (still a graph node).
    """
    num_tokens, num_experts = routing.probs_NR.shape
    counts_R = count_of(routing.experts_NK.reshape(-1), num_experts)
    return balance_from_stats(counts_R, routing.probs_NR.sum(dim=0), num_tokens, routing.experts_NK.shape[-1])


def balance_from_stats(counts_R: torch.Tensor, prob_sum_R: torch.Tensor, num_tokens: int | torch.Tensor,
                       top_k: int) -> torch.Tensor:
    """The balance loss of :func:`balance_loss` from a router's statistics: top-k assignments per expert
    (``counts_R``, no gradient: f is a count), router probabilities summed over the tokens (``prob_sum_R``, carries
    the gradient) and the number of tokens (an int, or a device tensor: nothing is read on the host). Sums of these
    over data-parallel ranks give the loss of the global batch.
    """
    denom = num_tokens.clamp_min(1).float() if isinstance(num_tokens, torch.Tensor) else max(num_tokens, 1)
    f_R = counts_R.float() / (denom * top_k)
    p_R = prob_sum_R / denom
    return counts_R.shape[0] * (f_R * p_R).sum()


def z_loss(routing: Routing, served_N: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-sum-exp of the logits over the tokens (those ``served_N`` marks, if
    given; 0 without any); keeps logits small."""
    lse_sq_N = torch.logsumexp(routing.logits_NR, dim=-1).square()
    if served_N is None:
        return lse_sq_N.sum() / max(lse_sq_N.shape[0], 1)
    return (lse_sq_N * served_N.float()).sum() / served_N.sum().clamp_min(1).float()
