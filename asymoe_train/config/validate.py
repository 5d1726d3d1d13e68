"""Cross-field validation, run right after composing and before anything is built.

Every rule raises ``ValueError`` naming the dotted key, the offending value and the fix.
"""

from __future__ import annotations

import os

from asymoe_train.config.checks import choice, nonempty_path, nonnegative, positive
from asymoe_train.config.derive import (
    stage_steps,
    stage_warmup,
)
from asymoe_train.config.errors import ConfigError
from asymoe_train.config.names import (
    ATTN_IMPLEMENTATIONS,
    AUGMENTATIONS,
    IMAGE_PLACEHOLDER,
    LM_TYPES,
    LOGGER_MODES,
    PRECISIONS,
    TEMPLATES,
    TRAINABLE_GROUPS,
    VISION_TYPES,
    ZERO_STAGES,
)
from asymoe_train.config.paths import resolve_data_path, shard_files
from asymoe_train.config.schema import TrainConfig
from asymoe_train.config.sources import source_parts
from asymoe_train.config.validate_classify import validate_classify
from asymoe_train.config.validate_moe import validate_moe

__all__ = ["ConfigError", "resolve_data_path", "shard_files", "validate"]


def _validate_backbone_paths(cfg: TrainConfig) -> None:
    """Each configured backbone path is a local Hugging Face checkpoint: config.json and weights."""
    backbone = cfg.model.backbone
    for key, path, what in (("model.backbone.vision_path", backbone.vision_path, "SigLIP/CLIP vision tower"),
                            ("model.backbone.lm_path", backbone.lm_path, "causal LM")):
        if not path:
            continue
        fix = (f"set {key}=<local directory of a {what} checkpoint> (nothing is downloaded), or {key}='' for a "
               "random init from the sizes in the config")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{key}={path!r} holds no Hugging Face checkpoint (no config.json there); {fix}")
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
            raise ConfigError(f"{key}={path!r} has a config.json but no weights (*.safetensors or *.bin); {fix}")


def _validate_model(cfg: TrainConfig) -> None:
    vision, lm = cfg.model.vision, cfg.model.lm
    choice("model.vision.type", vision.type, VISION_TYPES)
    choice("model.lm.type", lm.type, LM_TYPES)
    choice("model.lm.attn_implementation", lm.attn_implementation, ATTN_IMPLEMENTATIONS)
    for key in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "merge"):
        positive(f"model.vision.{key}", getattr(vision, key))
    if vision.image_size < vision.patch_size:
        raise ConfigError(
            f"model.vision.image_size={vision.image_size} is smaller than model.vision.patch_size={vision.patch_size}"
        )
    grid = vision.image_size // vision.patch_size  # the patch convolution drops a remainder (SigLIP 384/14: 27)
    if grid % vision.merge:
        raise ConfigError(
            f"model.vision.merge={vision.merge} does not divide the {grid}x{grid} patch grid; "
            f"use a divisor of {grid}"
        )
    if not -vision.num_layers - 1 <= vision.feature_layer <= vision.num_layers:
        raise ConfigError(
            f"model.vision.feature_layer={vision.feature_layer} is not a hidden state of a {vision.num_layers}-layer "
            f"tower; use -1 (the output), -2 (the penultimate layer) or an index in [0, {vision.num_layers}]"
        )
    if lm.vocab_size < 0:
        raise ConfigError(f"model.lm.vocab_size={lm.vocab_size} must be >= 0 (0 = the tokenizer's vocabulary)")
    if cfg.data.max_length > lm.max_position_embeddings:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds model.lm.max_position_embeddings="
            f"{lm.max_position_embeddings}; shorten data.max_length"
        )
    if vision.hidden_size % vision.num_heads:
        raise ConfigError(f"model.vision.hidden_size={vision.hidden_size} is not divisible by num_heads={vision.num_heads}")
    if lm.hidden_size % lm.num_heads:
        raise ConfigError(f"model.lm.hidden_size={lm.hidden_size} is not divisible by model.lm.num_heads={lm.num_heads}")
    if lm.num_heads % lm.num_kv_heads:
        raise ConfigError(f"model.lm.num_heads={lm.num_heads} is not divisible by model.lm.num_kv_heads={lm.num_kv_heads}")

    validate_moe(cfg)


