"""Expert parallelism: DeepSpeed's expert groups, the dropless all-to-all token dispatcher, the global gradient norm
(every expert counted once, for clipping and logging), and the collectives that consolidate experts for checkpoints.

Groups. ``engine.ep_size = S`` cuts the world into expert-parallel groups of S consecutive ranks, which exchange
tokens, and expert-data-parallel groups of the ranks that hold the same experts (r, r + S, r + 2S, ...), over which
expert gradients are reduced: DeepSpeed's ``ep_size_S`` groups (``deepspeed.utils.groups``), created here with their
own, short collective timeout (``engine.ep_timeout_s``).

Dispatch (per MoE block and step, on every rank of a group, whatever its tokens):

1. sort this rank's assignments by slot (rank-major, see ``asymoe_train.moe.dispatch``) and all-to-all the number
   of rows for each slot, so every rank learns how many rows it receives from each rank for each of its experts;
2. all-to-all the rows (token hidden state, plus the evidence row for evidence experts) with those variable split
   sizes; the exchange is differentiable (its backward is the reverse exchange);
3. regroup the received rows by local expert, run the local experts on contiguous slices, restore the order;
4. all-to-all the outputs back, weight them and add them to their tokens.

Sizes are exchanged before data, so no buffer is ever padded or truncated: nothing is dropped, and uneven or zero
token counts per rank, per modality or per expert cannot mismatch a collective. A collective that fails (a rank that
skipped a layer, a dead peer, the timeout) raises naming the rank and the layer.

# T tokens, D model dim, A assignments, E slots (experts of the block), S expert-parallel size, L experts held here,
# R rows received, X row width (D, or 2D with evidence rows)
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asymoe_train.config.schema import EngineConfig
from asymoe_train.moe.dispatch import RunExperts, SlotOrder


@dataclass
class ExpertParallel:
    """This rank's place in the expert-parallel layout."""

    size: int  # ranks per expert-parallel group (engine.ep_size)
    rank: int  # rank within its expert-parallel group: which share of every pool's experts it holds
    replica: int  # rank within its expert-data-parallel group: which copy of those experts
    name: str  # DeepSpeed's group name, also the ``group_name`` of expert parameters
    group: dist.ProcessGroup  # expert-parallel group (token exchange)
    data_group: dist.ProcessGroup  # expert-data-parallel group (expert gradient reduction)


@contextlib.contextmanager
def _default_timeout(seconds: int) -> Iterator[None]:
    """Groups created inside take this collective timeout: ``new_group`` without one reads torch's module defaults,
    which DeepSpeed's group helpers never pass."""
    c10d = dist.distributed_c10d
    saved = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    timeout = datetime.timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout
    if isinstance(saved[1], datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    try:
        yield
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved


def init_expert_parallel(engine: EngineConfig) -> ExpertParallel | None:
    """DeepSpeed's expert-parallel and expert-data-parallel groups of ``engine.ep_size`` (None for 1). Every rank
    calls this once, after :func:`asymoe_train.distributed.engine.init_distributed`."""
    if engine.ep_size == 1:
        return None
    from deepspeed.utils import groups

    name = f"ep_size_{engine.ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        with _default_timeout(engine.ep_timeout_s):
            groups._create_expert_and_data_parallel(engine.ep_size)
    group = groups._get_expert_parallel_group(name)
    data_group = groups._get_expert_data_parallel_group(name)
    return ExpertParallel(engine.ep_size, dist.get_rank(group), dist.get_rank(data_group), name, group, data_group)


def mark_expert_parameters(params: Iterable[torch.nn.Parameter], ep: ExpertParallel) -> None:
    """Tag parameters the way DeepSpeed recognises MoE parameters (``allreduce=False`` and their group's name):
    DeepSpeed then broadcasts them and reduces their gradients over the expert-data-parallel group only, and
    ``split_params_into_different_moe_groups_for_optimizer`` puts them in their own optimizer groups."""
    for param in params:
        param.allreduce = False
        param.group_name = ep.name


def is_expert_parameter(param: torch.nn.Parameter) -> bool:
    """Tagged by :func:`mark_expert_parameters` (DeepSpeed's ``is_moe_param``)."""
    return getattr(param, "allreduce", True) is False


def grad_norm(params: Iterable[torch.nn.Parameter], ep: ExpertParallel | None) -> torch.Tensor:
    """The L2 norm of the model's gradients, after their reduction over ranks, that one process without expert
    parallelism would compute: replicated parameters counted once (their reduced gradients are equal on every rank)
    and every expert once (the squared norms of the experts held here are summed over the expert-parallel group; the
    other groups hold copies of them).

    DeepSpeed's ZeRO-0 clipping instead averages each rank's own norm over the data-parallel group, and a rank's norm
    holds only its own experts: mean_r sqrt(dense^2 + experts_r^2), not sqrt(dense^2 + sum_r experts_r^2). (ZeRO-1/2
    sum the squares of each rank's gradient partitions over all ranks, which counts every expert once already.)
    """
    params = list(params)
    device = params[0].device if params else torch.device("cpu")  # the gradients' device is the backend's
    dense_sq, experts_sq = [torch.zeros((), device=device)], [torch.zeros((), device=device)]
    for p in params:
        if p.grad is not None:
            square = torch.linalg.vector_norm(p.grad.detach().float()).square()
            (experts_sq if ep is not None and is_expert_parameter(p) else dense_sq).append(square)
    dense_sq, experts_sq = torch.stack(dense_sq).sum(), torch.stack(experts_sq).sum()
    if ep is not None:
        dist.all_reduce(experts_sq, group=ep.group)  # every rank of the group, whatever its gradients
    return (dense_sq + experts_sq).sqrt()


def _all_to_all(x: torch.Tensor, recv_splits: list[int], send_splits: list[int], ep: ExpertParallel,
                what: str) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    try:
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=ep.group)
    except RuntimeError as exn:  # gloo/NCCL errors and timeouts (DistBackendError is a RuntimeError)
        raise RuntimeError(
            f"rank {dist.get_rank()} (expert-parallel rank {ep.rank} of {ep.size}): all-to-all of {what} failed: "
            f"{exn}. Every rank of an expert-parallel group must run every MoE layer each step"
        ) from exn
    return out


