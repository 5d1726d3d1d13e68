"""Activation memory of a training micro-batch per GPU, estimated from the config (``asymoe-train plan``).

What autograd keeps for the backward pass, counted per token (one element = the training dtype's bytes, fp32 where
the code computes in fp32), for a micro-batch of ``batch_size`` samples of at most ``data.max_length`` tokens
(N = batch_size x max_length positions: packed rows are full) and ``batch_size`` images:

- a decoder layer: its two RMSNorms (input and normalised output: 4 D), q, k, v and their rotary copies
  (3 (D + 2 kv)), the attention output (D, and the output projection's input D), and the attention itself:
  ``sdpa`` (flash / memory-efficient) keeps its per-head log-sum-exp (H), ``eager`` the scores and probabilities
  of every query against every key (2 H T); an MLP keeps its input and gate, up, activation and product (D + 4 F);
- an MoE layer keeps, instead of the MLP, its routers' logits and probabilities (fp32, 2 R each), the dispatched
  rows (top_k D, gathered), each expert row's SwiGLU (D + 4 F_e) and output (D), and the weighted outputs (top_k D);
  rows per token are top_k with host-side counts (CPU) or, with grouped GEMMs (GPU), the static region of every pool
  (sum over pools of min(top_k, experts)); hyperbolic rows also their fp32 exp/log maps (2 D + 2 F_e, fp32) and
  evidence pools their context attention (q, k, v, output: 4 D per token, and 2 H_e T with eager attention);
- with ``model.activation_checkpointing`` each decoder layer keeps only its input (D) and the largest layer's
  activations come back once during the backward pass (recomputation); the MoE blocks' statistics and auxiliary
  losses of the first run stay;
- logits (V per position) in the training dtype, their fp32 copy and the fp32 log-probabilities of the loss;
- the vision tower: if it trains, every layer's activations (LayerNorms 4 W, q k v 3 W, attention output 2 W, MLP
  W + 2 M, plus its attention) per patch; if frozen, one layer's worth while it runs; the projector's input and
  hidden (W m^2 + 2 D per image token); the input embeddings with the image tokens written in (2 D per position).

Not counted: the CUDA context, communication buckets, ZeRO-3's gathered parameters in flight (one MoE block or
layer at a time, prefetch aside) and allocator fragmentation; :data:`RESERVE_GIB` is set aside for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from asymoe_train.config.derive import evidence_layer_indices, image_tokens_per_image, moe_layer_indices

RESERVE_GIB = 4.0  # CUDA context, NCCL buffers, ZeRO-3 parameters in flight and fragmentation, per GPU
FP32 = 4


@dataclass
class Activations:
    """Activation bytes per GPU for one micro-batch, by part."""

    layers: float  # decoder layers as kept for backward (their inputs only, with activation checkpointing)
    recompute: float  # the largest layer recomputed in the backward pass (checkpointing), else 0
    logits: float
    vision: float  # tower, projector and input embeddings
    tokens: int  # positions per micro-batch

    @property
    def total(self) -> float:
        return self.layers + self.recompute + self.logits + self.vision


def _attention(lm, seq_len: int, implementation: str) -> float:
    """Elements per token of one decoder layer's attention and norms."""
    kv = lm.num_kv_heads * (lm.hidden_size // lm.num_heads)
    d = lm.hidden_size
    scores = 2 * lm.num_heads * seq_len if implementation == "eager" else lm.num_heads
    return 4 * d + 3 * (d + 2 * kv) + 2 * d + scores


def _moe_rows(moe, device: str) -> tuple[float, dict[str, float]]:
    """Expert rows per token: in all, and per pool."""
    pools = {p.name: p for p in moe.pools}
    if device == "cuda" and moe.expert_compute in ("auto", "grouped"):
        per_pool = {name: float(min(moe.top_k, p.num_experts)) for name, p in pools.items()}
    else:  # host counts: the top_k rows of a token go to whichever experts it chose; count the widest pools first
        per_pool, left = {}, float(moe.top_k)
        for name, p in sorted(pools.items(), key=lambda item: -item[1].width):
            per_pool[name] = min(left, p.num_experts)
            left -= per_pool[name]
    return sum(per_pool.values()), per_pool


def _moe_layer(cfg, seq_len: int, device: str, evidence_here: bool, b: int) -> float:
    """Elements per token of an MoE layer's block (the attention part not included), b bytes each."""
    lm, moe = cfg.lm, cfg.moe
    d, f = lm.hidden_size, lm.intermediate_size
    reach = sum(sum(p.num_experts for p in moe.pools if p.name in r.pools) for r in moe.routers)
    elements = 2 * reach * FP32 / b  # router logits and probabilities, fp32
    rows, per_pool = _moe_rows(moe, device)
    elements += 2 * moe.top_k * d + rows * d  # dispatched rows, weighted outputs; expert outputs
    for pool in moe.pools:
        if pool.expert == "evidence" and not evidence_here:
            continue
        width = round(f * pool.width)
        elements += per_pool[pool.name] * (d + 4 * width)
        if pool.expert == "hyperbolic":
            elements += per_pool[pool.name] * (2 * d + 2 * width) * FP32 / b
        if pool.expert == "evidence":
            eager = 2 * moe.evidence.num_heads * seq_len if lm.attn_implementation == "eager" else 0
            elements += 4 * d + eager
    return elements


def activation_memory(model, batch_size: int, max_length: int, precision: str, vision_trains: bool,
                      vocab_size: int, upcycled: bool, device: str = "cuda") -> Activations:
    """The estimate of the module docstring, for a model config ``model`` (``TrainConfig.model``)."""
    b = 2 if precision == "bf16" else 4
    lm, vision = model.lm, model.vision
    n = batch_size * max_length
    attention = _attention(lm, max_length, lm.attn_implementation)
    mlp = lm.hidden_size + 4 * lm.intermediate_size
    moe_layers = moe_layer_indices(model.moe.layers, lm.num_layers) if upcycled and model.moe.pools else []
    evidence = set(evidence_layer_indices(model.moe.evidence.layers, moe_layers)) if moe_layers else set()
    per_layer = [attention + (_moe_layer(model, max_length, device, i in evidence, b) if i in moe_layers else mlp)
                 for i in range(lm.num_layers)]
    if model.activation_checkpointing:
        layers = lm.num_layers * lm.hidden_size * n * b
        recompute = max(per_layer) * n * b
    else:
        layers, recompute = sum(per_layer) * n * b, 0.0
    logits = n * vocab_size * (b + 2 * FP32)
    patches = (vision.image_size // vision.patch_size) ** 2 + (1 if vision.type == "clip" else 0)
    w, m = vision.hidden_size, vision.intermediate_size
    tower_layer = (4 * w + 3 * w + 2 * w + w + 2 * m
                   + (2 * vision.num_heads * patches if lm.attn_implementation == "eager" else vision.num_heads))
    tower = tower_layer * (vision.num_layers if vision_trains else 1) * patches * batch_size * b
    image_tokens = image_tokens_per_image(vision) * batch_size
    projector = image_tokens * (w * vision.merge**2 + 2 * lm.hidden_size) * b
    embeddings = 2 * lm.hidden_size * n * b
    return Activations(layers, recompute, logits, tower + projector + embeddings, n)
