"""Expert pools. A pool runs each of its experts on a contiguous slice of expert-sorted tokens.

Under expert parallelism a pool holds a :class:`Shard` of its experts: the ``rank``-th of ``size`` equal, contiguous
parts. Its per-expert matrices (``expert_parameters``, stacked along dim 0) then hold only those experts; small
per-expert scalars stay whole on every rank. ``num_experts`` is what this process holds, ``num_global_experts`` the
pool's size, ``first_expert`` the global index of the first expert held here.

# N tokens in a slice, D model dim, F expert hidden dim, E experts in the pool (held here)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from asymoe_train.moe.grouped import as_counts, grouped_applies, grouped_linear, per_expert


def mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate [F, D], up [F, D], down [D, F])`` of a dense SwiGLU MLP: separate gate_proj / up_proj (Llama, Qwen2,
    Mistral) or one fused gate_up_proj whose first F rows are the gate (Phi-3)."""
    if any(getattr(m, "bias", None) is not None for m in mlp.children()):
        raise ValueError(f"cannot upcycle {type(mlp).__name__}: its projections have biases; experts have none")
    if hasattr(mlp, "gate_up_proj"):
        gate_FD, up_FD = mlp.gate_up_proj.weight.chunk(2, dim=0)
    else:
        gate_FD, up_FD = mlp.gate_proj.weight, mlp.up_proj.weight
    return gate_FD, up_FD, mlp.down_proj.weight


@dataclass(frozen=True)
class Shard:
    """Which experts of every pool this process holds: the ``rank``-th of ``size`` equal contiguous parts."""

    rank: int = 0
    size: int = 1

    def local(self, num_experts: int) -> tuple[int, int]:
        """(global index of the first expert held here, experts held here) of a pool of ``num_experts``."""
        if num_experts % self.size:
            raise ValueError(f"{num_experts} experts cannot be split over {self.size} expert-parallel ranks")
        count = num_experts // self.size
        return self.rank * count, count


WHOLE = Shard()  # every expert: no expert parallelism


