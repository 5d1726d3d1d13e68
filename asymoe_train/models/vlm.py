"""The vision-language model: vision tower -> patch merge -> projector -> LM decoder with MoE slots.

The decoder loop lives here (not inside Hugging Face's layer forward) so that MoE blocks receive per-token modality
and return their losses and statistics as values.

# B sequences, T positions, D LM hidden, N images, P patches, I image tokens per image, V vocab
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from asymoe_train.config.derive import evidence_layer_indices, moe_layer_indices
from asymoe_train.config.schema import ModelConfig
from asymoe_train.modality import IMAGE, PAD
from asymoe_train.models.backbones import build_language_model, build_vision_tower
from asymoe_train.models.fusion import ClassifyHead, HeadOutput
from asymoe_train.moe.block import MoEBlock, MoEOutput, compile_block
from asymoe_train.moe.evidence import TokenContext


class Projector(nn.Module):
    """Two-layer GELU MLP from merged vision features to LM embeddings (LLaVA-1.5 mlp2x_gelu)."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class VLMOutput:
    logits_BTV: torch.Tensor | None  # None for a classify forward (no LM head)
    moe: dict[int, MoEOutput] = field(default_factory=dict)  # MoE layer index -> block output
    hidden_BTD: torch.Tensor | None = None  # the LM's final hidden states (after its last norm)
    head: HeadOutput | None = None  # classify forward: the classification head's output


