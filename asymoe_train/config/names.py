"""The allowed values of the config's string-valued choices: one definition each.

Validation checks config values against these, and the layers that act on a value (the expert registry, the
backbone builders, the conversation templates, the trainable groups) key their tables by them, so a new choice is
added here first. Plain tuples and dicts, no imports: every layer may import this module.
"""

from __future__ import annotations

# model.vision.type / model.lm.type: the Hugging Face architectures the backbone builders know
VISION_TYPES = ("siglip", "clip")
LM_TYPES = ("llama", "qwen2", "mistral", "phi3")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # model.lm.attn_implementation

# model.moe.*
EXPERT_TYPES = ("ffn", "evidence", "hyperbolic")  # model.moe.pools.<i>.expert
HYPERBOLIC_GEOMETRIES = ("lorentz", "poincare")  # model.moe.hyperbolic.geometry: hyperboloid | ball
CONE_PARENTS = ("vision", "text")  # model.moe.hyperbolic.cone_parent
EVIDENCE_LOSS_KINDS = ("routing", "counterfactual")  # model.moe.evidence.loss_kind
MOE_BACKENDS = ("native", "deepspeed")  # model.moe.backend
EXPERT_COMPUTE_MODES = ("auto", "grouped", "loop")  # model.moe.expert_compute (asymoe_train.moe.grouped)
MODALITIES = ("text", "image")  # model.moe.routers.<i>.modalities: the token modalities a router serves

# data.*
IMAGE_PLACEHOLDER = "<image>"  # where a conversation puts its image; expanded to the image tokens
NAMED_TEMPLATES = ("plain",)  # plain-text conversation templates (asymoe_train.data.conversation.TEMPLATES)
TEMPLATES = ("auto", "chat", *NAMED_TEMPLATES)  # data.template
AUGMENTATIONS = ("none", "dihedral")  # data.augment

# curriculum.stages.<s>.trainable: group name -> what it holds (``experts.<pool>`` names one pool)
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

# classification (A-MESS): curriculum.stages.<s>.task, model.fusion, model.head.combine, sync.negatives
TASKS = ("generate", "classify")  # generate: answer tokens by next-token CE | classify: one label per sample
FUSIONS = ("mean", "anchors")  # how the fused embedding z pools the final hidden states (asymoe_train.models.fusion)
FUSION_COMBINES = ("concat", "attention")  # anchors: how the per-modality anchor outputs become z
SYNC_NEGATIVES = ("hardest", "all")  # semantic synchronization: the triplet's negative description(s)
OOS_SCORES = ("description", "confidence")  # classify.oos_score: best description cosine | max class probability

# engine.* / logger.* / resume
PRECISIONS = ("fp32", "bf16")
ZERO_STAGES = (0, 1, 2)  # ZeRO-3 is rejected until proven for MoE
LOGGER_MODES = ("offline", "online", "disabled")
RESUME_MODES = ("none", "auto")  # or a checkpoint directory
