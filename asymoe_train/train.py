"""Training entry point: compose -> convert -> validate -> build -> Trainer."""

from __future__ import annotations

import logging
import os
import shlex

import torch
from omegaconf import DictConfig, OmegaConf

from asymoe_train.config import to_typed, validate
from asymoe_train.config.derive import resolve
from asymoe_train.config.labels import resolve_labels
from asymoe_train.distributed.engine import init_distributed, shared_run_dir, world
from asymoe_train.models.backbones import sync_backbone_sizes

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Run the curriculum of a composed config; prints ``run_dir: <path>`` last."""
    typed = to_typed(cfg)
    rank, world_size = world()
    changes = sync_backbone_sizes(typed.model)  # a checkpoint's config.json wins over the sizes in the config
    validate(typed, world_size)  # before any process group or model exists
    changes += resolve(typed, world_size)  # schedules, layer lists and source mixtures, parsed once here
    changes += resolve_labels(typed)  # model.head.num_classes from data.labels
    if rank == 0:
        for change in changes:
            log.info("derived %s", change)
    if typed.engine.threads:
        torch.set_num_threads(typed.engine.threads)
    os.makedirs(typed.run_dir, exist_ok=True)
    if rank == 0:
        OmegaConf.save(OmegaConf.structured(typed), os.path.join(typed.run_dir, "config.yaml"))
    init_distributed(typed.engine)
    typed.run_dir = shared_run_dir(typed.run_dir)  # one run directory per job: rank 0's
    from asymoe_train.training.signals import Preempted
    from asymoe_train.training.trainer import Trainer

    try:
        results = Trainer(typed, rank, world_size).run()
    except Preempted as stop:
        if rank == 0:
            log.info(f"{stop}; continue with: {resume_command(typed.run_dir)}")
            log.info(f"run_dir: {typed.run_dir}")
        return {}
    if rank == 0:
        log.info(f"run_dir: {typed.run_dir}")
    return results


def resume_command(run_dir: str) -> str:
    """The command that continues this run: its overrides with ``resume=auto`` and its run directory."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir="))]
    return shlex.join(["asymoe-train", *kept, "resume=auto", f"hydra.run.dir={run_dir}"])
