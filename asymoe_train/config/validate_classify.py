"""Validation of the classification task mode: stages with ``task: classify``, ``data.labels``, ``model.fusion`` and
``model.head``, ``sync.*`` and ``classify.*``. Called by :func:`asymoe_train.config.validate.validate`."""

from __future__ import annotations

from asymoe_train.config.checks import choice
from asymoe_train.config.errors import ConfigError
from asymoe_train.config.labels import labels_path, load_labels
from asymoe_train.config.names import FUSION_COMBINES, FUSIONS, OOS_SCORES, SYNC_NEGATIVES, TASKS
from asymoe_train.config.schema import TrainConfig


def validate_classify(cfg: TrainConfig, files: bool = True) -> None:
    """Raise :class:`ConfigError` naming the key and the fix; ``files`` also parses the labels file."""
    data, head, sync = cfg.data, cfg.model.head, cfg.sync
    classify = []
    for name, stage in cfg.curriculum.stages.items():
        key = f"curriculum.stages.{name}"
        choice(f"{key}.task", stage.task, TASKS)
        if stage.losses.sync < 0:
            raise ConfigError(f"{key}.losses.sync={stage.losses.sync} must be >= 0")
        if stage.task == "generate":
            if stage.losses.sync:
                raise ConfigError(f"{key}.losses.sync={stage.losses.sync}: semantic synchronization trains the "
                                  f"classification head; set {key}.task=classify or {key}.losses.sync=0")
            continue
        classify.append(name)
        evidence = cfg.model.moe.evidence
        if stage.losses.evd and evidence.loss_kind == "counterfactual":
            raise ConfigError(f"{key}.losses.evd={stage.losses.evd} with model.moe.evidence.loss_kind=counterfactual: "
                              "the counterfactual hinge compares answer likelihoods, which a classify stage has none "
                              f"of; use loss_kind=routing or {key}.losses.evd=0")
        if cfg.eval.every_steps and stage.eval:
            raise ConfigError(f"eval.every_steps={cfg.eval.every_steps} evaluates generative stages only, and {key} "
                              f"classifies (it evaluates at its end); set eval.every_steps=0 or {key}.eval=false")
        if "head" not in stage.trainable:
            raise ConfigError(f"{key}.trainable={stage.trainable} lacks 'head': a classify stage trains the "
                              "classification head (fusion, classifier, description projection); add head")
    choice("model.fusion", cfg.model.fusion, FUSIONS)
    choice("model.head.combine", head.combine, FUSION_COMBINES)
    for field_name in ("num_anchors", "num_heads"):
        if getattr(head, field_name) <= 0:
            raise ConfigError(f"model.head.{field_name}={getattr(head, field_name)} must be > 0")
    if head.embed_dim < 0:
        raise ConfigError(f"model.head.embed_dim={head.embed_dim} must be >= 0 (0 = the LM hidden size)")
    if cfg.model.lm.hidden_size % head.num_heads:
        raise ConfigError(f"model.head.num_heads={head.num_heads} does not divide model.lm.hidden_size="
                          f"{cfg.model.lm.hidden_size}")
    choice("sync.negatives", sync.negatives, SYNC_NEGATIVES)
    if sync.margin < 0:
        raise ConfigError(f"sync.margin={sync.margin} must be >= 0 (a cosine-distance margin)")
    if sync.refresh_steps < 0:
        raise ConfigError(f"sync.refresh_steps={sync.refresh_steps} must be >= 0 (0 = encode the descriptions once)")
    choice("classify.oos_score", cfg.classify.oos_score, OOS_SCORES)
    if cfg.classify.oos_split and cfg.classify.oos_split not in data.eval_sources:
        raise ConfigError(f"classify.oos_split={cfg.classify.oos_split!r} is not in data.eval_sources "
                          f"{sorted(data.eval_sources)}; name the validation split, or '' for no out-of-scope detection")
    if not classify:
        return
    if not data.labels:
        raise ConfigError(f"curriculum.stages.{classify[0]}.task=classify needs data.labels=<labels YAML> (one "
                          "description per label; asymoe_train/config/labels.py shows the form)")
    if not data.split_turns:
        raise ConfigError("data.split_turns=false with a classify stage: each sample's label is its single QA turn's "
                          "answer (or json `label`); set data.split_turns=true")
    if data.packing:
        raise ConfigError("data.packing=true with a classify stage: the head pools each row as one sample; set "
                          "data.packing=false")
    if files:
        load_labels(labels_path(data))
