"""One grouped expert matmul for every pool: rows sorted by expert, ``counts_E[e]`` rows for expert e, each slice
multiplied by its expert's weight.

Two implementations of the same maths:

* ``grouped``: one ``torch._grouped_mm`` call (CUTLASS grouped GEMM on CUDA, bf16 or fp32) with the slice offsets
  computed on the device, so the expert counts never reach the host;
* ``loop``: one ``nn.functional.linear`` per expert on host-side slices (``counts_E.tolist()``): the reference the
  tests pin the grouped path against, and the fallback where ``torch._grouped_mm`` does not apply (its operands need
  16-byte aligned rows; other dtypes).

``model.moe.expert_compute`` picks one: ``auto`` (grouped for bf16 on CUDA, the CUTLASS kernel's case; the loop
elsewhere: on CPU the loop is as fast and the host already holds the data), ``grouped`` (wherever the operands allow
it, fp32 included, e.g. to test it on CPU) or ``loop``.

Rows after the last expert's slice (``sum(counts_E) < N``: assignments of tokens no expert serves) are outside every
group: the kernel leaves their outputs, and the gradients of their inputs, unwritten, and callers discard them
(:class:`asymoe_train.moe.dispatch.SlotOrder`). Where parameters act on rows between two matmuls (hyperbolic experts'
biases and scales, evidence gates), pass ``valid_N1``: those rows' inputs and outputs are then zeroed, so nothing
unwritten reaches a parameter's gradient.

# N rows (sorted by expert), I input dim, O output dim, E experts
"""

from __future__ import annotations

import torch
from torch import nn

from asymoe_train.config.names import EXPERT_COMPUTE_MODES as COMPUTE_MODES

# dtypes torch._grouped_mm takes (fp32 on CUDA through its fallback kernel; fp16 only where CUTLASS has it)
_GROUPED_DTYPES = (torch.bfloat16, torch.float32)


def grouped_applies(x_NI: torch.Tensor, weight_EOI: torch.Tensor, mode: str) -> bool:
    """Whether ``mode`` runs the grouped kernel for these operands."""
    if mode not in COMPUTE_MODES:
        raise ValueError(f"unknown expert compute {mode!r}; expected one of {list(COMPUTE_MODES)} "
                         "(model.moe.expert_compute)")
    if not counts_on_device(x_NI, mode):
        return False
    size = x_NI.element_size()
    return (hasattr(torch, "_grouped_mm") and x_NI.dtype in _GROUPED_DTYPES
            and (x_NI.shape[-1] * size) % 16 == 0 and (weight_EOI.shape[1] * size) % 16 == 0)


def counts_on_device(x: torch.Tensor, mode: str) -> bool:
    """Whether ``mode`` keeps expert counts on the device for tensors like ``x`` (the grouped path), so callers
    must not read them on the host either."""
    return mode == "grouped" or (mode == "auto" and x.device.type == "cuda" and x.dtype == torch.bfloat16)


def count_of(index_N: torch.Tensor, num_bins: int, weight_N: torch.Tensor | None = None) -> torch.Tensor:
    """``bincount(index_N, weight_N, minlength=num_bins)`` as a long tensor without a host read (CUDA's bincount
    reads the maximum index to size its output); indices must lie in ``[0, num_bins)``."""
    ones_N = torch.ones_like(index_N) if weight_N is None else weight_N.to(index_N.dtype)
    return torch.zeros(num_bins, dtype=index_N.dtype, device=index_N.device).scatter_add_(0, index_N, ones_N)


def expert_of_rows(counts_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The expert of each sorted row ``[N]`` (``len(counts_E)`` for rows after the last slice), on the device:
    ``searchsorted`` over the slice ends needs no host read (``repeat_interleave`` would)."""
    ends_E = counts_E.cumsum(0)
    rows_N = torch.arange(num_rows, device=counts_E.device, dtype=ends_E.dtype)
    return torch.searchsorted(ends_E, rows_N, right=True)


def row_experts(counts_E: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the expert of each sorted row ``[N]``, the last one for rows after the last slice; ``[N, 1]`` True for rows
    inside a slice), from one :func:`expert_of_rows`: what per-row gathers and ``valid_N1`` take."""
    expert_N = expert_of_rows(counts_E, num_rows)
    return expert_N.clamp_max(len(counts_E) - 1), (expert_N < len(counts_E)).unsqueeze(-1)


def grouped_linear(x_NI: torch.Tensor, weight_EOI: torch.Tensor, counts_E: torch.Tensor, mode: str = "auto",
                   valid_N1: torch.Tensor | None = None) -> torch.Tensor:
    """``x[rows of e] @ weight[e].T`` for every expert e, weights stacked ``[E, O, I]`` like ``nn.Linear``; returns
    ``[N, O]`` in the sorted order. The matmul runs in ``x``'s dtype (the weight is cast to it, as autocast would),
    accumulating in fp32. ``valid_N1`` (:func:`row_experts`): zero the rows after the last slice on the way in and
    out (module doc)."""
    weight_EOI = weight_EOI.to(x_NI.dtype)
    if grouped_applies(x_NI, weight_EOI, mode):
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        if valid_N1 is not None:
            x_NI = torch.where(valid_N1, x_NI, 0)
        # [E, I, O] as a transposed view: the kernel reads the nn.Linear layout without a copy
        y_NO = torch._grouped_mm(x_NI.contiguous(), weight_EOI.transpose(-2, -1), offs=offsets_E)
        return y_NO if valid_N1 is None else torch.where(valid_N1, y_NO, 0)
    return loop_linear(x_NI, weight_EOI, counts_E.tolist())


def per_expert(fn, counts: torch.Tensor | list[int], x_ND: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
    """The reference loop every pool shares: ``fn(e, x[rows of e], *(r[rows of e] for r in rows))`` per expert on
    host-side slices, concatenated; rows after the last slice get zeros. Returns ``[N, D]``."""
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    outputs, start = [], 0
    for e, count in enumerate(counts):
        # Zero-row experts still run (on an empty slice) so every rank executes the same graph.
        part = slice(start, start + count)
        outputs.append(fn(e, x_ND[part], *(r[part] for r in rows)))
        start += count
    if start < x_ND.shape[0]:
        outputs.append(outputs[-1].new_zeros(x_ND.shape[0] - start, *outputs[-1].shape[1:]))
    return torch.cat(outputs, dim=0)


def as_counts(counts: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    """Expert counts as a long tensor on ``device`` (callers may pass a host list)."""
    return torch.as_tensor(counts, dtype=torch.long, device=device)


def loop_linear(x_NI: torch.Tensor, weight_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The per-expert reference of :func:`grouped_linear` with host counts; rows after the last slice get zeros."""
    return per_expert(lambda e, x: nn.functional.linear(x, weight_EOI[e]), counts, x_NI)
