"""``asymoe-train plan``: parameters, per-GPU memory and the schedule of a run, before anything is allocated.

    asymoe-train plan experiment=asymoe_llama3_8b world_size=8 [gpu_memory_gib=80] [more Hydra overrides]

The config is composed from ``conf/`` like the training app's, backbone sizes are read from the checkpoints'
``config.json`` where the paths hold one, and it is validated without the file checks (weights, tokenizer and shards
need not exist here). The model is then built on the meta device, stage by stage as the trainer builds it (dense,
upcycled from the stage that sets ``upcycle``), so the counts come from the code rather than from a formula; a
backbone path without a checkpoint is counted from the sizes in ``model.vision`` / ``model.lm`` (the recipe configs
carry the published ones).

Memory per GPU covers weights, gradients and optimizer states (AdamW), then the activations of one micro-batch
(:mod:`asymoe_train.activations`: sequence length, micro-batch, activation checkpointing, attention implementation,
MoE dispatch) and a reserve for the CUDA context, communication buffers and fragmentation; with
``gpu_memory_gib=N`` the plan says whether each stage fits a GPU of N GiB, and by how much:

    b = 2 bytes (bf16) or 4 (fp32): weights, and gradients in the same dtype
    k = 12 bytes (bf16: fp32 master weights + Adam m and v) or 8 (fp32: Adam m and v)
    dense parameters P_d (T_d of them trainable) are sharded by ZeRO over the data-parallel group, G_d = world_size;
    expert parameters P_e (T_e trainable): each expert-parallel rank holds P_e / ep_size (num_experts / ep_size of
    every pool), sharded by ZeRO over the expert-data-parallel group, G_e = world_size / ep_size.
    For (P, T, G) in {(P_d, T_d, G_d), (P_e / ep_size, T_e / ep_size, G_e)}, per GPU:
        weights    = b * P / (G if zero_stage >= 3 else 1)
        gradients  = b * T / (G if zero_stage >= 2 else 1)
        optimizer  = k * T / (G if zero_stage >= 1 else 1)
    Frozen parameters have no gradients and no optimizer states.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

from asymoe_train.activations import RESERVE_GIB, Activations, activation_memory
from asymoe_train.config.derive import (
    global_batch,
    image_tokens_per_image,
    resolve,
    steps_per_epoch,
)
from asymoe_train.config.errors import ConfigError
from asymoe_train.config.labels import resolve_labels
from asymoe_train.config.paths import CONF_DIR, resolve_data_path
from asymoe_train.config.schema import TrainConfig
from asymoe_train.config.validate import validate
from asymoe_train.training.params import ParamSplit, stage_params

WEIGHT_BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZER_BYTES = {"bf16": 12, "fp32": 8}
GIB = 1024**3


@dataclass
class Memory:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def memory_per_gpu(params: ParamSplit, world_size: int, ep_size: int, zero_stage: int, precision: str) -> Memory:
    """Weights, gradients and AdamW states per GPU under a ZeRO stage and expert-parallel size (module docstring)."""
    b, k = WEIGHT_BYTES[precision], OPTIMIZER_BYTES[precision]
    memory = Memory(0.0, 0.0, 0.0)
    for held, trainable, group in ((params.dense, params.dense_trainable, world_size),
                                   (params.expert / ep_size, params.expert_trainable / ep_size, world_size // ep_size)):
        memory.weights += b * held / (group if zero_stage >= 3 else 1)
        memory.gradients += b * trainable / (group if zero_stage >= 2 else 1)
        memory.optimizer += k * trainable / (group if zero_stage >= 1 else 1)
    return memory


@dataclass
class StagePlan:
    name: str
    upcycled: bool
    total: int  # parameters
    activated: int  # parameters per token (top_k experts, not all)
    params: ParamSplit
    memory: dict[int, Memory]  # ZeRO stage -> per GPU
    global_batch: int  # samples per optimizer step
    batch_size: int
    grad_accum: int
    steps: int
    warmup_steps: int
    epochs: float
    source: str
    source_size: int | None
    steps_per_epoch: int | None
    image_tokens: int  # at most, per optimizer step (one image per sample)
    max_tokens: int | None  # at most, per optimizer step; None when samples split into one sequence per turn
    activations: Activations | None = None  # one micro-batch, per GPU

    def per_gpu(self, zero_stage: int) -> float:
        """Bytes per GPU under ``zero_stage``: states, activations and the reserve."""
        return self.memory[zero_stage].total + self.activations.total + RESERVE_GIB * GIB


@dataclass
class Plan:
    experiment: str
    world_size: int
    ep_size: int
    zero_stage: int
    precision: str
    max_length: int
    activation_checkpointing: bool
    attention: str  # the LM's attention implementation
    gpu_memory_gib: float  # 0: no verdict
    image_tokens_per_image: int
    backbones: dict[str, str]  # vision / lm -> where the architecture came from
    dense_total: int
    stages: list[StagePlan] = field(default_factory=list)


def _vocab_size(cfg: TrainConfig, lm_from_checkpoint: bool) -> int:
    """Embedding rows the trainer would build: the tokenizer's when it is here (it can grow a checkpoint's)."""
    tokenizer = resolve_data_path(cfg.data, cfg.data.tokenizer)
    if os.path.exists(tokenizer):
        from asymoe_train.data.tokenizer import TextTokenizer

        return TextTokenizer(tokenizer).vocab_size
    if not lm_from_checkpoint and cfg.model.lm.vocab_size == 0:
        raise ConfigError(f"model.lm.vocab_size=0 (the tokenizer's) but data.tokenizer {tokenizer} is not here; set "
                          "model.lm.vocab_size to count the embeddings")
    return 0


def make_plan(cfg: TrainConfig, world_size: int, gpu_memory_gib: float = 0.0) -> Plan:
    """Count parameters on the meta device, stage by stage, and derive memory and schedule. ``cfg`` has been synced
    with its backbone checkpoints, validated and resolved (:func:`plan_command` does all three)."""
    from asymoe_train.models.backbones import has_checkpoint

    model_cfg = copy.deepcopy(cfg.model)
    backbones = {}
    for part, key in (("vision", "vision_path"), ("lm", "lm_path")):
        path = getattr(model_cfg.backbone, key)
        if has_checkpoint(path):
            backbones[part] = f"{getattr(model_cfg, part).type}, from {os.path.join(path, 'config.json')}"
        else:
            where = f" (model.backbone.{key}={path!r} holds no checkpoint)" if path else ""
            backbones[part] = f"{getattr(model_cfg, part).type}, from the sizes in model.{part}.*{where}"
            setattr(model_cfg.backbone, key, "")
    vocab_size = _vocab_size(cfg, bool(model_cfg.backbone.lm_path))
    engine = cfg.engine
    dense_total, described = stage_params(model_cfg, cfg.curriculum.stages, vocab_size)
    image_tokens = image_tokens_per_image(cfg.model.vision)
    plan = Plan(cfg.experiment, world_size, engine.ep_size, engine.zero_stage, engine.precision, cfg.data.max_length,
                cfg.model.activation_checkpointing, cfg.model.lm.attn_implementation, gpu_memory_gib, image_tokens,
                backbones, dense_total)
    vocab = vocab_size or model_cfg.lm.vocab_size
    for counted, (name, stage) in zip(described, cfg.curriculum.stages.items()):
        params = counted.params
        batch = global_batch(stage, world_size)
        plan.stages.append(StagePlan(
            name=name, upcycled=counted.upcycled, total=counted.total, activated=counted.activated, params=params,
            memory={z: memory_per_gpu(params, world_size, engine.ep_size, z, engine.precision) for z in range(4)},
            global_batch=batch, batch_size=stage.batch_size, grad_accum=stage.grad_accum, steps=stage.steps,
            warmup_steps=stage.warmup_steps, epochs=stage.epochs, source=stage.source,
            source_size=cfg.data.source_sizes.get(stage.source),
            steps_per_epoch=steps_per_epoch(stage, cfg.data, world_size), image_tokens=batch * image_tokens,
            max_tokens=None if cfg.data.split_turns else batch * cfg.data.max_length,
            activations=activation_memory(model_cfg, stage.batch_size, cfg.data.max_length, engine.precision,
                                          "vision" in stage.trainable, vocab, counted.upcycled),
        ))
    return plan


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n:,.0f} ({n / scale:.2f}{unit})"
    return f"{n:,.0f}"


def _bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


def format_plan(plan: Plan) -> str:
    """The plan as the console shows it."""
    dp, edp = plan.world_size, plan.world_size // plan.ep_size
    lines = [
        f"plan: experiment={plan.experiment} world_size={plan.world_size} zero_stage={plan.zero_stage} "
        f"ep_size={plan.ep_size} precision={plan.precision} (data-parallel group {dp}, expert-data-parallel group "
        f"{edp})",
        f"vision tower: {plan.backbones['vision']}; {plan.image_tokens_per_image} image tokens per image",
        f"language model: {plan.backbones['lm']}",
        f"dense model: {_count(plan.dense_total)} parameters",
    ]
    for i, s in enumerate(plan.stages):
        m = s.memory[plan.zero_stage]
        lines += [
            f"stage {s.name} ({i + 1}/{len(plan.stages)}), {'upcycled' if s.upcycled else 'dense'} model:",
            f"  parameters: total {_count(s.total)}, activated per token {_count(s.activated)}",
            f"  trainable: {_count(s.params.dense_trainable + s.params.expert_trainable)} "
            f"(dense {s.params.dense_trainable:,}, experts {s.params.expert_trainable:,})",
            f"  per GPU (ZeRO-{plan.zero_stage}, EP {plan.ep_size}, {plan.precision}): weights {_bytes(m.weights)}, "
            f"gradients {_bytes(m.gradients)}, optimizer states {_bytes(m.optimizer)}, total {_bytes(m.total)} "
            "(states)",
            "  per GPU total by ZeRO stage: "
            + ", ".join(f"ZeRO-{z} {_bytes(mem.total)}" for z, mem in s.memory.items()),
            *_activation_lines(plan, s),
        ]
        tokens = (f"at most {s.max_tokens:,} tokens (max_length {plan.max_length})" if s.max_tokens is not None
                  else f"one sequence per turn of at most {plan.max_length} tokens (data.split_turns)")
        lines.append(f"  tokens per step: {tokens}, of which at most {s.image_tokens:,} image tokens; global batch "
                     f"{s.global_batch} samples = {s.batch_size} per rank x grad_accum {s.grad_accum} x "
                     f"{plan.world_size} ranks")
        if s.steps_per_epoch is None:
            epoch = f"steps per epoch: unknown (set data.source_sizes.{s.source} to the samples in the source)"
        else:
            epoch = f"steps per epoch: {s.steps_per_epoch:,} ({s.source_size:,} samples in {s.source})"
        trained = f"{s.epochs:g} epoch{'' if s.epochs == 1 else 's'}" if s.epochs > 0 else "set as steps"
        lines.append(f"  steps: {s.steps:,} ({trained}), warm-up {s.warmup_steps:,}; {epoch}")
    return "\n".join(lines)


def _activation_lines(plan: Plan, s: StagePlan) -> list[str]:
    a = s.activations
    checkpointing = "on" if plan.activation_checkpointing else "off"
    lines = [
        f"  activations per GPU (micro-batch {s.batch_size} x {plan.max_length} positions, activation checkpointing "
        f"{checkpointing}, attention {plan.attention}): decoder layers {_bytes(a.layers)}, recomputed layer "
        f"{_bytes(a.recompute)}, logits {_bytes(a.logits)}, vision and embeddings {_bytes(a.vision)}; total "
        f"{_bytes(a.total)}",
        f"  per GPU with activations (ZeRO-{plan.zero_stage}): states {_bytes(s.memory[plan.zero_stage].total)} + "
        f"activations {_bytes(a.total)} + reserve {RESERVE_GIB:g} GiB = {_bytes(s.per_gpu(plan.zero_stage))}",
    ]
    if plan.gpu_memory_gib:
        margin = plan.gpu_memory_gib * GIB - s.per_gpu(plan.zero_stage)
        fixes = [f"lower curriculum.stages.{s.name}.batch_size (the global batch stays: gradient accumulation "
                 "grows)"]
        if not plan.activation_checkpointing:
            fixes.append("set model.activation_checkpointing=true")
        if plan.zero_stage < 3:
            fixes.append("raise engine.zero_stage")
        verdict = (f"fits, {_bytes(margin)} to spare" if margin >= 0 else
                   f"does not fit, {_bytes(-margin)} over: {', or '.join(fixes)}")
        lines.append(f"  on {plan.gpu_memory_gib:g} GiB GPUs: {verdict}")
    return lines


def compose_config(overrides: list[str]) -> TrainConfig:
    """The typed config the training app would compose from ``conf/`` with these overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from asymoe_train.config import register_configs, to_typed

    register_configs()
    if not any(o.split("=")[0].lstrip("+") == "run_dir" for o in overrides):
        overrides = [*overrides, "run_dir=plan"]  # the run directory comes from Hydra's runtime, which plan lacks
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return to_typed(compose("train", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as exn:
        raise ValueError(f"{exn}{f' ({exn.__cause__})' if exn.__cause__ else ''}") from None


def plan_command(args: list[str]) -> str:
    """``asymoe-train plan [world_size=N] [gpu_memory_gib=G] [overrides]``: compose, sync, validate without file checks, resolve, plan.
    Ends with what training would still need (the file checks), or that the config is ready."""
    from asymoe_train.models.backbones import sync_backbone_sizes

    world_size, gpu_memory_gib, overrides = 1, 0.0, []
    for arg in args:
        if arg.startswith("world_size="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"world_size={value!r} must be a positive integer (the number of GPUs)")
            world_size = int(value)
        elif arg.startswith("gpu_memory_gib="):
            value = arg.split("=", 1)[1]
            try:
                gpu_memory_gib = float(value)
            except ValueError:
                gpu_memory_gib = -1.0
            if not gpu_memory_gib > 0:
                raise ValueError(f"gpu_memory_gib={value!r} must be a positive number (GiB of memory per GPU)")
        else:
            overrides.append(arg)
    cfg = compose_config(overrides)
    changes = sync_backbone_sizes(cfg.model)
    validate(cfg, world_size, files=False)
    changes += resolve(cfg, world_size)
    changes += resolve_labels(cfg, missing_ok=True)  # the classification head, when its labels file is here
    text = format_plan(make_plan(cfg, world_size, gpu_memory_gib))
    if changes:
        text += "\nderived: " + "; ".join(changes)
    try:
        validate(cfg, world_size)
        text += "\nready to train: backbones, tokenizer and shards are in place"
    except ConfigError as exn:
        text += f"\nbefore training: {exn}"
    return text
