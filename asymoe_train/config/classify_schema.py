"""Config of the classification task mode (A-MESS, arXiv 2503.19474): the head, semantic synchronization and
out-of-scope detection. Registered through :class:`asymoe_train.config.schema.TrainConfig`; the string choices are
StrEnums of :mod:`asymoe_train.config.names`, checked again by :mod:`asymoe_train.config.validate_classify`.

The paper's full text is not available offline; the forms below are our reading of its abstract, each a knob.
"""

from __future__ import annotations

from dataclasses import dataclass

from asymoe_train.config.names import FusionCombine, OOSScore, SyncNegatives


@dataclass(kw_only=True)
class HeadConfig:
    """The classification head on the LM's final hidden states (``model.head``): fusion into z, class logits, and
    the projection of label descriptions into z's space. Built when ``num_classes`` > 0."""

    # in-scope labels of data.labels; derived from that file at start (asymoe_train.config.labels.resolve_labels),
    # 0 = no head (generation only)
    num_classes: int = 0
    embed_dim: int = 0  # size of the fused embedding z; 0 = the LM hidden size
    num_anchors: int = 4  # model.fusion=anchors: K learnable anchors per modality's cross-attention
    num_heads: int = 4  # attention heads of the anchor cross-attention (must divide the LM hidden size)
    combine: FusionCombine = FusionCombine.concat  # per-modality anchor outputs -> z: concat (+ projection) | attention (over modalities)


@dataclass(kw_only=True)
class SyncConfig:
    """Semantic synchronization (``losses.sync`` is its weight per stage): a triplet loss in cosine distance pulls z
    toward its label's description embedding and away from other labels' by ``margin``."""

    margin: float = 0.2  # triplet margin, in cosine distance (1 - cos)
    negatives: SyncNegatives = SyncNegatives.hardest  # hardest: the closest other description | all: mean of the hinge over all others
    # re-encode the descriptions with the current LM every N optimizer steps of a classify stage (no gradient through
    # the LM; the projection trains); 0 = frozen: encoded once at the stage's start. The encodings are kept in the
    # model's weights, so a resumed run continues with the same ones
    refresh_steps: int = 50


@dataclass(kw_only=True)
class ClassifyConfig:
    """Evaluation of classify stages: accuracy, macro-F1 and weighted-F1 over in-scope labels on every eval split;
    with ``oos_split``, out-of-scope detection (MIntRec2.0's open-set protocol)."""

    # eval source whose samples choose the out-of-scope threshold (the one maximising its (C+1)-class macro-F1); the
    # threshold then applies to every split. "" = no out-of-scope detection
    oos_split: str = ""
    # a sample is out-of-scope when this score is below the threshold: description = its best cosine similarity to
    # an in-scope label's projected description | confidence = its largest class probability
    oos_score: OOSScore = OOSScore.description
