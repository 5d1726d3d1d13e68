"""Training objective: answer-token cross-entropy plus the MoE auxiliary losses of a forward pass.

# B sequences, T positions, V vocab
"""

from __future__ import annotations

import torch

from asymoe_train.config.schema import LossConfig
from asymoe_train.data.conversation import IGNORE
from asymoe_train.models.vlm import VLMOutput


def lm_loss_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised (answer) positions, and their count."""
    targets = labels_BT[:, 1:]
    logits = logits_BTV[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


def total_loss(out: VLMOutput, labels_BT: torch.Tensor, weights: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_lm + balance * mean_layers(sum_routers L_bal) + z * mean_layers(sum_routers L_z).

    L_lm is normalised by the number of answer tokens in the micro-batch. Auxiliary terms with weight 0 are not added
    (they cost nothing and send no gradient).
    """
    loss_sum, num_tokens = lm_loss_sum(out.logits_BTV, labels_BT)
    lm = loss_sum / max(num_tokens, 1)
    aux: dict[str, torch.Tensor] = {}
    if out.moe:
        aux = {name: torch.stack([o.losses[name] for o in out.moe.values()]).mean() for name in ("balance", "z")}
    loss = lm
    for name, term in aux.items():
        if getattr(weights, name):
            loss = loss + getattr(weights, name) * term
    metrics = {f"loss/{name}": float(term.detach()) for name, term in {"lm": lm, **aux}.items()}
    metrics["loss/total"] = float(loss.detach())
    metrics["answer_tokens"] = num_tokens
    return loss, metrics
