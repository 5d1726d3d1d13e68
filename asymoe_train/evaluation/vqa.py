"""Exact-match VQA accuracy by greedy generation, overall and per question family.

# B questions, T prompt positions
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

import torch

from asymoe_train.data.batch import Batch
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.evaluation.pope import PopeTally
from asymoe_train.modality import TEXT


@torch.no_grad()
def greedy_generate(model, batch: Batch, tokenizer: TextTokenizer, max_new_tokens: int) -> list[str]:
    """Greedy decoding from left-padded prompts (no KV cache: answers are a few tokens)."""
    input_ids, modality, context = batch.input_ids_BT, batch.modality_BT, batch.context_BT
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    generated: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids, modality, batch.pixel_values_NCHW, batch.image_index_B, context).logits_BTV
        next_B = logits[:, -1].argmax(-1)
        next_B = torch.where(done, torch.full_like(next_B, tokenizer.eos_id), next_B)
        generated.append(next_B)
        done |= next_B == tokenizer.eos_id
        if done.all():
            break
        input_ids = torch.cat([input_ids, next_B[:, None]], dim=1)
        modality = torch.cat([modality, torch.full_like(next_B[:, None], TEXT)], dim=1)
        context = torch.cat([context, torch.zeros_like(context[:, :1])], dim=1)  # generated = answer, not evidence
    answers = []
    for row in torch.stack(generated, dim=1).tolist():
        ids = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
        answers.append(tokenizer.decode(ids).strip())
    return answers


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".")


class Tally:
    """Exact-match hits overall and per ``family`` (from the shards' per-turn metadata), POPE metrics per setting for
    turns whose metadata has ``pope``, a few examples, and every question's outcome in reading order."""

    def __init__(self):
        self.correct: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)
        self.examples: list[dict] = []
        self.pope = PopeTally()
        self.questions: list[dict] = []  # per question: family, answer, prediction, correct (and pope)

    def add(self, prediction: str, answer: str, meta: dict) -> None:
        hit = normalise(prediction) == normalise(answer)
        family = meta.get("family", "unknown")
        for key in ("all", f"family/{family}"):
            self.correct[key] += hit
            self.total[key] += 1
        if len(self.examples) < 8:
            self.examples.append({"prediction": prediction, "answer": answer, **meta})
        record = {"family": family, "answer": answer, "prediction": prediction, "correct": hit}
        if "pope" in meta:
            self.pope.add(normalise(prediction), normalise(answer), meta["pope"])
            record["pope"] = meta["pope"]
        self.questions.append(record)

    def report(self) -> dict:
        """The summary (without the per-question records, which :attr:`questions` keeps)."""
        breakdown = {key: {"accuracy": self.correct[key] / self.total[key], "count": self.total[key]}
                     for key in sorted(self.total)}
        report = {"accuracy": breakdown.get("all", {}).get("accuracy", 0.0), "num_questions": self.total["all"],
                  "breakdown": breakdown, "examples": self.examples}
        pope = self.pope.report()
        if pope:
            report["pope"] = pope
        return report


def evaluate(model, batches: Iterable[Batch], tokenizer: TextTokenizer, max_new_tokens: int,
             device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict:
    """Accuracy overall and per ``family`` (from the shards' per-turn metadata), with counts and a few examples, POPE
    metrics per setting when the turns are POPE questions (``pope``); ``num_samples`` (shard samples the questions came
    from), ``skipped`` (samples skipped, by reason) and ``questions`` (each question's record, in reading order)."""
    was_training = model.training
    model.eval()
    tally = Tally()
    num_samples, skipped = 0, Counter()
    for batch in batches:
        num_samples += batch.num_samples
        skipped.update(batch.skipped)
        batch.to(device, dtype)
        predictions = greedy_generate(model, batch, tokenizer, max_new_tokens)
        for pred, answer, meta in zip(predictions, batch.answers, batch.meta):
            tally.add(pred, answer, meta)
    model.train(was_training)
    return {**tally.report(), "num_samples": num_samples, "skipped": dict(skipped), "questions": tally.questions}


def question_prior_baseline(train: Iterable[tuple[str, str, dict]], questions: Iterable[tuple[str, str, dict]],
                            max_questions: int = 0) -> dict:
    """The blind (question-only) baseline: every question gets the answer the training turns most often give to the
    same question text, or, for a text never seen in training, its family's most common answer. It never sees an
    image, so it scores what answer priors alone earn. ``train`` and ``questions`` are (question, answer, metadata)
    turns (``asymoe_train.data.pipeline.qa_turns``); the first ``max_questions`` are scored (0 = all), in the order
    ``evaluate`` reads them. Same report as ``evaluate``."""
    by_text: dict[str, Counter] = defaultdict(Counter)
    by_family: dict[str, Counter] = defaultdict(Counter)
    for question, answer, meta in train:
        by_text[normalise(question)][normalise(answer)] += 1
        by_family[meta.get("family", "unknown")][normalise(answer)] += 1
    tally = Tally()
    for n, (question, answer, meta) in enumerate(questions):
        if max_questions and n >= max_questions:
            break
        prior = by_text.get(normalise(question)) or by_family.get(meta.get("family", "unknown")) or Counter({"": 1})
        tally.add(prior.most_common(1)[0][0], answer, meta)
    return tally.report()