def mlp_segment(mlp: nn.Module, hidden: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate [H, D], up [H, D], down [D, H])``: the dense MLP as global expert ``expert`` of ``hidden`` units
    takes it. An expert w = H / F times as wide (w a whole number) repeats the F hidden units w times; a fine-grained
    expert (H = F / S) takes segment ``expert mod S``, hidden units [s H, (s + 1) H). The output projection is
    divided by w (multiplied by S), so a wider expert computes the MLP, and the mean of the S segment experts does
    too: MLP(x) = sum_s down_s h_s(x) = (1 / S) sum_s expert_s(x), the MoE output when the S segments of a token are
    all selected with equal combine weights (a router with equal logits over them)."""
    gate_FD, up_FD, down_DF = mlp_weights(mlp)
    f = gate_FD.shape[0]
    if hidden >= f:
        if hidden % f:
            raise ValueError(f"cannot upcycle: expert width {hidden} is not a multiple of the MLP's {f} hidden units")
        width = hidden // f
        return gate_FD.repeat(width, 1), up_FD.repeat(width, 1), down_DF.repeat(1, width) / width
    if f % hidden:
        raise ValueError(f"cannot upcycle: the MLP's {f} hidden units do not split into segments of {hidden}")
    segments = f // hidden
    rows = slice((expert % segments) * hidden, (expert % segments + 1) * hidden)
    return gate_FD[rows], up_FD[rows], down_DF[:, rows] * segments


@torch.no_grad()
def copy_mlp(gate_EFD: torch.Tensor, up_EFD: torch.Tensor, down_EDF: torch.Tensor, mlp: nn.Module,
             noise_std: float = 0.0, generator: torch.Generator | None = None, first_expert: int = 0,
             num_global_experts: int = 0) -> None:
    """Write a dense SwiGLU MLP (see :func:`mlp_weights`) into stacked expert weights, optionally with relative noise:
    each expert as :func:`mlp_segment` cuts it (whole, repeated, or one segment of the hidden units). Stacked
    weights that hold experts ``first_expert..`` of ``num_global_experts`` draw the noise of all of them and keep
    their own rows, so every expert-parallel layout gets the same experts."""
    hidden = gate_EFD.shape[1]
    sources = [mlp_segment(mlp, hidden, first_expert + e) for e in range(len(gate_EFD))]
    scales = [part.float().std() for part in mlp_segment(mlp, hidden, 0)]  # the same on every expert-parallel rank
    for i, target in enumerate((gate_EFD, up_EFD, down_EDF)):
        source = torch.stack([parts[i] for parts in sources])
        if target.shape != source.shape:
            raise ValueError(f"cannot upcycle: expert weight {tuple(target.shape[1:])} != MLP part "
                             f"{tuple(source.shape[1:])}")
        target.copy_(source)
        if noise_std > 0:
            shape = (max(num_global_experts, target.shape[0]), *target.shape[1:])
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)[first_expert : first_expert + len(target)]
            target.add_(noise.to(target) * noise_std * scales[i].to(target))


class SwiGLUExperts(nn.Module):
    """E SwiGLU FFN experts (the Llama MLP form), weights stacked as ``[E, out, in]`` like ``nn.Linear``;
    ``num_experts`` is the pool's size, of which ``shard`` says which this process holds. ``input_size`` (default:
    ``hidden_size``) is the width of the rows they read, e.g. ``2 * hidden_size`` for the paper-form evidence FFN
    over ``[h; Attn(h, c)]``; outputs are ``hidden_size`` wide."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu",
                 shard: Shard = WHOLE, input_size: int = 0):
        super().__init__()
        self.num_global_experts = num_experts
        self.first_expert, num_experts = shard.local(num_experts)
        self.num_experts = num_experts
        self.act_name = act
        self.act = ACT2FN[act]
        self.compute = "auto"  # model.moe.expert_compute: grouped GEMMs or the per-expert loop (moe.grouped)
        input_size = input_size or hidden_size
        self.gate_EFD = nn.Parameter(torch.empty(num_experts, intermediate_size, input_size))
        self.up_EFD = nn.Parameter(torch.empty(num_experts, intermediate_size, input_size))
        self.down_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        for weight in (self.gate_EFD, self.up_EFD, self.down_EDF):
            nn.init.normal_(weight, std=0.02)

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to its tokens."""
        h_NF = self.act(nn.functional.linear(x_ND, self.gate_EFD[e])) * nn.functional.linear(x_ND, self.up_EFD[e])
        return nn.functional.linear(h_NF, self.down_EDF[e])

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor | list[int]) -> torch.Tensor:
        """Tokens sorted by expert, ``counts_E[e]`` of them for expert e (rows after the last slice are ignored and
        give unspecified outputs); returns outputs in the same order."""
        if not grouped_applies(x_ND, self.gate_EFD, self.compute):
            return per_expert(self.expert, counts_E, x_ND)
        counts_E = as_counts(counts_E, x_ND.device)
        h_NF = self.act(grouped_linear(x_ND, self.gate_EFD, counts_E, self.compute)) * grouped_linear(
            x_ND, self.up_EFD, counts_E, self.compute)
        return grouped_linear(h_NF, self.down_EDF, counts_E, self.compute)

    def upcycle_from(self, mlp: nn.Module, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Copy a dense SwiGLU MLP (separate or fused gate/up) into every expert (sparse upcycling)."""
        copy_mlp(self.gate_EFD, self.up_EFD, self.down_EDF, mlp, noise_std, generator, self.first_expert,
                 self.num_global_experts)

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters split over expert-parallel ranks (dim 0 = the experts held here): all of them."""
        return self.named_parameters()

    def params_per_expert(self) -> int:
        """Parameters of one expert."""
        return (self.gate_EFD.numel() + self.up_EFD.numel() + self.down_EDF.numel()) // self.num_experts
