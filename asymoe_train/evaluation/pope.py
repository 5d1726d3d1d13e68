"""POPE metrics (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models"): yes/no existence
questions scored as a binary classifier whose positive class is "yes", per negative-sampling setting.

A turn belongs to POPE when its shard metadata carries ``pope`` (the setting: random, popular, adversarial; see
data_recipes/scenes.py). Predictions and answers are compared after :func:`asymoe_train.evaluation.vqa.normalise`; a
prediction other than "yes" counts as "no", as in POPE's own scoring.
"""

from __future__ import annotations

from collections import Counter, defaultdict

METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_metrics(said_yes: list[bool], truth_yes: list[bool]) -> dict:
    """Accuracy, precision, recall and F1 of "yes" as the positive class, the share of "yes" predictions, and the
    question count. Precision (recall) is 0 when nothing is predicted (is) "yes"."""
    tally = Counter(zip(said_yes, truth_yes, strict=True))
    tp, fp, fn, tn = tally[True, True], tally[True, False], tally[False, True], tally[False, False]
    n = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "count": n}


class PopeTally:
    """Per POPE setting, each question's (prediction is yes, answer is yes) over normalised strings."""

    def __init__(self):
        self.pairs: dict[str, list[tuple[bool, bool]]] = defaultdict(list)

    def add(self, prediction: str, answer: str, setting: str) -> None:
        self.pairs[setting].append((prediction == "yes", answer == "yes"))

    def report(self) -> dict:
        """``{setting: pope_metrics}``; empty when no turn was a POPE question."""
        return {setting: pope_metrics([p for p, _ in pairs], [t for _, t in pairs])
                for setting, pairs in sorted(self.pairs.items())}
