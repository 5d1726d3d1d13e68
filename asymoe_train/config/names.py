"""The allowed values of the config's string-valued choices: one definition each.

Each choice is a :class:`~enum.StrEnum`, the type of its schema field, so OmegaConf rejects an unknown value at
compose time, naming the key and the allowed values; members compare and hash equal to their strings, so code reads
them as plain strings. The ``*_TYPES``-style tuples list the same values as plain strings for the layers that key
their tables by them (the expert registry, the backbone builders, the conversation templates) and for error messages.
Only the standard library is imported: every layer may import this module.
"""

from __future__ import annotations

from enum import StrEnum


def values(choice: type[StrEnum]) -> tuple[str, ...]:
    """A choice's allowed values as plain strings, in declaration order."""
    return tuple(member.value for member in choice)


class VisionType(StrEnum):  # model.vision.type: the Hugging Face vision towers the backbone builders know
    siglip = "siglip"
    clip = "clip"


class LMType(StrEnum):  # model.lm.type: the Hugging Face causal LMs the backbone builders know
    llama = "llama"
    qwen2 = "qwen2"
    mistral = "mistral"
    phi3 = "phi3"


class AttnImplementation(StrEnum):  # model.lm.attn_implementation
    sdpa = "sdpa"
    eager = "eager"


class ExpertType(StrEnum):  # model.moe.pools.<i>.expert
    ffn = "ffn"
    evidence = "evidence"
    hyperbolic = "hyperbolic"


class HyperbolicGeometry(StrEnum):  # model.moe.hyperbolic.geometry: hyperboloid | ball
    lorentz = "lorentz"
    poincare = "poincare"


class ConeParent(StrEnum):  # model.moe.hyperbolic.cone_parent
    vision = "vision"
    text = "text"


class ConeForm(StrEnum):  # model.moe.hyperbolic.cone_form: MERU's cone | the AsyMoE paper's (eqs. 15-17)
    meru = "meru"
    paper = "paper"


class EvidenceForm(StrEnum):  # model.moe.evidence.form: our first reading | the AsyMoE paper's expert (eqs. 7-9)
    additive = "additive"
    paper = "paper"


class EvidenceScore(StrEnum):  # model.moe.evidence.score: attention mass on context | learned (eq. 20)
    attention_mass = "attention_mass"
    learned = "learned"


class EvidenceLossKind(StrEnum):  # model.moe.evidence.loss_kind
    routing = "routing"
    counterfactual = "counterfactual"
    none = "none"  # no L_evd: the AsyMoE paper's loss (eq. 21)


class MoEBackend(StrEnum):  # model.moe.backend
    native = "native"
    deepspeed = "deepspeed"


class ExpertCompute(StrEnum):  # model.moe.expert_compute (asymoe_train.moe.grouped)
    auto = "auto"
    grouped = "grouped"
    loop = "loop"


class Modality(StrEnum):  # model.moe.routers.<i>.modalities: the token modalities a router serves
    text = "text"
    image = "image"


class Template(StrEnum):  # data.template: auto | chat (the tokenizer's) | a plain-text template by name
    auto = "auto"
    chat = "chat"
    plain = "plain"


class Augmentation(StrEnum):  # data.augment
    none = "none"
    dihedral = "dihedral"


class Precision(StrEnum):  # engine.precision
    fp32 = "fp32"
    bf16 = "bf16"


class LoggerMode(StrEnum):  # logger.mode
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Task(StrEnum):  # curriculum.stages.<s>.task: answer tokens by next-token CE | one label per sample (A-MESS)
    generate = "generate"
    classify = "classify"


class Fusion(StrEnum):  # model.fusion: how the fused embedding z pools the final hidden states (models.fusion)
    mean = "mean"
    anchors = "anchors"


class FusionCombine(StrEnum):  # model.head.combine: how the per-modality anchor outputs become z
    concat = "concat"
    attention = "attention"


class SyncNegatives(StrEnum):  # sync.negatives: the triplet's negative description(s)
    hardest = "hardest"
    all = "all"


class OOSScore(StrEnum):  # classify.oos_score: best description cosine | max class probability
    description = "description"
    confidence = "confidence"


VISION_TYPES = values(VisionType)
LM_TYPES = values(LMType)
ATTN_IMPLEMENTATIONS = values(AttnImplementation)
EXPERT_TYPES = values(ExpertType)
HYPERBOLIC_GEOMETRIES = values(HyperbolicGeometry)
CONE_PARENTS = values(ConeParent)
CONE_FORMS = values(ConeForm)
EVIDENCE_FORMS = values(EvidenceForm)
EVIDENCE_SCORES = values(EvidenceScore)
EVIDENCE_LOSS_KINDS = values(EvidenceLossKind)
MOE_BACKENDS = values(MoEBackend)
EXPERT_COMPUTE_MODES = values(ExpertCompute)
MODALITIES = values(Modality)
TEMPLATES = values(Template)
NAMED_TEMPLATES = tuple(t for t in TEMPLATES if t not in ("auto", "chat"))  # asymoe_train.data.conversation.TEMPLATES
AUGMENTATIONS = values(Augmentation)
PRECISIONS = values(Precision)
LOGGER_MODES = values(LoggerMode)
TASKS = values(Task)
FUSIONS = values(Fusion)
FUSION_COMBINES = values(FusionCombine)
SYNC_NEGATIVES = values(SyncNegatives)
OOS_SCORES = values(OOSScore)

IMAGE_PLACEHOLDER = "<image>"  # where a conversation puts its image; expanded to the image tokens

# curriculum.stages.<s>.trainable: group name -> what it holds (``experts.<pool>`` names one pool, so this list stays
# plain strings checked by validate)
TRAINABLE_GROUPS = {
    "vision": "the vision tower",
    "projector": "the vision-to-LM projector",
    "embeddings": "token embeddings and the LM head",
    "attention": "self-attention of every decoder layer",
    "norms": "RMSNorms of the decoder",
    "mlp": "dense FFNs (all FFN slots before upcycling, non-MoE layers after)",
    "experts": "MoE experts (experts.<pool> for one pool)",
    "routers": "MoE routers",
    "head": "the classification head: fusion, classifier, description projection (classify stages)",
}

ZERO_STAGES = (0, 1, 2, 3)  # engine.zero_stage; 3 needs expert parallelism 1 (config.validate)
