"""Typed configuration: one dataclass per Hydra group, registered in the ConfigStore.

Every YAML under ``conf/`` is merged onto these schemas, so a misspelt key or a value of the wrong type fails at
compose time, naming the key. Fields are documented where they are declared. Cross-field rules (divisibility,
references between groups, files on disk) live in :mod:`asymoe_train.config.validate`.

String-valued choices are ``StrEnum`` fields defined once in :mod:`asymoe_train.config.names` (OmegaConf 2.3 rejects
``Literal`` annotations): an unknown value fails at compose time with the dotted key and the allowed values, and the
members read as plain strings. ``validate`` checks them again for configs built in Python, where dataclasses check
nothing. Choices that also take free text (``resume``: a directory; ``trainable``: ``experts.<pool>``) stay ``str``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from asymoe_train.config.classify_schema import ClassifyConfig, HeadConfig, SyncConfig
from asymoe_train.config.moe_schema import MoEConfig
from asymoe_train.config.names import (
    AttnImplementation,
    Augmentation,
    Fusion,
    LMType,
    LoggerMode,
    Precision,
    Task,
    Template,
    VisionType,
)


@dataclass(kw_only=True)
class BackboneConfig:
    """Local Hugging Face checkpoints of the backbones (never downloaded). Empty = random init from the sizes in
    ``model.vision`` / ``model.lm``. When a path holds a checkpoint, its ``config.json`` overrides those sizes (and the
    type) before validation, so image-token counts and ``asymoe-train plan`` follow the checkpoint."""

    vision_path: str = ""  # SigLIP or CLIP: a vision-only or a full (text + vision) checkpoint directory
    lm_path: str = ""  # Llama, Qwen2, Mistral or Phi-3 causal LM checkpoint directory


@dataclass(kw_only=True)
class VisionConfig:
    """Vision tower architecture (the checkpoint's when ``model.backbone.vision_path`` is set)."""

    type: VisionType = VisionType.siglip
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    feature_layer: int = -1  # hidden state fed to the projector: -1 = the tower's output (after SigLIP's final
    # LayerNorm), other values index hidden_states (0 = embeddings); LLaVA uses -2, the penultimate layer's output
    merge: int = 4  # merge merge x merge patches into one image token (channel concat); 1 = one token per patch


@dataclass(kw_only=True)
class LMConfig:
    """Language model architecture: a Hugging Face Llama-family causal LM (the checkpoint's when
    ``model.backbone.lm_path`` is set)."""

    type: LMType = LMType.llama
    vocab_size: int = 0  # embedding rows; 0 = the tokenizer's vocabulary (a larger tokenizer grows the embeddings)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attn_implementation: AttnImplementation = AttnImplementation.sdpa


@dataclass(kw_only=True)
class ProjectorConfig:
    """Maps merged vision features to LM embeddings: Linear -> GELU -> Linear (LLaVA-1.5's mlp2x_gelu)."""

    hidden_size: int = 0  # 0 = the LM hidden size


@dataclass(kw_only=True)
class ModelConfig:
    """Vision tower + projector + language model with MoE slots."""

    name: str = "tiny"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Recompute activations in the backward pass instead of keeping them, layer by layer: every LM decoder layer
    # (MoE blocks included; their aux losses and statistics come back as without it) and every vision tower layer.
    # Training only. Saves most activation memory for about one extra forward pass of compute; same numbers.
    activation_checkpointing: bool = False
    # torch.compile (dynamic shapes) the expert pools and routers of every MoE block when it is upcycled; routing
    # bookkeeping and dispatch stay eager. Fuses the element-wise work (SwiGLU, hyperbolic maps, router softmax); the
    # first steps pay the compile time. Needs a C++ compiler. Not with model.moe.backend=deepspeed
    compile_moe: bool = False
    # classify stages: how the fused embedding z pools the LM's final hidden states: mean (over non-padding positions)
    # | anchors (learnable anchors cross-attend to image and text tokens separately; model.head)
    fusion: Fusion = Fusion.mean
    head: HeadConfig = field(default_factory=HeadConfig)


DEFAULT_CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What does this picture show? Answer in one sentence.",
    "Give a concise description of the photo.",
    "Summarize the content of the image in a few words.",
)


