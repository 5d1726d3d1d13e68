"""DeepSpeed initialisation for one or many processes (CPU: gloo; GPU: nccl)."""

from __future__ import annotations

import datetime
import os
import socket

import torch

from asymoe_train.config.schema import EngineConfig, StageConfig


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
    # Groups created later (e.g. expert-parallel ones) take torch's default timeout, not init's: lower it too.
    torch.distributed.distributed_c10d.default_pg_timeout = timeout
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)


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


def build_engine(model: torch.nn.Module, engine: EngineConfig, stage: StageConfig, total_steps: int):
    """DeepSpeed engine over the model's trainable parameters with AdamW and cosine-with-warm-up."""
    import deepspeed

    from asymoe_train.training.schedule import cosine_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(engine.adam_betas), eps=engine.adam_eps,
                                  weight_decay=stage.weight_decay)
    scheduler = cosine_with_warmup(optimizer, total_steps, stage.warmup_steps, stage.min_lr_ratio)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(engine, stage),
        dist_init_required=False,
    )
    return ds_engine
