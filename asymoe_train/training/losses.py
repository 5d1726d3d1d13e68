"""Training objective: answer-token cross-entropy plus the MoE auxiliary losses of a forward pass.

# B sequences, T positions, V vocab
"""

from __future__ import annotations

import torch

from asymoe_train.config.schema import LossConfig
from asymoe_train.data.conversation import IGNORE
from asymoe_train.models.vlm import VLMOutput


def lm_loss_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                weight_B: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised (answer) positions, each sequence's tokens times its weight
    (``weight_B``; None = 1), and the count of those positions (unweighted)."""
    targets = labels_BT[:, 1:]
    logits = logits_BTV[:, :-1].float()
    if weight_B is None:
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
    else:
        per_token_BT = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )
        loss = (per_token_BT * weight_B[:, None].float()).sum()
    return loss, int((targets != IGNORE).sum())


def total_loss(out: VLMOutput, labels_BT: torch.Tensor, weights: LossConfig, world_size: int = 1,
               weight_B: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_lm + sum over auxiliary terms (balance, z, order, evd) of weight * mean over MoE layers of the term.

    L_lm is normalised by the number of answer tokens in the micro-batch over all ``world_size`` data-parallel ranks
    (one all-reduce), so a step's loss does not depend on how its batch is split over ranks: each rank contributes
    its summed token losses / the global count, times ``world_size`` because DeepSpeed averages gradients over ranks.
    The logged ``loss/lm`` is the global per-token loss. Auxiliary terms with weight 0 are not added (they cost
    nothing and send no gradient); the others are per rank, and so averaged over ranks. ``weight_B`` weights each
    sequence's answer tokens in L_lm (answer balancing); the normaliser stays the token count.
    """
    loss_sum, num_tokens = lm_loss_sum(out.logits_BTV, labels_BT, weight_B)
    lm = loss_sum / max(num_tokens, 1)
    lm_logged = lm
    if world_size > 1:
        totals = torch.stack([loss_sum.detach().double(), loss_sum.new_tensor(num_tokens, dtype=torch.float64)])
        torch.distributed.all_reduce(totals)
        global_sum, num_tokens = totals[0], int(totals[1])
        lm = loss_sum * (world_size / max(num_tokens, 1))
        lm_logged = global_sum / max(num_tokens, 1)
    aux: dict[str, torch.Tensor] = {}
    names = sorted({name for o in out.moe.values() for name in o.losses})
    for name in names:  # each term averaged over the MoE layers that produce it
        aux[name] = torch.stack([o.losses[name] for o in out.moe.values() if name in o.losses]).mean()
    loss = lm
    for name, term in aux.items():
        if getattr(weights, name):
            loss = loss + getattr(weights, name) * term
    metrics = {f"loss/{name}": float(term.detach()) for name, term in {"lm": lm_logged, **aux}.items()}
    # the global total: this rank's auxiliary terms plus the global L_lm
    metrics["loss/total"] = float(loss.detach()) if world_size == 1 else float((loss - lm).detach() + lm_logged)
    metrics["answer_tokens"] = num_tokens
    return loss, metrics


def answer_loglik(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean log-likelihood per answer token of each sequence ``[B]`` (0 for sequences without answer tokens)."""
    targets = labels_BT[:, 1:]
    logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return picked.sum(-1) / mask.sum(-1).clamp_min(1)


def counterfactual_evidence_loss(out_real: VLMOutput, out_blind: VLMOutput, labels_BT: torch.Tensor,
                                 has_image_B: torch.Tensor, margin: float) -> torch.Tensor:
    """Counterfactual L_evd: hinge asking each answer's log-likelihood with the real image to beat the likelihood
    with the image masked by ``margin`` (nats per answer token); penalises answers given from priors alone."""
    gap_B = answer_loglik(out_real.logits_BTV, labels_BT) - answer_loglik(out_blind.logits_BTV, labels_BT)
    hinge_B = torch.relu(margin - gap_B) * has_image_B
    return hinge_B.sum() / has_image_B.sum().clamp_min(1)
