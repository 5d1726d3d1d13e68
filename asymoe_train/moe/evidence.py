"""Evidence-priority (EP) language experts, in two forms (``model.moe.evidence.form``).

Both have a memory branch (a SwiGLU FFN, upcycled) and an evidence branch that starts from multi-head attention from
a token to its context, Attn(h, c): image tokens and prompt tokens strictly before it, never answer or future tokens.
Every evidence head also sees a learned null key with a zero value (an attention sink), so a token with no context
attends to nothing (a zero vector) instead of an undefined softmax.

* ``additive`` (our first reading of the method): E(h) = FFN(h) + alpha * W_o Attn(h, c), one learnable
  alpha = sigmoid(a) per expert; W_o starts at zero, so a freshly upcycled expert equals the FFN.
* ``paper`` (AsyMoE, ICMR 2026, eqs. 7-9): E(h) = alpha(h) * FFN(h) + (1 - alpha(h)) * FFN_evd([h; Attn(h, c)]),
  a per-token gate alpha(h) = sigmoid(w_a . h + b_a) and an evidence FFN of the backbone's MLP form (W3 = gate and
  up projections over the 2D-wide concatenation, W4 = down projection). Upcycling copies the dense FFN into both
  FFNs, with zeros on W3's context half, so F_evd(h, c) = FFN(h) at init and the expert equals the dense FFN
  exactly whatever the gate says; w_a starts at zero and b_a at logit(alpha_init), so the gate trains from the
  first step (a gate pinned near 1 by a large b_a would have a vanishing gradient).

The evidence score s_evd (``model.moe.evidence.score``) biases the router logits of the EP experts:
``attention_mass``, the head-averaged attention mass that lands on real context tokens instead of the sink (a
read-out in [0, 1]), or ``learned``, sigmoid(w_evd . Attn(h, c)) (eq. 20; averaged over the pool's experts, w_evd
zero at init, trained through the router).

The evidence attention is computed for all tokens before dispatch (``prepare``), so routing can add beta * s_evd to
the EP logits. It runs as one fused ``scaled_dot_product_attention`` over every expert's heads, with the null key as
one extra key position, so no B x H x T x T probability tensor is formed; the attention mass comes out of the same
kernel: the null slot's value carries a 1 in one extra value channel (zeros elsewhere), so that channel of the
output is the null slot's probability, and the mass = 1 - its head mean. Queries and keys get zero channels up to
that width, which leaves their dot products unchanged (the tests pin it to the dense computation with explicit
probabilities). Each dispatched row then carries its attended context (the heads' outputs) to its expert, which
applies the rest of the evidence branch to the rows routed to it only. Under expert parallelism the per-expert
matrices that act after dispatch (memory FFNs; paper form: evidence FFNs) are split over ranks; the attention (and
the small gate and score vectors) stay whole on every rank, since s_evd must be known where the token is routed,
and a token's evidence row travels with it to the rank that holds its expert.

# B sequences, T positions, D model dim, F FFN dim, E experts, H heads, C head dim, N dispatched rows
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from asymoe_train.config.names import EVIDENCE_FORMS, EVIDENCE_SCORES
from asymoe_train.moe.experts import WHOLE, Shard, SwiGLUExperts
from asymoe_train.moe.grouped import (
    as_counts,
    grouped_applies,
    grouped_linear,
    per_expert,
    row_experts,
)


@dataclass
class TokenContext:
    """Per-token structure an expert may need beyond its own hidden state (all data, built by the model)."""

    batch_shape: tuple[int, int]  # (B, T) of the flattened tokens
    context_BT: torch.Tensor  # True where a token is evidence others may attend to (image and prompt tokens)
    modality_BT: torch.Tensor
    # packed rows (asymoe_train.data.batch): the sequence of each position (-1: padding), and how many sequences;
    # None: one sequence per row
    segment_BT: torch.Tensor | None = None
    num_sequences: int = 0
    # tokens per row and modality code (B lists of ints), host data: lets evidence experts ask queries only for the
    # tokens whose routers reach them without reading anything from the device; None: every token asks
    modality_counts: list[list[int]] | None = None

    def query_positions(self, codes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``[B, Q]`` positions and whether each is one of the row's tokens of modalities ``codes``: per row, those
        tokens first (in order), then fillers up to Q, the most any row has (host arithmetic). None when every token
        should ask (no counts or codes, or a row that needs them all)."""
        if self.modality_counts is None or not codes:
            return None
        num_queries = max(sum(row[code] for code in codes) for row in self.modality_counts)
        if num_queries >= self.batch_shape[1]:
            return None
        wanted_BT = self.modality_BT == codes[0]
        for code in codes[1:]:
            wanted_BT = wanted_BT | (self.modality_BT == code)
        # stable sort on "not wanted": each row's wanted positions first, in order
        pos_BQ = torch.argsort((~wanted_BT).to(torch.int8), dim=-1, stable=True)[:, :max(num_queries, 1)]
        return pos_BQ, wanted_BT.gather(1, pos_BQ)

    def same_sequence(self) -> torch.Tensor | None:
        """``[B, 1, T, T]``: True where query i and key j belong to one sequence; None without packing."""
        if self.segment_BT is None:
            return None
        return (self.segment_BT.unsqueeze(-1) == self.segment_BT.unsqueeze(1)).unsqueeze(1)

    def sequences(self) -> tuple[torch.Tensor, int]:
        """(the sequence of each position ``[B, T]``, -1 for padding where packed; the number of sequences)."""
        if self.segment_BT is not None:
            return self.segment_BT, self.num_sequences
        b, t = self.batch_shape
        return torch.arange(b, device=self.modality_BT.device)[:, None].expand(b, t), b