def _validate_data(cfg: TrainConfig, world_size: int, files: bool) -> None:
    data = cfg.data
    nonempty_path("data.root", data.root, "set it to the directory of the shards and the tokenizer (data.root=. for the "
          "working directory)")
    nonempty_path("data.tokenizer", data.tokenizer, "set it to a tokenizer.json or a Hugging Face tokenizer directory, "
          "relative to data.root or absolute")
    choice("data.template", data.template, TEMPLATES)
    parts = {name: source_parts(f"data.sources.{name}", value) for name, value in data.sources.items()}
    for n, prompt in enumerate(data.caption_prompts):
        if not isinstance(prompt, str) or not prompt.strip() or IMAGE_PLACEHOLDER in prompt:
            raise ConfigError(f"data.caption_prompts.{n}={prompt!r} must be non-empty text without "
                              f"{IMAGE_PLACEHOLDER} (the placeholder is put in front of it)")
    positive("data.max_length", data.max_length)
    choice("data.augment", data.augment, AUGMENTATIONS)
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers={data.num_workers} must be >= 0")
    readers = world_size * max(1, data.num_workers)
    if data.num_streams < readers:
        raise ConfigError(
            f"data.num_streams={data.num_streams} is fewer than the {readers} readers ({world_size} ranks x "
            f"{max(1, data.num_workers)} workers); every reader needs a stream: set data.num_streams >= {readers} "
            "(keep it fixed across resumes so the data position carries over)"
        )
    if not 0 <= data.max_bad_fraction < 1:
        raise ConfigError(f"data.max_bad_fraction={data.max_bad_fraction} must be in [0, 1)")
    nonnegative("data.bad_fraction_min_samples", data.bad_fraction_min_samples,
                 "samples read before data.max_bad_fraction is enforced")
    nonnegative("data.shuffle_buffer", data.shuffle_buffer)
    for value, cap in data.turn_caps.items():
        nonnegative(f"data.turn_caps.{value}", cap, "turns kept per sample")
    if data.answer_balance and not data.split_turns:
        raise ConfigError(f"data.answer_balance={data.answer_balance!r} weights single turns; it needs "
                          "data.split_turns=true (or set data.answer_balance='')")
    if not data.answer_balance_max >= 1:
        raise ConfigError(f"data.answer_balance_max={data.answer_balance_max} must be >= 1 (the cap on a turn's weight)")
    for name, size in data.source_sizes.items():
        if name not in data.sources:
            raise ConfigError(f"data.source_sizes.{name}: no such source in data.sources {sorted(data.sources)}")
        positive(f"data.source_sizes.{name}", size)
    if not files:
        return
    tokenizer = resolve_data_path(data, data.tokenizer)
    hint = "build the demo shards with `make data`, or point data.root at your shards"
    if not os.path.exists(tokenizer):
        raise ConfigError(f"data.tokenizer: {tokenizer} does not exist; {hint}")
    globs = [(f"data.sources.{name}" + (f".{part.name}.glob" if part.name else ""), part.glob, True)
             for name, source in parts.items() for part in source]
    globs += [(f"data.eval_sources.{name}", pattern, False) for name, pattern in data.eval_sources.items()]
    for key, pattern, train in globs:
        shards = shard_files(data, pattern, key)
        if not shards:
            raise ConfigError(f"{key}: no shards match {resolve_data_path(data, pattern)}; {hint}")
        if train and not data.resampled and len(shards) < data.num_streams:
            raise ConfigError(
                f"{key}: {len(shards)} shards for data.num_streams={data.num_streams}; with "
                "data.resampled=false every stream needs a shard (of every mixture component). Set "
                "data.resampled=true, lower data.num_streams (>= ranks x workers), or write more, smaller shards"
            )