class _Exchange(torch.autograd.Function):
    """Variable-size all-to-all of rows; the backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x_RX, recv_splits, send_splits, ep, what):
        ctx.args = (recv_splits, send_splits, ep, what)
        return _all_to_all(x_RX, recv_splits, send_splits, ep, what)

    @staticmethod
    def backward(ctx, grad_RX):
        recv_splits, send_splits, ep, what = ctx.args
        return _all_to_all(grad_RX, send_splits, recv_splits, ep, f"gradients of {what}"), None, None, None, None


class AllToAllDispatcher:
    """Dropless expert-parallel dispatch (see the module doc); follows the protocol of
    :class:`asymoe_train.moe.dispatch.LocalDispatcher`."""

    def __init__(self, ep: ExpertParallel):
        self.ep = ep
        self.ep_rank, self.ep_size = ep.rank, ep.size

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
        size, held = self.ep_size, num_experts // self.ep_size
        where = where or "an MoE layer"
        slots = SlotOrder.sort(token_A, expert_A, num_experts, x_TD.shape[0])
        # 1. rows per slot: send_SL[s, e] rows go to rank s's expert e; recv_SL[s, e] rows come from rank s
        recv_SL = _all_to_all(slots.counts_E, [held] * size, [held] * size, self.ep, f"token counts in {where}")
        recv_SL = recv_SL.reshape(size, held)
        send_splits = slots.counts_E.reshape(size, held).sum(1).tolist()
        recv_splits = recv_SL.sum(1).tolist()
        # 2. the rows, with their evidence rows alongside (padding assignments, sorted last, stay here)
        sent = sum(send_splits)
        rows_AX = slots.gather(x_TD)[:sent]
        if extra_AX is not None:
            rows_AX = torch.cat([rows_AX, extra_AX[slots.order_A[:sent]].to(rows_AX.dtype)], dim=-1)
        rows_RX = _Exchange.apply(rows_AX, recv_splits, send_splits, self.ep, f"tokens in {where}")
        # 3. received rows are grouped by source rank, each group sorted by local expert: regroup by expert
        expert_R = torch.repeat_interleave(torch.arange(held, device=x_TD.device).repeat(size), recv_SL.reshape(-1))
        by_expert_R = torch.argsort(expert_R, stable=True)
        rows_RX = rows_RX[by_expert_R]
        d = x_TD.shape[-1]
        y_RD = run_experts(rows_RX[:, :d], recv_SL.sum(0).tolist(), rows_RX[:, d:] if extra_AX is not None else None)
        back_R = torch.empty_like(by_expert_R)
        back_R[by_expert_R] = torch.arange(len(by_expert_R), device=back_R.device)
        y_RD = y_RD[back_R]
        # 4. outputs back to the ranks their tokens came from
        y_AD = _Exchange.apply(y_RD, send_splits, recv_splits, self.ep, f"expert outputs in {where}")
        return slots.combine(x_TD, y_AD, weight_A)


def gather_experts(tensors: dict[str, torch.Tensor], ep: ExpertParallel) -> dict[str, torch.Tensor]:
    """Every expert of each expert-stacked tensor (dim 0 = the experts held here), concatenated in expert order, on
    the first rank of the first expert-parallel group (global rank 0; empty elsewhere). Only that group's ranks
    communicate; the other groups hold copies of the same experts."""
    if ep.replica != 0:
        return {}
    out = {}
    dst = dist.get_global_rank(ep.group, 0)
    for name, tensor in tensors.items():
        parts = [torch.empty_like(tensor) for _ in range(ep.size)] if ep.rank == 0 else None
        try:
            dist.gather(tensor.contiguous(), parts, dst=dst, group=ep.group)
        except RuntimeError as exn:
            raise RuntimeError(f"rank {dist.get_rank()}: gathering the experts of {name} for a checkpoint failed: "
                               f"{exn}") from exn
        if ep.rank == 0:
            out[name] = torch.cat(parts).cpu()
    return out
