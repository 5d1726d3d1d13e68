"""Evaluation of classify stages: the intent-recognition metrics (accuracy, macro-F1, weighted-F1 over the in-scope
labels) on every eval split, and out-of-scope detection as MIntRec2.0 evaluates it: a sample is out-of-scope when
its score (``classify.oos_score``: its best cosine similarity to an in-scope label's projected description, or its
largest class probability) is below a threshold, the one that maximises the (C+1)-class macro-F1 (in-scope classes
plus out-of-scope) on the validation split ``classify.oos_split``; that threshold then applies to every split.
Written to ``eval/<stage>.json`` with the same per-split keys as the exact-match report (``accuracy``,
``num_questions``, ``breakdown``), so tables and scripts read both.

# B samples, C classes, Z embedding
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from asymoe_train.config.labels import LabelSet
from asymoe_train.config.schema import TrainConfig
from asymoe_train.data.batch import Batch
from asymoe_train.data.budget import BadSampleBudget
from asymoe_train.data.decode import SampleDecoder
from asymoe_train.data.pipeline import eval_batches
from asymoe_train.evaluation.report import report_path

log = logging.getLogger(__name__)
MAX_THRESHOLDS = 256  # candidate thresholds tried on the validation split (quantiles of its scores)


def f1_scores(labels: list[int], predictions: list[int], num_classes: int) -> dict:
    """Per-class F1 of ``num_classes`` classes, their macro mean over the classes present in ``labels`` and their
    mean weighted by support; predictions outside the classes count as wrong."""
    labels_t, preds_t = torch.tensor(labels, dtype=torch.long), torch.tensor(predictions, dtype=torch.long)
    support = torch.bincount(labels_t, minlength=num_classes)[:num_classes].double()
    hits = torch.bincount(labels_t[labels_t == preds_t], minlength=num_classes)[:num_classes].double()
    valid = (preds_t >= 0) & (preds_t < num_classes)
    predicted = torch.bincount(preds_t[valid], minlength=num_classes)[:num_classes].double()
    f1 = torch.where(support + predicted > 0, 2 * hits / (support + predicted).clamp_min(1), 0.0)
    present = support > 0
    return {"per_class": f1.tolist(), "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "weighted_f1": float((f1 * support).sum() / support.sum().clamp_min(1))}


@torch.no_grad()
def classify_outputs(model, batches: Iterable[Batch], device, dtype=None) -> dict:
    """Per sample: label (-1: out-of-scope), closed-set prediction, description score (best cosine to an in-scope
    description), confidence (largest class probability), metadata; and the samples read and skipped."""
    was_training = model.training
    model.eval()
    out: dict = {"labels": [], "predictions": [], "description": [], "confidence": [], "meta": [],
                 "num_samples": 0, "skipped": Counter()}
    for batch in batches:
        out["num_samples"] += batch.num_samples
        out["skipped"].update(batch.skipped)
        batch.to(device, dtype)
        head = model(**batch.model_inputs()).head
        cosine_BC = F.normalize(head.z_BZ.float(), dim=-1) @ F.normalize(head.descriptions_CZ.float(), dim=-1).T
        out["labels"] += batch.label_B.tolist()
        out["predictions"] += head.logits_BC.argmax(-1).tolist()
        out["description"] += cosine_BC.max(-1).values.tolist()
        out["confidence"] += torch.softmax(head.logits_BC.float(), -1).max(-1).values.tolist()
        out["meta"] += batch.meta
    model.train(was_training)
    return out


def open_predictions(outputs: dict, score: str, threshold: float, num_classes: int) -> list[int]:
    """Predictions with out-of-scope (class ``num_classes``) wherever the score is below ``threshold``."""
    return [num_classes if s < threshold else p for p, s in zip(outputs["predictions"], outputs[score])]


def open_labels(outputs: dict, num_classes: int) -> list[int]:
    return [num_classes if y < 0 else y for y in outputs["labels"]]


def choose_threshold(outputs: dict, score: str, num_classes: int) -> float:
    """The threshold (among quantiles of the split's scores, and -inf: reject nothing) that maximises the
    (C+1)-class macro-F1 on ``outputs``; the lowest such threshold on ties."""
    scores = torch.tensor(outputs[score], dtype=torch.float64)
    candidates = torch.quantile(scores, torch.linspace(0, 1, min(MAX_THRESHOLDS, len(scores)), dtype=torch.float64))
    labels = open_labels(outputs, num_classes)
    best, best_f1 = float("-inf"), f1_scores(labels, outputs["predictions"], num_classes + 1)["macro_f1"]
    for threshold in sorted(set(candidates.tolist())):
        f1 = f1_scores(labels, open_predictions(outputs, score, threshold, num_classes), num_classes + 1)["macro_f1"]
        if f1 > best_f1:
            best, best_f1 = threshold, f1
    return best


def split_report(outputs: dict, labels: LabelSet, threshold: float | None, score: str) -> dict:
    """A split's metrics: closed-set over its in-scope samples; open-set (with ``threshold``) over all of them."""
    num_classes = len(labels.classes)
    pairs = [(y, p, m) for y, p, m in zip(outputs["labels"], outputs["predictions"], outputs["meta"]) if y >= 0]
    in_labels, in_preds = [y for y, _, _ in pairs], [p for _, p, _ in pairs]
    correct, total = Counter(), Counter()
    for y, p, meta in pairs:
        for key in ("all", f"family/{meta.get('family', 'unknown')}"):
            correct[key] += y == p
            total[key] += 1
    f1 = f1_scores(in_labels, in_preds, num_classes)
    report = {"accuracy": correct["all"] / max(total["all"], 1), "macro_f1": f1["macro_f1"],
              "weighted_f1": f1["weighted_f1"], "per_class_f1": dict(zip(labels.classes, f1["per_class"])),
              "num_questions": total["all"], "num_out_of_scope": len(outputs["labels"]) - len(pairs),
              "breakdown": {k: {"accuracy": correct[k] / total[k], "count": total[k]} for k in sorted(total)},
              "num_samples": outputs["num_samples"], "skipped": dict(outputs["skipped"])}
    if threshold is not None:
        open_labels_ = open_labels(outputs, num_classes)
        open_preds = open_predictions(outputs, score, threshold, num_classes)
        open_f1 = f1_scores(open_labels_, open_preds, num_classes + 1)
        in_scope = [(y, p) for y, p in zip(open_labels_, open_preds) if y < num_classes]
        report["open_set"] = {
            "score": score, "threshold": threshold if math.isfinite(threshold) else None,
            "oos_f1": open_f1["per_class"][num_classes],
            "macro_f1": open_f1["macro_f1"],
            "in_scope_accuracy": sum(y == p for y, p in in_scope) / max(len(in_scope), 1)}
    return report


def evaluate_classify_stage(model, cfg: TrainConfig, labels: LabelSet, decoder: Callable[[], SampleDecoder], device,
                            dtype: torch.dtype, stage: str, step: int) -> tuple[dict, dict[str, float]]:
    """Evaluate a classify stage on every eval source; write ``eval/<stage>.json``, print the table, and return the
    results per split and the metrics to log."""
    outputs = {}
    for split, pattern in cfg.data.eval_sources.items():
        reader = decoder()
        reader.labels = labels
        batches = eval_batches(cfg.data, pattern, reader, cfg.eval.batch_size, cfg.eval.max_samples)
        outputs[split] = classify_outputs(model, batches, device, dtype)
        outputs[split]["skipped"].update(reader.take_skipped())
        budget = BadSampleBudget(cfg.data.max_bad_fraction, cfg.data.bad_fraction_min_samples, f"eval split {split}")
        budget.add_counts(outputs[split]["num_samples"], dict(outputs[split]["skipped"]))
    score, threshold = cfg.classify.oos_score, None
    if cfg.classify.oos_split:
        threshold = choose_threshold(outputs[cfg.classify.oos_split], score, len(labels.classes))
    results = {split: split_report(out, labels, threshold, score) for split, out in outputs.items()}
    logged = {f"eval/{split}/{key}": r[key] for split, r in results.items()
              for key in ("accuracy", "macro_f1", "weighted_f1")}
    logged.update({f"eval/{split}/oos_f1": r["open_set"]["oos_f1"] for split, r in results.items()
                   if "open_set" in r})
    os.makedirs(os.path.join(cfg.run_dir, "eval"), exist_ok=True)
    with open(report_path(cfg.run_dir, stage), "w", encoding="utf-8") as f:
        json.dump({"stage": stage, "step": step, "task": "classify", "classes": list(labels.classes),
                   "oos_split": cfg.classify.oos_split, "splits": results}, f, indent=2)
    log.info(f"eval after stage {stage} (classification over {len(labels.classes)} in-scope labels):")
    for split, r in results.items():
        families = ", ".join(f"{k.replace('family/', '')} {v['accuracy']:.3f}" for k, v in r["breakdown"].items()
                             if k != "all")
        line = (f"  {split}: accuracy {r['accuracy']:.3f} ({families}; {r['num_questions']} in-scope questions), "
                f"macro-F1 {r['macro_f1']:.3f}, weighted-F1 {r['weighted_f1']:.3f}")
        if "open_set" in r:
            o = r["open_set"]
            cut = "none rejected" if o["threshold"] is None else f"{score} < {o['threshold']:.3f}"
            line += (f"; out-of-scope ({r['num_out_of_scope']} samples, {cut}, chosen on "
                     f"{cfg.classify.oos_split}): F1 {o['oos_f1']:.3f}, in-scope accuracy {o['in_scope_accuracy']:.3f}")
        log.info(line)
    return results, logged