def _validate_curriculum(cfg: TrainConfig, world_size: int) -> None:
    stages = cfg.curriculum.stages
    if not stages:
        raise ConfigError("curriculum.stages is empty; pick a curriculum, e.g. curriculum=two_stage")
    upcycles = [name for name, stage in stages.items() if stage.upcycle]
    if len(upcycles) > 1:
        raise ConfigError(f"curriculum.stages: {upcycles} all set upcycle=true; upcycling happens once")
    for name, stage in stages.items():
        key = f"curriculum.stages.{name}"
        if stage.source not in cfg.data.sources:
            raise ConfigError(f"{key}.source={stage.source!r} is not in data.sources {sorted(cfg.data.sources)}")
        for field_name in ("batch_size", "grad_accum", "lr"):
            positive(f"{key}.{field_name}", getattr(stage, field_name))
        if stage.global_batch_size < 0 or stage.global_batch_size % (stage.batch_size * world_size):
            raise ConfigError(
                f"{key}.global_batch_size={stage.global_batch_size} is not a multiple of {key}.batch_size="
                f"{stage.batch_size} x {world_size} ranks; change either so that gradient accumulation is a whole "
                "number"
            )
        if stage.epochs < 0 or stage.steps < 0:
            raise ConfigError(f"{key}: steps={stage.steps} and epochs={stage.epochs} must be >= 0")
        if stage.epochs == 0 and stage.steps == 0:
            raise ConfigError(f"{key}: set {key}.steps (optimizer steps) or {key}.epochs (passes over the source)")
        steps = stage_steps(stage, cfg.data, world_size)
        if steps is None:
            raise ConfigError(
                f"{key}.epochs={stage.epochs} needs the size of source {stage.source!r}: set "
                f"data.source_sizes.{stage.source}=<samples>, or train for {key}.steps instead"
            )
        nonnegative(f"{key}.warmup_steps", stage.warmup_steps)
        nonnegative(f"{key}.weight_decay", stage.weight_decay)
        if not 0 <= stage.min_lr_ratio <= 1:
            raise ConfigError(f"{key}.min_lr_ratio={stage.min_lr_ratio} must be in [0, 1]")
        if not 0 <= stage.warmup_ratio < 1:
            raise ConfigError(f"{key}.warmup_ratio={stage.warmup_ratio} must be in [0, 1)")
        warmup = stage_warmup(stage, steps)
        if warmup < 0 or warmup >= steps:
            raise ConfigError(
                f"{key}.warmup_steps={warmup} must be in [0, steps={steps}); "
                f"for a short run also set {key}.warmup_steps"
            )
        if not stage.trainable:
            raise ConfigError(f"{key}.trainable is empty; name the groups to train, e.g. [projector]")
        for group in stage.trainable:
            if group.split(".")[0] not in TRAINABLE_GROUPS:
                raise ConfigError(f"{key}.trainable: unknown group {group!r}; expected one of "
                                  f"{sorted(TRAINABLE_GROUPS)}")
        for field_name in ("lr_scale", "lr_groups"):
            for group, value in getattr(stage, field_name).items():
                trained = any(group == t or group.startswith(t + ".") or t.startswith(group + ".")
                              for t in stage.trainable)
                if not trained:
                    raise ConfigError(f"{key}.{field_name}.{group}: {group!r} is not among {key}.trainable "
                                      f"{list(stage.trainable)}; train it or drop its learning rate")
                if not value > 0:
                    raise ConfigError(f"{key}.{field_name}.{group}={value} must be > 0")
        both = set(stage.lr_scale) & set(stage.lr_groups)
        if both:
            raise ConfigError(f"{key}: {sorted(both)} set in both lr_scale and lr_groups; keep one")


