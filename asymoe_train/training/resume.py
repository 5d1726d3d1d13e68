"""Where a run starts: ``resume`` (continue this run, or a checkpoint), ``init_from`` (another run's finished stage)
and which layouts a checkpoint resumes on. The checks are pure functions of configs and trainer states; only
:func:`find_start` looks at the run directory."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import replace

from omegaconf import OmegaConf

from asymoe_train.checkpoint.integrity import MANIFEST, problems, verify
from asymoe_train.checkpoint.optimizer import resumes_on_any_layout
from asymoe_train.checkpoint.store import (
    MARKER,
    STATE,
    TrainerState,
    complete_checkpoints,
    config_hash,
    is_complete,
)
from asymoe_train.config.derive import upcycled_after
from asymoe_train.config.errors import CheckpointError
from asymoe_train.config.schema import EngineConfig, TrainConfig

# model keys that change how the model runs, not its weights: init_from may change them
HOW_IT_RUNS = ("activation_checkpointing", "compile_moe")

log = logging.getLogger(__name__)

Start = tuple[TrainerState, str]  # a checkpoint's state and directory


def layout_of(engine: EngineConfig, world_size: int) -> dict:
    """The parallel layout a checkpoint records: what its optimizer files are partitioned by."""
    return {"world_size": world_size, "ep_size": engine.ep_size, "zero_stage": engine.zero_stage,
            "precision": engine.precision}


def resolved_yaml(cfg: TrainConfig) -> str:
    """The resolved config as checkpoints record it; how a run was started (``resume``) is not part of what it is."""
    resolved = OmegaConf.structured(cfg)
    resolved.resume = "none"
    return OmegaConf.to_yaml(resolved)


# Stage keys of the lr schedule: a resumed run may change them (e.g. a lower lr after a divergence, a longer stage)
SCHEDULE_KEYS = ("lr", "lr_scale", "lr_groups", "min_lr_ratio", "warmup_steps", "warmup_ratio", "steps", "epochs")


def per_step(curriculum, world_size: int, schedule: bool = True):
    """A resolved curriculum config with each stage's batch given as samples per optimizer step over all ranks
    (``batch_size`` x ``grad_accum`` x ranks), the same for every layout that trains the same way; without
    ``schedule`` the lr-schedule keys (:data:`SCHEDULE_KEYS`) are left out."""
    curriculum = copy.deepcopy(curriculum)
    for stage in curriculum.stages.values():
        stage.batch_size = stage.batch_size * stage.grad_accum * world_size
        stage.grad_accum = stage.global_batch_size = 0
        if not schedule:
            for key in SCHEDULE_KEYS:
                stage[key] = None
    return curriculum


def schedule_changes(state: TrainerState, config_yaml: str) -> list[str]:
    """The lr-schedule keys of the checkpoint's stage that this config changes, as ``key: old -> new``."""
    saved, now = OmegaConf.create(state.config), OmegaConf.create(config_yaml)
    before, after = saved.curriculum.stages.get(state.stage), now.curriculum.stages.get(state.stage)
    if before is None or after is None:
        return []
    return [f"curriculum.stages.{state.stage}.{key}: {before.get(key)} -> {after.get(key)}"
            for key in SCHEDULE_KEYS if before.get(key) != after.get(key)]


def check_resume(state: TrainerState, path: str, config_yaml: str, world_size: int) -> list[str]:
    """Raise when the checkpoint at ``path`` cannot continue the run of ``config_yaml`` on ``world_size`` ranks: its
    stage is not at the same place of the curriculum, or the model or the curriculum differ (a curriculum may differ
    in how each rank's batch is split, as long as every optimizer step sees the same samples). Returns the other
    top-level keys that differ."""
    saved, now = OmegaConf.create(state.config), OmegaConf.create(config_yaml)
    names = list(now.curriculum.stages)
    if state.stage not in names or names.index(state.stage) != state.stage_index:
        raise ValueError(f"resume: checkpoint {path} is from stage {state.stage!r} (#{state.stage_index}), which "
                         f"this config's curriculum.stages {names} does not have at that place")
    same_steps = per_step(saved.curriculum, state.layout.get("world_size", 1), schedule=False) == per_step(
        now.curriculum, world_size, schedule=False)
    for key in ("model", "curriculum"):
        if saved[key] != now[key] and not (key == "curriculum" and same_steps):
            raise ValueError(f"resume: {key} differs from the checkpoint's ({path}/{STATE} holds the resolved "
                             f"config) in more than the lr schedule ({', '.join(SCHEDULE_KEYS)} of a stage may "
                             f"change); resume with the same {key} or start a new run")
    if state.config_hash == config_hash(config_yaml):
        return []
    return sorted(k for k in now if k in saved and saved[k] != now[k])


