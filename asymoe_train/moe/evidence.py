"""Evidence-priority (EP) language experts.

Each EP expert = memory branch (a SwiGLU FFN, upcycled) + evidence branch (multi-head attention from a token to its
context: image tokens and prompt tokens strictly before it, never answer or future tokens), fused by a learnable gate
alpha = sigmoid(a). The evidence branch's output projection starts at zero, so a freshly upcycled expert equals the
FFN. Every evidence head also sees a learned null key with a zero value (an attention sink): the head-averaged
attention mass that lands on real context tokens instead of the sink is the token's evidence score s_evd in [0, 1].

The evidence attention is computed densely for all tokens before dispatch (``prepare``), so routing can add
beta * s_evd to the EP logits; each dispatched row then carries its attended context (the heads' outputs, before the
output projection) to its expert, which projects only the rows routed to it. Under expert
parallelism only the memory branches are split over ranks: s_evd averages the attention of every expert and must be
known where the token is routed, so the evidence branches (and the gates) stay whole on every rank, and a token's
evidence row travels with it to the rank that holds its expert.

# B sequences, T positions, D model dim, F FFN dim, E experts, H heads, C head dim, N dispatched rows
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from asymoe_train.moe.experts import WHOLE, Shard, SwiGLUExperts


@dataclass
class TokenContext:
    """Per-token structure an expert may need beyond its own hidden state (all data, built by the model)."""

    batch_shape: tuple[int, int]  # (B, T) of the flattened tokens
    context_BT: torch.Tensor  # True where a token is evidence others may attend to (image and prompt tokens)
    modality_BT: torch.Tensor


@dataclass
class EvidencePrep:
    """Dense evidence-branch results for all tokens, computed before routing."""

    evidence_ETD: torch.Tensor  # per expert attended context, heads concatenated (before the output projection)
    score_T: torch.Tensor  # s_evd in [0, 1], head- and expert-averaged mass on context


class EvidenceExperts(nn.Module):
    """E evidence-priority experts; same pool interface as :class:`SwiGLUExperts` plus ``prepare``, and the pool's
    forward takes each row's evidence output (from ``prepare``) with it. ``shard`` splits the memory branches."""

    needs_context = True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu",
                 num_heads: int = 4, alpha_init: float = 0.5, shard: Shard = WHOLE):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"evidence experts: hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.memory = SwiGLUExperts(num_experts, hidden_size, intermediate_size, act, shard)
        self.num_global_experts, self.first_expert = num_experts, self.memory.first_expert
        self.num_experts = self.memory.num_experts
        # q, k, v projections of every expert stacked: [E, 3, H*C, D]
        self.qkv_E3XD = nn.Parameter(torch.empty(num_experts, 3, hidden_size, hidden_size))
        nn.init.normal_(self.qkv_E3XD, std=hidden_size**-0.5)
        # zero output projection: a fresh expert is exactly its memory FFN
        self.out_EDX = nn.Parameter(torch.zeros(num_experts, hidden_size, hidden_size))
        self.null_key_EHC = nn.Parameter(torch.zeros(num_experts, num_heads, hidden_size // num_heads))
        # logit in plain Python: the model is also built on the meta device (parameter counting), where .item() fails
        self.gate_logit_E = nn.Parameter(torch.full((num_experts,), math.log(alpha_init / (1 - alpha_init))))

    @property
    def alpha_E(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit_E)

    def prepare(self, x_TD: torch.Tensor, ctx: TokenContext) -> EvidencePrep:
        """Evidence attention for every token and every expert of the pool, and the evidence score s_evd."""
        b, t = ctx.batch_shape
        d = x_TD.shape[-1]
        h, c = self.num_heads, d // self.num_heads
        x_BTD = x_TD.reshape(b, t, d)
        # allowed[b, i, j]: position j is context and strictly before i
        before_TT = torch.ones(t, t, dtype=torch.bool, device=x_TD.device).tril(-1)
        allowed_B1TT = (before_TT.unsqueeze(0) & ctx.context_BT.unsqueeze(1)).unsqueeze(1)
        outputs, scores = [], []
        for e in range(self.num_global_experts):
            qkv_BT3HC = nn.functional.linear(x_BTD, self.qkv_E3XD[e].flatten(0, 1)).unflatten(-1, (3, h, c))
            q, k, v = qkv_BT3HC.permute(2, 0, 3, 1, 4)  # each [B, H, T, C]
            logits_BHTT = (q @ k.transpose(-1, -2)).float() * c**-0.5
            logits_BHTT = logits_BHTT.masked_fill(~allowed_B1TT, float("-inf"))
            null_BHT1 = (q.float() * self.null_key_EHC[e].float()[None, :, None, :]).sum(-1, keepdim=True) * c**-0.5
            probs = torch.cat([logits_BHTT, null_BHT1], dim=-1).softmax(dim=-1)
            context_probs_BHTT = probs[..., :t]  # the null slot's value is zero: it only absorbs mass
            attended_BHTC = context_probs_BHTT.to(v.dtype) @ v
            outputs.append(attended_BHTC.transpose(1, 2).reshape(b * t, d))
            scores.append(context_probs_BHTT.sum(-1).mean(1).reshape(b * t))
        return EvidencePrep(torch.stack(outputs), torch.stack(scores).mean(0))

    def expert(self, e: int, x_ND: torch.Tensor, attended_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` (of those held here) on its tokens and their attended context (``EvidencePrep``): the output
        projection is applied here, to the rows routed to the expert only (it is linear, so it commutes with the
        dispatch)."""
        e_global = self.first_expert + e
        evidence_ND = nn.functional.linear(attended_ND, self.out_EDX[e_global])
        return self.memory.expert(e, x_ND) + self.alpha_E[e_global].to(x_ND.dtype) * evidence_ND

    def forward(self, x_ND: torch.Tensor, counts: list[int], evidence_ND: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, ``counts[e]`` of them for expert e, each with its attended context
        ``prep.evidence_ETD[expert, token]``; returns outputs in the same order."""
        outputs = []
        start = 0
        for e, count in enumerate(counts):
            rows = slice(start, start + count)
            outputs.append(self.expert(e, x_ND[rows], evidence_ND[rows]))
            start += count
        return torch.cat(outputs, dim=0)

    def upcycle_from(self, mlp: nn.Module, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """The memory branch copies the dense MLP; the evidence branch keeps its zero output projection. Its q, k, v
        projections are drawn again from ``generator`` when one is given, so an upcycled run is reproducible (the
        global RNG that built them is whatever state the process is in)."""
        self.memory.upcycle_from(mlp, noise_std, generator)
        if generator is not None:
            draw = torch.randn(self.qkv_E3XD.shape, generator=generator, dtype=torch.float32)
            self.qkv_E3XD.data.copy_(draw * self.qkv_E3XD.shape[-1] ** -0.5)

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters split over expert-parallel ranks (dim 0 = the experts held here): the memory branches."""
        return self.memory.named_parameters(prefix="memory")

    def params_per_expert(self) -> int:
        whole = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("memory."))
        return self.memory.params_per_expert() + whole // self.num_global_experts
