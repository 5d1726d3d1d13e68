"""Exact-match VQA accuracy by greedy generation, overall and per question family.

# B questions, T prompt positions
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from asymoe_train.data.pipeline import Batch
from asymoe_train.data.tokenizer import TextTokenizer
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


def evaluate(model, batches: Iterable[Batch], tokenizer: TextTokenizer, max_new_tokens: int,
             device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict:
    """Accuracy overall and per ``family`` (from the shards' per-turn metadata), with counts and a few examples."""
    was_training = model.training
    model.eval()
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    examples = []
    for batch in batches:
        batch.to(device, dtype)
        predictions = greedy_generate(model, batch, tokenizer, max_new_tokens)
        for pred, answer, meta in zip(predictions, batch.answers, batch.meta):
            hit = normalise(pred) == normalise(answer)
            for key in ("all", f"family/{meta.get('family', 'unknown')}"):
                correct[key] += hit
                total[key] += 1
            if len(examples) < 8:
                examples.append({"prediction": pred, "answer": answer, **meta})
    model.train(was_training)
    report = {key: {"accuracy": correct[key] / total[key], "count": total[key]} for key in sorted(total)}
    return {"accuracy": report.get("all", {}).get("accuracy", 0.0), "num_questions": total["all"],
            "breakdown": report, "examples": examples}