@dataclass(kw_only=True)
class DataConfig:
    """webdataset shards and the text format. Shard patterns are globs relative to ``root``.

    ``sources`` (named by ``curriculum.stages.<s>.source``) maps a name to a shard glob, or to a weighted mixture of
    shard globs::

        sources:
          pretrain: lcs558k/lcs558k-*.tar            # one glob
          instruct:                                  # a mixture: component -> {glob, weight}
            mix665k: {glob: mix665k/mix665k-*.tar, weight: 3.0}
            captions: {glob: cc3m/*.tar, weight: 1.0}

    Each training stream draws every shard from component c with probability weight_c / sum(weights) (seeded by
    stream and draw, so resume stays exact); weights are per shard draw, so they are sample shares when the shards
    hold equal numbers of samples. ``weight`` defaults to 1. Shards are conversation samples (``key.jpg|png`` +
    ``key.json`` with LLaVA ``conversations``) or img2dataset caption samples (``key.jpg`` + ``key.txt``), which
    become the conversation ``<image>\n<one of caption_prompts>`` -> caption.
    """

    name: str = "easy_vqa"
    root: str = "data/easy_vqa"
    # relative to root, or absolute: a `tokenizers` JSON file with <pad> <s> </s> <image>, or a Hugging Face tokenizer
    # directory (the LM's tokenizer with <image> added; its chat template, if any, formats conversations)
    tokenizer: str = "tokenizer.json"
    sources: dict[str, Any] = field(default_factory=dict)  # name -> shard glob or mixture (see above)
    # name -> samples (shard samples, i.e. images or conversations) in that source; needed by stages that set
    # `epochs`, and lets `asymoe-train plan` report steps per epoch
    source_sizes: dict[str, int] = field(default_factory=dict)
    eval_sources: dict[str, str] = field(default_factory=dict)  # name -> shard glob, evaluated at stage ends
    # Conversation format: auto = the tokenizer's chat template when it has one (a Hugging Face tokenizer directory
    # with `chat_template`), else plain | chat = the tokenizer's chat template (an error without one) | a named
    # template of asymoe_train.data.conversation.TEMPLATES (plain: "<s>USER: q\nASSISTANT: a</s>"). Either way only
    # answers and their end-of-turn token are supervised, and <image> expands to the image tokens
    template: Template = Template.auto
    split_turns: bool = True  # one sequence per QA turn, turns of an image share its encoding
    max_length: int = 128  # sequences longer than this are skipped and counted
    # Training batches pack their sequences into rows of at most max_length positions (first-fit, longest first, at
    # the row capacity that needs the fewest positions) instead of one padded row each; attention, positions, evidence context and the order loss stay within each sequence, so
    # the losses and gradients equal the unpacked batch's. Logged: data/padding_share (and _unpacked, for comparison)
    packing: bool = False
    # With split_turns, train on at most N turns per sample whose turn metadata `turn_cap_field` has a given value,
    # e.g. {"yes/no": 2} keeps 2 random yes/no questions per image (rebalances families; eval is never capped).
    turn_caps: dict[str, int] = field(default_factory=dict)
    turn_cap_field: str = "family"
    # Answer balancing in training: "" = off, or a turn metadata field (e.g. qtype) whose groups get every answer the
    # same total loss weight, n_g / (K_g * n_ga), computed over the stage's source at its start (needs split_turns).
    # Undoes answer priors a training split skews, such as a changing-priors split; weights are capped at
    # answer_balance_max.
    answer_balance: str = ""
    answer_balance_max: float = 10.0
    # Training-image augmentation: none | dihedral (a random one of the 8 flips/90-degree rotations; only for data
    # whose answers do not depend on orientation, such as easy-vqa's shapes and colours). Eval is never augmented.
    augment: Augmentation = Augmentation.none
    resampled: bool = True  # draw shards with replacement per rank and worker (balanced, endless); False = split
    # the shard list by rank, then by DataLoader worker, and loop over it epoch after epoch
    shuffle_buffer: int = 2000
    # Logical training streams. A stream is a seeded sequence of shard draws; ranks x workers share them out, so a
    # checkpoint's data position (stream, shard draw, sample) survives a change of ranks or workers. >= ranks x workers
    num_streams: int = 8
    record_keys: bool = False  # append each step's sample keys to <run_dir>/data_keys/rank<r>.jsonl (data audits)
    num_workers: int = 1
    # Stop when more than this fraction of the samples read is skipped (unreadable or truncated shards, counted by the
    # samples they should have held; malformed conversations; too long), in a training stage or an eval split
    max_bad_fraction: float = 0.01
    bad_fraction_min_samples: int = 200  # max_bad_fraction is enforced once this many samples have been read
    # Shard globs name local files only; true lets data.sources / eval_sources be webdataset URLs (http://, s3://,
    # pipe:<shell command>, ...), which webdataset opens as such: pipe: runs its command in a shell
    allow_remote_urls: bool = False
    # Prompts of caption-only samples (img2dataset layout): each caption sample draws one (seeded by its stream
    # position, so resume replays it); the image placeholder goes in front, `<image>\n<prompt>`.
    caption_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_CAPTION_PROMPTS))
    # Label set of classify stages: a YAML with one description per label (asymoe_train.config.labels), absolute,
    # relative to root, or relative to the source tree (data_recipes/labels/). "" = no classification
    labels: str = ""