class VisionLanguageModel(nn.Module):
    """Vision tower, projector and a Llama-family LM whose FFN slots in ``moe_layers`` can become MoE blocks."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_token_id: int):
        super().__init__()
        self.cfg = cfg
        self.vision = build_vision_tower(cfg.vision, cfg.backbone.vision_path)
        if cfg.activation_checkpointing:
            # Hugging Face's per-layer checkpointing of the tower (active in training mode only); non-reentrant, so
            # it also works when the tower is frozen and no input needs a gradient
            tower = self.vision
            enable = getattr(tower, "activation_checkpointing_enable", None) or tower.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        self.lm = build_language_model(cfg.lm, vocab_size, pad_token_id, cfg.backbone.lm_path)
        lm_hidden = self.lm.config.hidden_size
        vision_hidden = self.vision.config.hidden_size
        self.merge = cfg.vision.merge
        self.projector = Projector(vision_hidden * self.merge**2, cfg.projector.hidden_size or lm_hidden, lm_hidden)
        self.moe_layers = moe_layer_indices(cfg.moe.layers, self.lm.config.num_hidden_layers)
        # Injected by the distributed layer before upcycling (models import neither torch.distributed nor
        # deepspeed): the token dispatcher (None = local; an all-to-all one splits every pool's experts over the
        # expert-parallel ranks) and the block class (a subclass of MoEBlock, e.g. the DeepSpeed-backed one).
        self.dispatcher = None
        self.block_type: type[MoEBlock] = MoEBlock
        # classify stages (model.head.num_classes > 0): fusion, class logits, description projection
        self.head = ClassifyHead(cfg.head, cfg.fusion, lm_hidden) if cfg.head.num_classes else None

    # ----------------------------------------------------------------------------------------------------- structure
    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.model.layers

    @property
    def is_upcycled(self) -> bool:
        return any(isinstance(self.layers[i].mlp, MoEBlock) for i in self.moe_layers)

    def upcycle(self, generator: torch.Generator | None = None) -> None:
        """Sparse upcycling: replace the MLP of every MoE layer by an MoE block whose experts copy it.

        A dense variant (no pools) keeps its MLPs.
        """
        if not self.cfg.moe.pools or self.is_upcycled:
            return
        lm_cfg = self.lm.config
        evidence_pools = tuple(p.name for p in self.cfg.moe.pools if p.expert == "evidence")
        ep_layers = evidence_layer_indices(self.cfg.moe.evidence.layers, self.moe_layers)
        for i in self.moe_layers:
            self.layers[i].mlp = self.block_type.upcycle(
                self.layers[i].mlp, self.cfg.moe, lm_cfg.hidden_size, lm_cfg.intermediate_size, lm_cfg.hidden_act,
                self.dispatcher, generator, skip_pools=() if i in ep_layers else evidence_pools,
            )
            self.layers[i].mlp.name = f"lm.model.layers.{i}.mlp"
            if self.cfg.compile_moe:
                compile_block(self.layers[i].mlp)

    @property
    def has_evidence_experts(self) -> bool:
        return any(getattr(p, "needs_context", False) for b in self.moe_blocks().values() for p in b.pools.values())

    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {i: self.layers[i].mlp for i in self.moe_layers if isinstance(self.layers[i].mlp, MoEBlock)}

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters split over expert-parallel ranks, by their names in the model: dim 0 indexes the experts this
        process holds (all of them without expert parallelism)."""
        return {f"lm.model.layers.{i}.mlp.{name}": p for i, block in self.moe_blocks().items()
                for name, p in block.expert_parameters()}

    def parameter_counts(self) -> tuple[int, int]:
        """(total parameters, parameters activated per token): of the experts, the top_k largest a router reaches
        (the most any token uses), not all."""
        total = sum(p.numel() for p in self.parameters())
        activated = total
        for block in self.moe_blocks().values():
            experts_total, per_token = block.expert_param_count()
            activated += per_token - experts_total
        return total, activated

    # ------------------------------------------------------------------------------------------------------ forward
    def encode_images(self, pixel_values_NCHW: torch.Tensor) -> torch.Tensor:
        """Images -> LM-space image tokens ``[N, I, D]``: tower features, merge x merge patch concat, projector."""
        feature_layer = self.cfg.vision.feature_layer
        out = self.vision(pixel_values=pixel_values_NCHW, output_hidden_states=feature_layer != -1)
        feats_NPC = out.last_hidden_state if feature_layer == -1 else out.hidden_states[feature_layer]
        if self.cfg.vision.type == "clip":
            feats_NPC = feats_NPC[:, 1:]  # drop CLS: image tokens are patches
        n, p, c = feats_NPC.shape
        grid = int(round(p**0.5))
        m = self.merge
        feats = feats_NPC.reshape(n, grid // m, m, grid // m, m, c).permute(0, 1, 3, 2, 4, 5)
        return self.projector(feats.reshape(n, (grid // m) ** 2, m * m * c))

    def embed(self, input_ids_BT, modality_BT, pixel_values_NCHW, image_index_B) -> torch.Tensor:
        """Token embeddings with each sequence's image tokens written at its image positions."""
        embeds_BTD = self.lm.get_input_embeddings()(input_ids_BT)
        image_mask_BT = modality_BT == IMAGE
        if pixel_values_NCHW.shape[0] == 0:
            if image_mask_BT.any():
                raise ValueError("batch has image positions but no pixel values")
            # No image: the tower still runs, on one blank image weighted 0, so every rank runs the same graph and
            # every parameter gets a gradient (ZeRO-2 reduces gradients as they arrive: a rank without them would
            # mismatch the others' collectives).
            size = self.cfg.vision.image_size
            blank_NID = self.encode_images(embeds_BTD.new_zeros(1, 3, size, size))
            return embeds_BTD + 0.0 * blank_NID.sum().to(embeds_BTD.dtype)
        images_NID = self.encode_images(pixel_values_NCHW.to(embeds_BTD.dtype))
        has_image_B = image_index_B >= 0
        per_seq = images_NID[image_index_B[has_image_B]].reshape(-1, embeds_BTD.shape[-1])
        assert per_seq.shape[0] == int(image_mask_BT.sum()), "image positions do not match image tokens"
        return embeds_BTD.masked_scatter(image_mask_BT.unsqueeze(-1), per_seq.to(embeds_BTD.dtype))

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        modality_BT: torch.Tensor,
        pixel_values_NCHW: torch.Tensor,
        image_index_B: torch.Tensor,
        context_BT: torch.Tensor | None = None,
        segment_BT: torch.Tensor | None = None,
        modality_counts: list[list[int]] | None = None,
        classify: bool = False,
    ) -> VLMOutput:
        """``context_BT`` marks evidence tokens (image and prompt; not answers, not padding); evidence experts need it.
        ``segment_BT`` (packed batches, ``asymoe_train.data.batch``): the sequence of each position, -1 for padding;
        attention, positions, evidence context and the order loss then stay within each sequence, and
        ``image_index_B`` has one entry per sequence. ``modality_counts`` (host lists: tokens per row and
        modality code) lets evidence experts ask queries only for the tokens that can be routed to them. ``classify``
        runs the classification head on the final hidden states instead of the LM head (``VLMOutput.head``)."""
        h_BTD = self.embed(input_ids_BT, modality_BT, pixel_values_NCHW, image_index_B)
        b, t, d = h_BTD.shape
        keep_BT = modality_BT != PAD
        causal_TT = torch.ones(t, t, dtype=torch.bool, device=h_BTD.device).tril()
        allowed_B1TT = (causal_TT.unsqueeze(0) & keep_BT.unsqueeze(1)).unsqueeze(1)
        if segment_BT is None:
            position_BT = (keep_BT.long().cumsum(-1) - 1).clamp_min(0)  # works for left and right padding
        else:
            allowed_B1TT = allowed_B1TT & (segment_BT.unsqueeze(-1) == segment_BT.unsqueeze(1)).unsqueeze(1)
            # positions restart at each sequence's first position (sequences are contiguous within a row)
            index_BT = torch.arange(t, device=h_BTD.device).expand(b, t)
            starts_BT = torch.ones_like(keep_BT)
            starts_BT[:, 1:] = segment_BT[:, 1:] != segment_BT[:, :-1]
            position_BT = index_BT - torch.cummax(torch.where(starts_BT, index_BT, 0), dim=-1).values
        ctx = None
        if context_BT is not None:
            ctx = TokenContext((b, t), context_BT, modality_BT, segment_BT,
                               image_index_B.shape[0] if segment_BT is not None else b, modality_counts)
        # Additive mask with finfo.min (not -inf) so fully masked pad rows stay finite.
        mask_B1TT = torch.zeros(allowed_B1TT.shape, dtype=h_BTD.dtype, device=h_BTD.device)
        mask_B1TT.masked_fill_(~allowed_B1TT, torch.finfo(h_BTD.dtype).min)
        rope = self.lm.model.rotary_emb(h_BTD, position_BT)
        modality_T = modality_BT.reshape(-1)
        moe_out: dict[int, MoEOutput] = {}
        # Activation checkpointing: each decoder layer keeps only its input; the backward pass runs it again. It is
        # non-reentrant, so the MoE block's result object (aux losses with their graphs, statistics) comes back from
        # the first run as usual and the recomputation rebuilds the tensors its backward needs.
        run = self.decoder_layer
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            run = functools.partial(checkpoint, self.decoder_layer, use_reentrant=False)
        for i, layer in enumerate(self.layers):
            h_BTD, out = run(layer, h_BTD, rope, mask_B1TT, modality_T, ctx)
            if out is not None:
                moe_out[i] = out
        hidden_BTD = self.lm.model.norm(h_BTD)
        if classify:
            if self.head is None:
                raise ValueError("a classify forward needs the classification head: set data.labels")
            return VLMOutput(logits_BTV=None, moe=moe_out, hidden_BTD=hidden_BTD,
                             head=self.head(hidden_BTD, modality_BT))
        return VLMOutput(logits_BTV=self.lm.lm_head(hidden_BTD), moe=moe_out, hidden_BTD=hidden_BTD)

    @staticmethod
    def decoder_layer(layer: nn.Module, h_BTD: torch.Tensor, rope, mask_B1TT: torch.Tensor, modality_T: torch.Tensor,
                      ctx: TokenContext | None) -> tuple[torch.Tensor, MoEOutput | None]:
        """One pre-norm decoder layer: attention, then the MLP or MoE block; returns the block's output too."""
        b, t, d = h_BTD.shape
        attn, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(h_BTD), position_embeddings=rope, attention_mask=mask_B1TT
        )
        h_BTD = h_BTD + attn
        x_BTD = layer.post_attention_layernorm(h_BTD)
        out = None
        if isinstance(layer.mlp, MoEBlock):
            out = layer.mlp(x_BTD.reshape(b * t, d), modality_T, ctx)
            x_BTD = out.hidden_TD.reshape(b, t, d)
        else:
            x_BTD = layer.mlp(x_BTD)
        return h_BTD + x_BTD, out


def build_model(cfg: ModelConfig, vocab_size: int, pad_token_id: int, seed: int = 0) -> VisionLanguageModel:
    """Build the dense model (MoE slots still hold MLPs) with deterministic initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionLanguageModel(cfg, vocab_size, pad_token_id)