def _validate_engine(cfg: TrainConfig, world_size: int) -> None:
    engine = cfg.engine
    if engine.ep_size > 1 and engine.zero_stage == 3:
        raise ConfigError(
            f"engine.ep_size={engine.ep_size} with engine.zero_stage=3: DeepSpeed does not partition expert-parallel "
            "MoE parameters with ZeRO-3; set engine.ep_size=1 (ZeRO-3 partitions the experts like every other "
            "parameter), or engine.zero_stage=2 (or 1, 0) with expert parallelism"
        )
    if engine.zero_stage not in ZERO_STAGES:
        raise ConfigError(
            f"engine.zero_stage={engine.zero_stage} is not a ZeRO stage; use one of {list(ZERO_STAGES)}"
        )
    choice("engine.precision", engine.precision, PRECISIONS)
    if len(engine.adam_betas) != 2:
        raise ConfigError(f"engine.adam_betas={engine.adam_betas} must hold two numbers")
    positive("engine.ep_size", engine.ep_size)
    if world_size % engine.ep_size:
        raise ConfigError(
            f"engine.ep_size={engine.ep_size} does not divide the world size {world_size}; "
            "choose an expert-parallel size that divides the number of ranks"
        )
    nonnegative("engine.grad_clip", engine.grad_clip, "0 = no clipping")
    positive("engine.adam_eps", engine.adam_eps)
    nonnegative("engine.threads", engine.threads, "0 = torch's default")
    positive("engine.dist_timeout_s", engine.dist_timeout_s)
    positive("engine.ep_timeout_s", engine.ep_timeout_s)


def validate(cfg: TrainConfig, world_size: int = 1, files: bool = True) -> None:
    """Check a typed config before anything is built; raise ``ValueError`` naming the key and the fix.

    ``files=False`` skips what lives on disk (backbone checkpoints, tokenizer, shards): ``asymoe-train plan`` checks a
    recipe on a machine without its weights and data."""
    positive("world_size", world_size)
    choice("logger.mode", cfg.logger.mode, LOGGER_MODES)
    positive("logger.log_every", cfg.logger.log_every)
    if cfg.logger.dead_expert_steps < 0:
        raise ConfigError(f"logger.dead_expert_steps={cfg.logger.dead_expert_steps} must be >= 0 (log steps without "
                          "tokens before an expert is reported dead; 0 = never)")
    if cfg.logger.peak_tflops < 0:
        raise ConfigError(f"logger.peak_tflops={cfg.logger.peak_tflops} must be >= 0 (one device's peak TFLOP/s; 0 "
                          "looks a known GPU up in bf16 runs)")
    positive("eval.batch_size", cfg.eval.batch_size)
    positive("eval.max_new_tokens", cfg.eval.max_new_tokens)
    nonnegative("eval.max_samples", cfg.eval.max_samples, "questions per split; 0 = all")
    nonnegative("eval.grounding_sequences", cfg.eval.grounding_sequences, "0 = no grounding probe")
    nonnegative("eval.every_steps", cfg.eval.every_steps, "0 = evaluate at stage ends only")
    if cfg.eval.every_steps and cfg.engine.ep_size > 1:
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps} with engine.ep_size={cfg.engine.ep_size}: "
                          "evaluation during a stage runs on rank 0 alone, and an expert-parallel forward needs every "
                          "rank of its group; set eval.every_steps=0 (stage ends still evaluate, on consolidated "
                          "weights)")
    if cfg.eval.every_steps and cfg.engine.zero_stage == 3 and world_size > 1:
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps} with engine.zero_stage=3 on {world_size} ranks: "
                          "evaluation during a stage runs on rank 0 alone, and ZeRO-3 partitions every weight over "
                          "the ranks; set eval.every_steps=0 (stage ends still evaluate)")
    nonnegative("checkpoint.every_steps", cfg.checkpoint.every_steps, "0 = only at stage ends and on a stop signal")
    positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    positive("training.max_skipped_steps", cfg.training.max_skipped_steps)
    nonempty_path("run_dir", cfg.run_dir, "set hydra.run.dir=<directory> (the run directory)")
    nonempty_path("resume", cfg.resume, "use resume=none, resume=auto or resume=<checkpoint directory>")
    if files:
        _validate_backbone_paths(cfg)
    _validate_model(cfg)
    _validate_engine(cfg, world_size)
    _validate_curriculum(cfg, world_size)
    _validate_data(cfg, world_size, files)
    validate_classify(cfg, files)