@dataclass
class EvidencePrep:
    """Dense evidence-branch results for all tokens, computed before routing."""

    evidence_ETD: torch.Tensor  # per expert attended context Attn(h, c), heads concatenated
    score_T: torch.Tensor  # s_evd in [0, 1] (attention mass, or learned: with gradient)


class EvidenceExperts(nn.Module):
    """E evidence-priority experts; same pool interface as :class:`SwiGLUExperts` plus ``prepare``, and the pool's
    forward takes each row's evidence output (from ``prepare``) with it. ``shard`` splits the memory branches."""

    needs_context = True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu",
                 num_heads: int = 4, alpha_init: float = 0.5, shard: Shard = WHOLE, form: str = "additive",
                 score: str = "attention_mass"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"evidence experts: hidden size {hidden_size} is not divisible by {num_heads} heads")
        if form not in EVIDENCE_FORMS or score not in EVIDENCE_SCORES:
            raise ValueError(f"evidence experts: form {form!r} / score {score!r}; expected one of "
                             f"{list(EVIDENCE_FORMS)} / {list(EVIDENCE_SCORES)}")
        self.num_heads, self.form, self.score = num_heads, form, score
        self.compute = "auto"  # model.moe.expert_compute (moe.grouped); the memory branch follows it
        self.memory = SwiGLUExperts(num_experts, hidden_size, intermediate_size, act, shard)
        self.num_global_experts, self.first_expert = num_experts, self.memory.first_expert
        self.num_experts = self.memory.num_experts
        # q, k, v projections of every expert stacked: [E, 3, H*C, D]
        self.qkv_E3XD = nn.Parameter(torch.empty(num_experts, 3, hidden_size, hidden_size))
        nn.init.normal_(self.qkv_E3XD, std=hidden_size**-0.5)
        self.null_key_EHC = nn.Parameter(torch.zeros(num_experts, num_heads, hidden_size // num_heads))
        # logit in plain Python: the model is also built on the meta device (parameter counting), where .item() fails
        gate_logit = math.log(alpha_init / (1 - alpha_init))
        if form == "additive":
            # zero output projection: a fresh expert is exactly its memory FFN
            self.out_EDX = nn.Parameter(torch.zeros(num_experts, hidden_size, hidden_size))
            self.gate_logit_E = nn.Parameter(torch.full((num_experts,), gate_logit))
        else:
            # W3 (gate and up over [h; Attn(h, c)]) and W4 (down): split over expert-parallel ranks like the memory
            self.evidence_ffn = SwiGLUExperts(num_experts, hidden_size, intermediate_size, act, shard,
                                              input_size=2 * hidden_size)
            # the per-token gate alpha(h) = sigmoid(w_a . h + b_a), whole on every rank (small)
            self.gate_weight_ED = nn.Parameter(torch.zeros(num_experts, hidden_size))
            self.gate_bias_E = nn.Parameter(torch.full((num_experts,), gate_logit))
        if score == "learned":
            self.score_weight_ED = nn.Parameter(torch.zeros(num_experts, hidden_size))  # w_evd per expert

    @property
    def alpha_E(self) -> torch.Tensor:
        """The additive form's gate per expert (the paper form's is per token: :meth:`token_alpha`)."""
        return torch.sigmoid(self.gate_logit_E)

    def token_alpha(self, x_ND: torch.Tensor, expert_N: torch.Tensor | int) -> torch.Tensor:
        """The paper form's gate alpha(h) ``[N, 1]`` (fp32) of rows ``x_ND`` for (global) experts ``expert_N``."""
        weight_ND = self.gate_weight_ED[expert_N].float()
        return torch.sigmoid((x_ND.float() * weight_ND).sum(-1, keepdim=True) + self.gate_bias_E[expert_N, None].float())

    def mean_alpha(self, x_TD: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
        """Per expert, the gate alpha (additive form), or its mean over the tokens ``mask_T`` marks (paper form),
        detached ``[E]``: for logging."""
        if self.form == "additive":
            return self.alpha_E.detach()
        with torch.no_grad():
            logit_TE = x_TD.float() @ self.gate_weight_ED.float().T + self.gate_bias_E.float()
            mask_T1 = mask_T.float().unsqueeze(-1)
            return (torch.sigmoid(logit_TE) * mask_T1).sum(0) / mask_T1.sum().clamp_min(1)

    def prepare(self, x_TD: torch.Tensor, ctx: TokenContext, query_codes: tuple[int, ...] = ()) -> EvidencePrep:
        """Evidence attention for every token and every expert of the pool, and the evidence score s_evd (module
        doc: one fused attention call, the null slot's probability read from an extra value channel).

        ``query_codes``: the modalities whose routers reach this pool. With the batch's per-row modality counts
        (``ctx.modality_counts``, host data) only those tokens ask queries: each row's are gathered into the
        first Q query slots (Q: the most any row has), and the others get zero rows and s_evd 0, which nothing
        reads (their routers do not reach the pool)."""
        b, t = ctx.batch_shape
        d = x_TD.shape[-1]
        e, h, c = self.num_global_experts, self.num_heads, d // self.num_heads
        x_BTD = x_TD.reshape(b, t, d)
        weight_3XD = self.qkv_E3XD.transpose(0, 1).flatten(1, 2).to(x_TD.dtype)  # [3, E*H*C, D]
        # k, v of every expert in one matmul: [B, T, 2, E*H, C] -> each [B, E*H, T, C]
        k, v = nn.functional.linear(x_BTD, weight_3XD[1:].flatten(0, 1)).unflatten(-1, (2, e * h, c)).permute(
            2, 0, 3, 1, 4)
        queries = ctx.query_positions(query_codes)
        pos_BQ = None if queries is None else queries[0]
        x_BQD = x_BTD if pos_BQ is None else x_BTD.gather(1, pos_BQ.unsqueeze(-1).expand(-1, -1, d))
        q = nn.functional.linear(x_BQD, weight_3XD[0]).unflatten(-1, (e * h, c)).transpose(1, 2)  # [B, E*H, Q, C]
        # Extra channels (a multiple of 8 keeps the fused kernels' alignment), and key positions: the null slot at T,
        # then masked-out keys up to a multiple of 8 (the mask's rows stay aligned).
        pad, s = 8, -(-(t + 1) // 8) * 8
        null_k = self.null_key_EHC.reshape(1, e * h, 1, c).to(q.dtype).expand(b, -1, -1, -1)
        q = nn.functional.pad(q, (0, pad))
        k = nn.functional.pad(torch.cat([k, null_k], dim=2), (0, pad, 0, s - t - 1))
        v = nn.functional.pad(v, (0, pad, 0, s - t))
        v[:, :, t, c] = 1  # the null slot's value: zero but for the channel that reads out its probability
        # allowed[b, i, j]: key j is context strictly before query i, or the null slot (always)
        before_TT = torch.ones(t, t, dtype=torch.bool, device=x_TD.device).tril(-1)
        allowed_B1TT = (before_TT.unsqueeze(0) & ctx.context_BT.unsqueeze(1)).unsqueeze(1)
        same_B1TT = ctx.same_sequence()
        if same_B1TT is not None:  # packed rows: never another sequence's tokens
            allowed_B1TT = allowed_B1TT & same_B1TT
        allowed_B1TS = nn.functional.pad(allowed_B1TT, (0, s - t), value=False)
        allowed_B1TS[..., t] = True
        if pos_BQ is not None:
            allowed_B1TS = allowed_B1TS.gather(2, pos_BQ[:, None, :, None].expand(-1, -1, -1, s))
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed_B1TS, scale=c**-0.5)
        attended_EBQD = out[..., :c].unflatten(1, (e, h)).permute(1, 0, 3, 2, 4).flatten(3)
        if self.score == "learned":  # sigmoid(w_evd . Attn(h, c)), averaged over the pool's experts; fp32 (small)
            logit_BQ = torch.einsum("ebqd,ed->bq", attended_EBQD.float(), self.score_weight_ED.float())
            score_BQ = torch.sigmoid(logit_BQ / e)
        else:
            score_BQ = 1 - out[..., c].float().mean(1)  # mean over every expert's heads
        if pos_BQ is not None:  # back to token positions; fillers and tokens that asked no query get zeros
            wanted_BQ = queries[1]
            attended_EBQD = attended_EBQD.new_zeros(e, b, t, d).scatter(
                2, pos_BQ[None, :, :, None].expand(e, -1, -1, d), attended_EBQD * wanted_BQ[None, :, :, None])
            score_BQ = score_BQ.new_zeros(b, t).scatter(1, pos_BQ, score_BQ * wanted_BQ)
        return EvidencePrep(attended_EBQD.reshape(e, b * t, d), score_BQ.reshape(b * t))

    def expert(self, e: int, x_ND: torch.Tensor, attended_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` (of those held here) on its tokens and their attended context (``EvidencePrep``): the rest
        of the evidence branch is applied here, to the rows routed to the expert only (the per-expert reference)."""
        e_global = self.first_expert + e
        memory_ND = self.memory.expert(e, x_ND)
        if self.form == "additive":
            evidence_ND = nn.functional.linear(attended_ND.to(x_ND.dtype), self.out_EDX[e_global])
            return memory_ND + self.alpha_E[e_global].to(x_ND.dtype) * evidence_ND
        evidence_ND = self.evidence_ffn.expert(e, torch.cat([x_ND, attended_ND.to(x_ND.dtype)], dim=-1))
        alpha_N1 = self.token_alpha(x_ND, e_global).to(x_ND.dtype)
        return alpha_N1 * memory_ND + (1 - alpha_N1) * evidence_ND

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor | list[int],
                evidence_ND: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, ``counts_E[e]`` of them for expert e, each with its attended context
        ``prep.evidence_ETD[expert, token]``; returns outputs in the same order (rows after the last slice give
        unspecified outputs)."""
        held = slice(self.first_expert, self.first_expert + self.num_experts)
        first = self.out_EDX[held] if self.form == "additive" else self.evidence_ffn.gate_EFD
        if not grouped_applies(x_ND, first, self.compute):
            return per_expert(self.expert, counts_E, x_ND, evidence_ND)
        counts_E = as_counts(counts_E, x_ND.device)
        expert_N, valid_N1 = row_experts(counts_E, x_ND.shape[0])
        if self.form == "additive":
            evidence_ND = grouped_linear(evidence_ND.to(x_ND.dtype), first, counts_E, self.compute,
                                         valid_N1=valid_N1)
            alpha_N1 = self.alpha_E[held][expert_N].unsqueeze(-1).to(x_ND.dtype)
            return self.memory(x_ND, counts_E) + alpha_N1 * evidence_ND
        # rows after the last slice are zeroed around the gate, which acts between matmuls (moe.grouped)
        x_ND = torch.where(valid_N1, x_ND, 0)
        concat_N2D = torch.cat([x_ND, evidence_ND.to(x_ND.dtype)], dim=-1)
        memory_ND = torch.where(valid_N1, self.memory(x_ND, counts_E), 0)
        evidence_ND = torch.where(valid_N1, self.evidence_ffn(concat_N2D, counts_E), 0)
        alpha_N1 = self.token_alpha(x_ND, self.first_expert + expert_N).to(x_ND.dtype)
        return alpha_N1 * memory_ND + (1 - alpha_N1) * evidence_ND

    @torch.no_grad()
    def upcycle_from(self, mlp: nn.Module, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """The memory branch copies the dense MLP. Additive form: the evidence branch keeps its zero output
        projection. Paper form: the evidence FFN copies the memory FFN (noise included) on the h half of W3, zeros
        on its context half, and W4 = the down projection, so F_evd(h, c) = FFN(h); the gate keeps w_a = 0,
        b_a = logit(alpha_init) (module doc). The q, k, v projections are drawn again from ``generator`` when one
        is given, so an upcycled run is reproducible (the global RNG that built them is whatever state the process
        is in)."""
        self.memory.upcycle_from(mlp, noise_std, generator)
        if self.form == "paper":
            ffn, d = self.evidence_ffn, self.memory.gate_EFD.shape[-1]
            for target, source in ((ffn.gate_EFD, self.memory.gate_EFD), (ffn.up_EFD, self.memory.up_EFD)):
                target.zero_()
                target[..., :d] = source
            ffn.down_EDF.copy_(self.memory.down_EDF)
        if generator is not None:
            draw = torch.randn(self.qkv_E3XD.shape, generator=generator, dtype=torch.float32)
            self.qkv_E3XD.data.copy_(draw * self.qkv_E3XD.shape[-1] ** -0.5)

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters split over expert-parallel ranks (dim 0 = the experts held here): the memory branches and
        (paper form) the evidence FFNs."""
        yield from self.memory.named_parameters(prefix="memory")
        if self.form == "paper":
            yield from self.evidence_ffn.named_parameters(prefix="evidence_ffn")

    def params_per_expert(self) -> int:
        split = dict(self.expert_parameters())
        whole = sum(p.numel() for n, p in self.named_parameters() if n not in split)
        return sum(p.numel() for p in split.values()) // self.num_experts + whole // self.num_global_experts
