"""DeepSpeed initialisation for one or many processes (CPU: gloo; GPU: nccl)."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
from collections.abc import Iterator

import torch

from asymoe_train.config.schema import EngineConfig, StageConfig
from asymoe_train.distributed.expert_parallel import ExpertParallel, grad_norm, mark_expert_parameters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """A lone process still needs the rendezvous variables DeepSpeed reads (else it looks for MPI)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, before any process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(cfg: EngineConfig) -> None:
    """Create the default process group with a short timeout so a mismatch fails fast instead of hanging."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    single_process_env()
    import deepspeed
    import deepspeed.ops

    # The shared-memory comm op JIT-compiles for ~45 s on first use and is not needed for training.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
    # Groups created later take torch's default timeout, not init's: lower it too (the expert-parallel groups get
    # engine.ep_timeout_s, see asymoe_train.distributed.expert_parallel).
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = timeout
    if isinstance(c10d.default_pg_nccl_timeout, datetime.timedelta):  # None in builds without NCCL
        c10d.default_pg_nccl_timeout = timeout
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)


# What Hydra writes into a job's output directory before the application runs.
HYDRA_FILES = {".hydra", "train.log"}


def shared_run_dir(run_dir: str) -> str:
    """Rank 0's run directory, for every rank: one per job. Each rank composes its own config, so without an
    explicit ``hydra.run.dir`` (the launch scripts pass one) the default, timestamped directory can differ between
    ranks; a rank's own directory is then removed if Hydra's files are all it holds."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return run_dir
    shared = [run_dir]
    torch.distributed.broadcast_object_list(shared, src=0)
    mine = os.path.abspath(run_dir)
    if os.path.abspath(shared[0]) != mine:
        if os.path.isdir(mine) and set(os.listdir(mine)) <= HYDRA_FILES:
            shutil.rmtree(mine, ignore_errors=True)
        os.makedirs(shared[0], exist_ok=True)
    return shared[0]


def deepspeed_config(engine: EngineConfig, stage: StageConfig) -> dict:
    """The DeepSpeed JSON config of one stage. No "optimizer" block: a torch optimizer is passed in (DeepSpeed's
    FusedAdam would JIT-compile on CPU)."""
    return {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": engine.grad_clip,
        "zero_optimization": {"stage": engine.zero_stage},
        "bf16": {"enabled": engine.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _experts_count_as_deepspeed_moe(block_type: type) -> Iterator[None]:
    """While an engine is built, let DeepSpeed take our MoE blocks for its own MoE layers.

    DeepSpeed switches its expert-parallel handling on only when it finds a ``deepspeed.moe.layer.MoE`` module in
    the model (``engine.has_moe_layers``): then ZeRO-0 reduces MoE parameters over the expert-data-parallel group
    (not the whole data-parallel group, which would average different experts of different ranks) and ZeRO-1/2 give
    the MoE parameter groups their own partitions. Our blocks hold the same kind of tagged parameters
    (:func:`mark_expert_parameters`) but are not that class.
    """
    import deepspeed.runtime.engine as ds_engine

    original = ds_engine.MoE
    ds_engine.MoE = (original, block_type)  # isinstance() takes a tuple
    try:
        yield
    finally:
        ds_engine.MoE = original


def set_moe_blocks_as_z3_leaves(model: torch.nn.Module, block_type: type) -> int:
    """ZeRO-3: make every MoE block a leaf module, gathered as a whole when it is entered; returns how many.

    ZeRO-3 fetches a module's parameters in hooks it puts on every submodule and prefetches by the order in which it
    saw them run. Inside an MoE block which experts run, and in which order, depends on the data (a pool with no
    token on this rank still runs on its empty slice, but its hooks may see other inputs on other ranks), and the
    block's pieces pass tensors wrapped in objects the hooks cannot see through (``Routing``), so their backward hooks
    would not fire. As a leaf, the block's parameters are all-gathered once on entry and released on exit, the same
    collectives on every rank whatever the tokens do, and its gradients are reduced together when the backward pass
    leaves it. The block's result is a named tuple, so these hooks see all its tensors."""
    from deepspeed.utils import set_z3_leaf_modules

    return len(set_z3_leaf_modules(model, [block_type], raise_if_not_found=False))


def zero3_grads_zeroed_on_cpu(optimizer) -> None:
    """ZeRO-3 on DeepSpeed's CPU accelerator: its optimizer frees gradients with ``Tensor.record_stream`` on the
    accelerator's current stream, which is None on CPU (DeepSpeed 0.19 guards every other such call with
    ``is_synchronized_device()``, not this one), so every step would fail. There it zeroes them instead; the
    gradients of partitioned parameters are freed after their reduction anyway."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_synchronized_device():
        original = optimizer.zero_grad
        optimizer.zero_grad = lambda set_to_none=True: original(set_to_none=False)


def build_engine(model: torch.nn.Module, engine: EngineConfig, stage: StageConfig, total_steps: int,
                 expert_parallel: ExpertParallel | None = None):
    """DeepSpeed engine over the model's trainable parameters with AdamW and cosine-with-warm-up, one optimizer
    group per learning rate of the stage (:func:`asymoe_train.training.groups.optimizer_groups`).

    With expert parallelism, the model's expert parameters are tagged as DeepSpeed MoE parameters (also frozen ones:
    DeepSpeed broadcasts them over their expert-data-parallel group only) and trainable ones go to their own
    optimizer groups (``split_params_into_different_moe_groups_for_optimizer``), so their gradients are reduced over
    the expert-data-parallel group, and gradients are clipped by the global norm that counts every expert once
    (:func:`asymoe_train.distributed.expert_parallel.grad_norm`)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from asymoe_train.moe.block import MoEBlock
    from asymoe_train.training.groups import optimizer_groups
    from asymoe_train.training.schedule import cosine_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    param_groups = optimizer_groups(model, stage)  # one per learning rate (lr_scale / lr_groups), tagged
    treat_as_moe = contextlib.nullcontext()
    if expert_parallel is not None:
        experts = list(model.expert_parameters().values())
        mark_expert_parameters(experts, expert_parallel)
        if any(p.requires_grad for p in experts):
            param_groups = [g for g in split_params_into_different_moe_groups_for_optimizer(param_groups)
                            if g["params"]]
            treat_as_moe = _experts_count_as_deepspeed_moe(MoEBlock)
    optimizer = torch.optim.AdamW(param_groups, lr=stage.lr, betas=tuple(engine.adam_betas), eps=engine.adam_eps,
                                  weight_decay=stage.weight_decay)
    scheduler = cosine_with_warmup(optimizer, total_steps, stage.warmup_steps, stage.min_lr_ratio)
    if engine.zero_stage == 3:
        set_moe_blocks_as_z3_leaves(model, MoEBlock)
    with treat_as_moe:
        ds_engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(engine, stage),
            dist_init_required=False,
        )
    if engine.zero_stage == 3:
        zero3_grads_zeroed_on_cpu(ds_engine.optimizer)
    if expert_parallel is not None:
        # DeepSpeed calls this to clip fp32 gradients without ZeRO, and its version counts only each rank's own
        # experts (see grad_norm); bf16 and ZeRO-1/2 clip inside their optimizers, which count every expert once.
        ds_engine.clip_fp32_gradients = lambda: torch.nn.utils.clip_grads_with_norm_(
            params, engine.grad_clip, grad_norm(params, expert_parallel))
    return ds_engine