@dataclass(kw_only=True)
class LossConfig:
    """Loss weights of a stage: L = L_lm + balance * mean_layers(sum_routers L_bal) + z * L_z + order * L_order
    + evd * L_evd (+ sync * L_sync in classify stages, whose cross-entropy takes L_lm's place). A term whose weight is 0
    is not computed. order and evd only exist for models with hyperbolic or evidence experts."""

    balance: float = 0.001
    z: float = 0.0
    order: float = 0.2
    evd: float = 0.01
    sync: float = 0.0  # classify stages: semantic synchronization (triplet loss on label descriptions; sync.*)


@dataclass(kw_only=True)
class StageConfig:
    """One curriculum stage."""

    source: str = MISSING  # key of data.sources
    # generate: next-token CE on answers | classify: one label per sample (data.labels), CE on the head's logits
    task: Task = Task.generate
    steps: int = 0  # optimizer steps; 0 = from `epochs`
    epochs: float = 0.0  # passes over data.source_sizes[source]; when > 0 it sets steps = ceil(epochs * size / global
    # batch). Streams are resampled, so an epoch is that many samples, not a guarantee to see each one once
    batch_size: int = 8  # images (shard samples) per micro-batch per rank
    grad_accum: int = 1
    global_batch_size: int = 0  # samples per optimizer step over all ranks; when > 0 it sets
    # grad_accum = global_batch_size / (batch_size * world_size), which must divide evenly
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # when > 0 it sets warmup_steps = ceil(warmup_ratio * steps)
    weight_decay: float = 0.0
    trainable: list[str] = field(default_factory=list)  # groups: asymoe_train.config.names.TRAINABLE_GROUPS
    # Per-group learning rates (trainable groups by name, e.g. vision, experts, experts.<pool>): lr_scale multiplies
    # `lr` ({vision: 0.1}), lr_groups sets a peak lr outright ({vision: 2e-6}); a group in neither trains at `lr`.
    # Each such group is an optimizer parameter group of its own with the stage's schedule shape, saved and resumed
    # with the optimizer state (on any layout). experts.<pool> wins over experts for that pool's parameters
    lr_scale: dict[str, float] = field(default_factory=dict)
    lr_groups: dict[str, float] = field(default_factory=dict)
    upcycle: bool = False  # turn FFN slots into MoE blocks (sparse upcycling) at the start of this stage
    losses: LossConfig = field(default_factory=LossConfig)
    eval: bool = True  # evaluate at the end of the stage


@dataclass(kw_only=True)
class CurriculumConfig:
    """Ordered stages; each starts from the previous stage's final checkpoint."""

    name: str = "two_stage"
    stages: dict[str, StageConfig] = field(default_factory=dict)