def check_init(state: TrainerState, path: str, config_yaml: str, world_size: int) -> Start:
    """``init_from``: another run's finished stage, which this run treats as its own finished stage (the stages up
    to it are skipped, the next starts from its weights) in a new W&B run. The skipped stages must be configured
    as that run had them, and the model as well, except model.moe while the weights are still dense. Returns the
    state this run starts from."""
    saved, now = OmegaConf.create(state.config), OmegaConf.create(config_yaml)
    names = list(now.curriculum.stages)
    if not state.stage_done:
        raise ValueError(f"init_from={path}: a mid-stage checkpoint (stage {state.stage!r}, step {state.step}); "
                         "init_from takes a finished stage (checkpoints/<stage>), resume=<dir> continues a stage")
    if state.stage not in names[:-1] or names.index(state.stage) != state.stage_index:
        raise ValueError(f"init_from={path}: its stage {state.stage!r} (#{state.stage_index}) must be one of this "
                         f"run's curriculum.stages {names} at the same place, and not the last")
    done = names[: state.stage_index + 1]
    saved_steps = per_step(saved.curriculum, state.layout.get("world_size", 1)).stages
    now_steps = per_step(now.curriculum, world_size).stages
    differ = [f"curriculum.stages.{name}" for name in done if saved_steps.get(name) != now_steps[name]]
    dense = not upcycled_after(now.curriculum.stages, state.stage)
    differ += [f"model.{key}" for key in now.model if saved.model.get(key) != now.model[key]
               and key not in HOW_IT_RUNS and not (dense and key == "moe")]
    if differ:
        raise ValueError(f"init_from={path}: this run's {differ} differ from the config that checkpoint was "
                         f"trained with ({path}/{STATE} holds it); set them as there, or train those stages here")
    return replace(state, wandb_id="", data_position={}), path


def check_layout(state: TrainerState, path: str, layout: dict) -> None:
    """A mid-stage checkpoint resumes on another layout (world size, ep_size, ZeRO stage, precision) when its
    optimizer state is saved by parameter name, as every checkpoint of this version is; a stage-end checkpoint
    resumes on any layout: the next stage needs only its weights."""
    before = state.layout
    if before == layout or state.stage_done or resumes_on_any_layout(path, before):
        return
    raise ValueError(
        f"resume: {path} was written with layout {before}, this run has {layout}; its optimizer state is "
        "partitioned by rank and it has no optimizer state by parameter name (optim_by_name_rank<r>.safetensors), "
        "so it resumes on its own layout only. To convert it, resume it there "
        f"(`torchrun --nproc-per-node {before.get('world_size')} -m asymoe_train.cli ... "
        f"engine.ep_size={before.get('ep_size', 1)} engine.zero_stage={before.get('zero_stage', 0)} "
        f"engine.precision={before.get('precision')} resume={path}`) and send it SIGTERM: it saves a checkpoint after "
        "its next step and exits, and that checkpoint resumes on any layout"
    )


def stage_plan(stages: list[str], start: TrainerState | None) -> list[str]:
    """What each stage of the curriculum does in a run that starts from ``start``: ``done`` (behind the checkpoint),
    ``resume`` (continued from a mid-stage checkpoint) or ``train``."""
    plan = []
    for index in range(len(stages)):
        if start and (index < start.stage_index or (index == start.stage_index and start.stage_done)):
            plan.append("done")
        elif start and index == start.stage_index:
            plan.append("resume")
        else:
            plan.append("train")
    return plan


