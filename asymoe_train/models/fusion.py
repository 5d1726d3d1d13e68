"""The classification head of the task mode ``classify`` (A-MESS, arXiv 2503.19474, as we read its abstract): the
LM's final hidden states are fused into one embedding z per sample, z gives the class logits, and the label
descriptions' embeddings are projected into z's space for semantic synchronization and out-of-scope detection.

Fusion (``model.fusion``):
- ``mean``: the mean of the final hidden states over a row's non-padding positions, then a linear map to z;
- ``anchors`` (anchor-based multimodal embedding): K learnable anchors cross-attend to the image tokens and,
  separately, to the text tokens of each row; the two per-modality anchor outputs are combined (``model.head.combine``)
  by ``concat`` (all anchor outputs concatenated, then projected) or ``attention`` (per anchor, a softmax over the
  modalities present in the row, then projected).
Padding is never attended: its positions get exactly zero weight, so what padding holds changes nothing.

# B rows, T positions, D LM hidden, H heads, K anchors, M modalities (image, text), Z embedding, C classes
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from asymoe_train.config.classify_schema import HeadConfig
from asymoe_train.modality import IMAGE, PAD, TEXT

FUSED_MODALITIES = (IMAGE, TEXT)  # the anchors' per-modality cross-attentions, in this order


def masked_mean(h_BTD: torch.Tensor, keep_BT: torch.Tensor) -> torch.Tensor:
    """Mean of ``h_BTD`` over the positions ``keep_BT`` allows, per row ``[B, D]``; sums in fp32; 0 for a row with
    none."""
    weights_BT = keep_BT.float()
    total_BD = torch.einsum("bt,btd->bd", weights_BT, h_BTD.float())
    return (total_BD / weights_BT.sum(-1, keepdim=True).clamp_min(1)).to(h_BTD.dtype)


class MeanFusion(nn.Module):
    """z = W mean(h over non-padding positions)."""

    def __init__(self, hidden: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(hidden, embed_dim)

    def forward(self, h_BTD: torch.Tensor, modality_BT: torch.Tensor) -> torch.Tensor:
        return self.proj(masked_mean(h_BTD, modality_BT != PAD))


class AnchorCrossAttention(nn.Module):
    """K learnable anchors attend (multi-head) to the positions a per-row mask allows; softmax statistics in fp32.
    A row with no allowed position gets zero attention weights, so its output is the output projection's bias."""

    def __init__(self, hidden: int, num_anchors: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.anchors_KD = nn.Parameter(torch.randn(num_anchors, hidden) * 0.02)
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def weights(self, h_BTD: torch.Tensor, allowed_BT: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, H, K, T]``: exactly 0 at positions ``allowed_BT`` excludes."""
        return self._weights(self.key_value(h_BTD)[..., : h_BTD.shape[-1]], allowed_BT)

    def _weights(self, key_BTD: torch.Tensor, allowed_BT: torch.Tensor) -> torch.Tensor:
        b, t, d = key_BTD.shape
        k, heads = self.anchors_KD.shape[0], self.num_heads
        q_HKc = self.query(self.anchors_KD).reshape(k, heads, d // heads).transpose(0, 1)
        scores_BHKT = torch.einsum("hkc,bthc->bhkt", q_HKc, key_BTD.reshape(b, t, heads, d // heads))
        scores_BHKT = scores_BHKT.float() / math.sqrt(d // heads)  # softmax statistics in fp32
        allowed_B11T = allowed_BT[:, None, None, :]
        # finfo.min rather than -inf keeps a row with no allowed position finite; the product zeroes it exactly
        scores_BHKT = scores_BHKT.masked_fill(~allowed_B11T, torch.finfo(torch.float32).min)
        return torch.softmax(scores_BHKT, dim=-1) * allowed_B11T

    def forward(self, h_BTD: torch.Tensor, allowed_BT: torch.Tensor) -> torch.Tensor:
        """Anchor outputs ``[B, K, D]``."""
        b, t, d = h_BTD.shape
        key_BTD, value_BTD = self.key_value(h_BTD).split(d, dim=-1)
        weights_BHKT = self._weights(key_BTD, allowed_BT).to(value_BTD.dtype)
        value_BTHc = value_BTD.reshape(b, t, self.num_heads, d // self.num_heads)
        out_BKHc = torch.einsum("bhkt,bthc->bkhc", weights_BHKT, value_BTHc)
        return self.out(out_BKHc.reshape(b, -1, d))


class AnchorFusion(nn.Module):
    """Anchor-based multimodal embedding: one anchor cross-attention per modality (image tokens, text tokens), then
    ``concat`` (flatten all anchor outputs, project) or ``attention`` (per anchor, softmax over the modalities the
    row has, weighted sum, flatten, project)."""

    def __init__(self, hidden: int, embed_dim: int, num_anchors: int, num_heads: int, combine: str):
        super().__init__()
        self.combine = combine
        self.attend = nn.ModuleList(AnchorCrossAttention(hidden, num_anchors, num_heads) for _ in FUSED_MODALITIES)
        fused = num_anchors * hidden * (len(FUSED_MODALITIES) if combine == "concat" else 1)
        if combine == "attention":
            self.score = nn.Linear(hidden, 1)
        self.proj = nn.Linear(fused, embed_dim)

    def forward(self, h_BTD: torch.Tensor, modality_BT: torch.Tensor) -> torch.Tensor:
        present_BM = torch.stack([(modality_BT == m).any(-1) for m in FUSED_MODALITIES], dim=-1)
        anchors_BMKD = torch.stack([attend(h_BTD, modality_BT == m)
                                    for attend, m in zip(self.attend, FUSED_MODALITIES)], dim=1)
        b = h_BTD.shape[0]
        if self.combine == "concat":
            return self.proj(anchors_BMKD.reshape(b, -1))
        scores_BMK = self.score(anchors_BMKD).squeeze(-1).float()
        scores_BMK = scores_BMK.masked_fill(~present_BM[..., None], torch.finfo(torch.float32).min)
        weights_BMK = torch.softmax(scores_BMK, dim=1).to(anchors_BMKD.dtype)
        return self.proj(torch.einsum("bmk,bmkd->bkd", weights_BMK, anchors_BMKD).reshape(b, -1))


def standardise(descriptions_CD: torch.Tensor) -> torch.Tensor:
    """Description embeddings centred over the labels and scaled to unit RMS each (fp32). Mean-pooled descriptions
    share most of their direction (cosine ~0.98 between easy-vqa's), which would leave the cosine distances of the
    triplet loss almost equal for every label; what remains after centring is what tells the labels apart."""
    centred_CD = descriptions_CD.float() - descriptions_CD.float().mean(0, keepdim=True)
    return centred_CD * torch.rsqrt(centred_CD.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))


@dataclass
class HeadOutput:
    z_BZ: torch.Tensor  # the fused embedding of each row
    logits_BC: torch.Tensor  # class logits
    descriptions_CZ: torch.Tensor  # the label descriptions' embeddings projected into z's space


class ClassifyHead(nn.Module):
    """Fusion -> z -> class logits, plus the projection of the cached description embeddings ``descriptions_CD``
    (a buffer: the training objective refreshes it, and checkpoints keep it, so a resumed run uses the same), centred
    and scaled first (:func:`standardise`)."""

    def __init__(self, cfg: HeadConfig, fusion: str, hidden: int):
        super().__init__()
        embed_dim = cfg.embed_dim or hidden
        if fusion == "anchors":
            self.fusion = AnchorFusion(hidden, embed_dim, cfg.num_anchors, cfg.num_heads, cfg.combine)
        else:
            self.fusion = MeanFusion(hidden, embed_dim)
        self.classifier = nn.Linear(embed_dim, cfg.num_classes)
        self.describe = nn.Linear(hidden, embed_dim, bias=False)  # a bias would be shared by every description
        self.register_buffer("descriptions_CD", torch.zeros(cfg.num_classes, hidden))

    def forward(self, hidden_BTD: torch.Tensor, modality_BT: torch.Tensor) -> HeadOutput:
        z_BZ = self.fusion(hidden_BTD, modality_BT)
        descriptions_CZ = self.describe(standardise(self.descriptions_CD).to(hidden_BTD.dtype))
        return HeadOutput(z_BZ=z_BZ, logits_BC=self.classifier(z_BZ), descriptions_CZ=descriptions_CZ)