@dataclass(kw_only=True)
class EngineConfig:
    """DeepSpeed engine settings."""

    zero_stage: int = 0  # 0-3; ZeRO-3 partitions every parameter (experts too) and needs ep_size=1
    precision: Precision = Precision.fp32
    grad_clip: float = 1.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    ep_size: int = 1  # expert-parallel size: each pool's experts are split over groups of ep_size ranks
    dist_timeout_s: int = 120  # collective timeout, so a mismatch fails fast instead of hanging
    ep_timeout_s: int = 60  # collective timeout of the expert-parallel groups (token exchange inside each step)
    threads: int = 0  # torch intra-op threads per rank; 0 = leave torch's default


@dataclass(kw_only=True)
class LoggerConfig:
    """Weights & Biases (rank 0 only) and the console."""

    mode: LoggerMode = LoggerMode.offline  # offline | online | disabled
    project: str = "asymoe_train"
    entity: str = ""
    log_every: int = 10  # optimizer steps between logged metrics
    progress: bool = True  # console progress bar
    # peak TFLOP/s of one device for perf/mfu; 0 = the datasheet bf16 peak of a known GPU in bf16 runs, else no MFU
    peak_tflops: float = 0.0
    # warn when an expert of a router has received no tokens (summed over all ranks) for this many consecutive log
    # steps; 0 = never. moe/dead_streak counts such experts at every log step
    dead_expert_steps: int = 5


@dataclass(kw_only=True)
class CheckpointConfig:
    """Resumable checkpoints under <run_dir>/checkpoints: stage ends always, plus every ``every_steps``."""

    every_steps: int = 0  # optimizer steps between mid-stage checkpoints; 0 = only at stage ends (and on SIGTERM)
    keep_last: int = 2  # mid-stage checkpoints kept (oldest removed first); stage-end checkpoints are always kept


@dataclass(kw_only=True)
class TrainingConfig:
    """The training loop's guard against divergence: an optimizer step whose loss or gradient norm is not finite is
    skipped (weights and optimizer state untouched) and counted."""

    max_skipped_steps: int = 10  # stop the run after this many skipped optimizer steps in a row (>= 1)


@dataclass(kw_only=True)
class EvalConfig:
    """Exact-match VQA evaluation by greedy generation (POPE metrics on POPE splits), at the end of each stage whose
    ``eval`` is true, and every ``every_steps`` during it."""

    max_samples: int = 0  # questions per split; 0 = all
    # optimizer steps between evaluations during a stage (rank 0, the stage's eval splits, eval.max_samples questions
    # of each; logged to metrics.jsonl and W&B, nothing else changes: the data position and every RNG are as if it
    # had not run); 0 = at stage ends only. In multi-rank runs the other ranks wait in the next collective, so one
    # such evaluation must take less than engine.dist_timeout_s
    every_steps: int = 0
    batch_size: int = 256  # questions per generation batch
    max_new_tokens: int = 4
    # grounding probe after each evaluation: per LM layer, the attention mass that answer-predicting positions put on
    # image tokens, over the first N labelled sequences of the first eval split (eval/<stage>.json "grounding"); 0 = off
    grounding_sequences: int = 0
    # the AsyMoE paper's diagnostics after each evaluation (asymoe_train.evaluation.diagnostics): per MoE layer and
    # expert the evidence-grounding ratio F(E_k) and the evidence-dependence ratio R_k (image intact vs blanked), and
    # the attention entropy per layer, over the first N labelled sequences of the first eval split
    # (eval/<stage>.json "diagnostics"); 0 = off
    diagnostics_sequences: int = 0


@dataclass(kw_only=True)
class TrainConfig:
    """Root of the composed configuration."""

    experiment: str = "default"
    seed: int = 0
    run_dir: str = MISSING  # outputs/<experiment>/<run_id>; every rank writes under the same one
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)  # semantic synchronization of classify stages
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)  # evaluation of classify stages
    resume: str = "none"  # none | auto (latest complete checkpoint of run_dir, if any) | a checkpoint directory
    # a finished stage of another run (its checkpoints/<stage> directory): this run skips that stage and the ones
    # before it and starts the next from its weights, with this run's own later stages and, while the weights are
    # still dense (no stage up to it upcycles), its own model.moe. One align run can so feed several variants.
    init_from: str = ""