def stage_checkpoint(run_dir: str, stage: str, start: Start | None) -> str:
    """Where a finished stage's weights are: this run's ``checkpoints/<stage>``, or the checkpoint a run started
    from when that is the stage's end (``resume=<dir>`` and ``init_from`` may name another run's)."""
    if start and start[0].stage == stage and start[0].stage_done:
        return start[1]
    return os.path.join(run_dir, "checkpoints", stage)


def newest_verified(candidates: list[Start], rank: int = 0, world_size: int = 1) -> Start | None:
    """The newest of ``candidates`` (oldest first) whose files match its manifest; each newer one that does not is
    named with its bad file (a collective with several ranks: every rank checks a share of the files)."""
    skipped = []
    for state, path in reversed(candidates):
        found = problems(path, rank=rank, world_size=world_size)
        if not found:
            if skipped and rank == 0:
                log.warning(f"resume=auto: falling back to {path}, the newest checkpoint that verifies")
            return state, path
        skipped.append(path)
        if rank == 0:
            log.warning(f"resume=auto: {path} fails verification: {found[0]}"
                        + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))
    return None


def find_start(cfg: TrainConfig, config_yaml: str, world_size: int, rank: int = 0) -> Start | None:
    """The checkpoint a run starts from: the one ``resume`` names (``auto``: the latest complete one of run_dir),
    else ``init_from``'s, checked against this run; None for a fresh start."""
    mode, found = cfg.resume, None
    if mode == "auto":
        candidates = complete_checkpoints(cfg.run_dir)
        found = newest_verified(candidates, rank, world_size)
        if found:
            state, path = found
        elif candidates:
            raise CheckpointError(f"resume=auto: none of the {len(candidates)} complete checkpoints in "
                                  f"{cfg.run_dir}/checkpoints verifies against its {MANIFEST} (the warnings above "
                                  "name the bad files); restore one, or start over with resume=none")
        elif rank == 0:
            log.info(f"resume=auto: no complete checkpoint in {cfg.run_dir}/checkpoints; starting afresh"
                     + (f" from init_from={cfg.init_from}" if cfg.init_from else ""))
    elif mode != "none":
        if not is_complete(mode):
            raise CheckpointError(f"resume={mode}: not a complete checkpoint directory (no {MARKER} marker or "
                                  f"{STATE}); name a directory under <run_dir>/checkpoints, or use resume=auto")
        verify(mode, fix="resume=auto picks the newest checkpoint of a run that verifies, or name another "
               "checkpoint with resume=<dir>", rank=rank, world_size=world_size)
        found, (state, path) = True, (TrainerState.load(mode), mode)
    elif rank == 0 and complete_checkpoints(cfg.run_dir):
        log.warning("%s holds checkpoints; starting over (resume=auto continues from them)", cfg.run_dir)
    if found:
        changed = check_resume(state, path, config_yaml, world_size)
        if changed and rank == 0:
            log.warning("resume: config differs from the checkpoint's in %s", changed)
        schedule = schedule_changes(state, config_yaml)
        if schedule and rank == 0:
            log.warning("resume: the lr schedule changes (%s); the stage continues from step %d on the new schedule",
                        "; ".join(schedule), state.step)
        check_layout(state, path, layout_of(cfg.engine, world_size))
        if rank == 0:
            log.info(f"resuming from {path}: stage {state.stage}, step {state.step}, global step {state.global_step}")
        return state, path
    if not cfg.init_from:
        return None
    path = cfg.init_from
    if not is_complete(path):
        raise CheckpointError(f"init_from={path}: not a complete checkpoint directory (no COMPLETE marker or "
                              f"{STATE}); name a finished stage of another run, e.g. <run_dir>/checkpoints/align")
    verify(path, fix="restore that checkpoint, or train its stage again", rank=rank, world_size=world_size)
    start = check_init(TrainerState.load(path), path, config_yaml, world_size)
    if rank == 0:
        names = list(cfg.curriculum.stages)
        log.info(f"init_from={path}: stages {names[: start[0].stage_index + 1]} come from there (global step "
                 f"{start[0].global_step}); {names[start[0].stage_index + 1]} starts from its weights")
    return start
