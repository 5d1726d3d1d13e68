"""Training objective: answer-token cross-entropy plus the MoE auxiliary losses of a forward pass.

# B sequences, T positions, V vocab
"""

from __future__ import annotations

import torch

from asymoe_train.config.schema import LossConfig
from asymoe_train.data.conversation import IGNORE
from asymoe_train.models.vlm import VLMOutput
from asymoe_train.moe.block import MoEOutput
from asymoe_train.moe.router import balance_from_stats


def token_weights(weight_B: torch.Tensor, labels_BT: torch.Tensor,
                  segment_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Each position's sequence weight ``[B, T]``: per row, or per packed sequence (``segment_BT``)."""
    if segment_BT is None:
        return weight_B[:, None].float().expand(labels_BT.shape)
    return weight_B.float()[segment_BT.clamp_min(0)]


def lm_loss_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, weight_B: torch.Tensor | None = None,
                segment_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over supervised (answer) positions, each sequence's tokens times its weight
    (``weight_B``, per sequence; None = 1), and the count of those positions (unweighted; a device tensor). In packed rows
    (``segment_BT``) a sequence's last token never predicts the next sequence's first: that first token is prompt,
    never a label."""
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
        loss = (per_token_BT * token_weights(weight_B, labels_BT, segment_BT)[:, 1:]).sum()
    return loss, (targets != IGNORE).sum()


def total_loss(out: VLMOutput, labels_BT: torch.Tensor, weights: LossConfig, world_size: int = 1,
               weight_B: torch.Tensor | None = None, segment_BT: torch.Tensor | None = None,
               main: tuple[str, torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_lm + sum over auxiliary terms (balance, z, order, evd) of weight * mean over MoE layers of the term.

    L_lm and the balance loss are terms of the micro-batch over all ``world_size`` data-parallel ranks (one
    all-reduce), so a step does not depend on how its batch is split over ranks. L_lm: each rank contributes its summed
    token losses / the global answer-token count, times ``world_size`` because DeepSpeed averages gradients over ranks.
    Balance: the blocks return each router's statistics (``MoEOutput.router_prob_sums`` etc.); f comes from the global
    assignment counts, and each rank contributes its summed router probabilities / the global token count, times
    ``world_size``, so the averaged gradient is the one the global batch gives in one process. The logged ``loss/lm``
    and ``loss/balance`` are the global values. Auxiliary terms with weight 0 are not added (they cost nothing and send
    no gradient); the other terms (z, order, evd, and the balance loss of DeepSpeed's MoE layer, which returns no
    statistics) are per rank, and so averaged over ranks. ``weight_B`` weights each sequence's answer tokens in L_lm
    (answer balancing); the normaliser stays the token count.

    ``main`` replaces L_lm by another task loss, given as (name, summed loss, count), e.g. the summed classification
    cross-entropy and the number of samples of a classify stage (``asymoe_train.training.sync``); it is normalised and
    reduced over ranks as L_lm is, and logged as ``loss/<name>``.

    The metrics are detached device tensors: nothing here waits for the device (``host_metrics`` reads them, on log
    steps).
    """
    if main is None:
        main = ("lm", *lm_loss_sum(out.logits_BTV, labels_BT, weight_B, segment_BT))
    main_name, loss_sum, num_tokens = main
    lm = loss_sum / num_tokens.clamp_min(1)
    aux: dict[str, torch.Tensor] = {}
    names = sorted({name for o in out.moe.values() for name in o.losses})
    for name in names:  # each term averaged over the MoE layers that produce it
        aux[name] = torch.stack([o.losses[name] for o in out.moe.values() if name in o.losses]).mean()
    logged = {main_name: lm, **aux}
    if world_size > 1:
        # Layers with a balance loss, if all of them return its statistics (DeepSpeed's MoE layer returns none).
        balanced = [o for o in out.moe.values() if "balance" in o.losses]
        balanced = balanced if all(o.router_prob_sums for o in balanced) else []
        # One all-reduce of fixed size (every rank has the same layers and routers): the LM loss sum and answer
        # tokens, then per layer and router its assignment counts, summed probabilities and tokens. float64 keeps
        # the counts exact.
        parts = [loss_sum.detach().double().reshape(1), num_tokens.double().reshape(1)]
        for o in balanced:
            for name, prob_sum_R in o.router_prob_sums.items():
                parts += [o.expert_counts[name].double(), prob_sum_R.detach().double(),
                          torch.as_tensor(o.router_tokens[name], dtype=torch.float64,
                                          device=prob_sum_R.device).reshape(1)]
        totals = torch.cat(parts)
        torch.distributed.all_reduce(totals)
        global_sum, num_tokens = totals[0], totals[1]
        lm = loss_sum * (world_size / num_tokens.clamp_min(1)).to(loss_sum.dtype)
        logged[main_name] = (global_sum / num_tokens.clamp_min(1)).float()
        if balanced:
            aux["balance"], logged["balance"] = global_balance(balanced, totals[2:], world_size)
    loss = lm
    for name, term in aux.items():
        if getattr(weights, name):
            loss = loss + getattr(weights, name) * term
    metrics = {f"loss/{name}": term.detach() for name, term in logged.items()}
    if world_size == 1:
        metrics["loss/total"] = loss.detach()
    else:  # the global L_lm and balance loss plus this rank's other auxiliary terms
        metrics["loss/total"] = metrics[f"loss/{main_name}"] + sum(
            getattr(weights, name) * metrics[f"loss/{name}"] for name in aux if getattr(weights, name))
    metrics["answer_tokens"] = num_tokens
    return loss, metrics


def global_balance(outputs: list[MoEOutput], totals: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The balance loss of the global micro-batch, averaged over MoE layers, from the blocks' router statistics and
    ``totals``, their sums over ranks (per layer and router: counts, summed probabilities, tokens): this rank's term
    to add to its loss (its own summed probabilities, times ``world_size`` as DeepSpeed averages gradients over ranks)
    and the global value to log (equal to the 1-process loss on the global batch)."""
    terms, global_terms, at = [], [], 0
    for o in outputs:
        term, global_term = 0.0, 0.0
        for prob_sum_R in o.router_prob_sums.values():
            r = prob_sum_R.shape[0]
            counts_R, global_prob_sum_R = totals[at : at + r], totals[at + r : at + 2 * r].float()
            num_tokens = totals[at + 2 * r]
            at += 2 * r + 1
            term = term + balance_from_stats(counts_R, prob_sum_R * world_size, num_tokens, o.top_k)
            global_term = global_term + balance_from_stats(counts_R, global_prob_sum_R, num_tokens, o.top_k)
        terms.append(term)
        global_terms.append(global_term)
    return torch.stack(terms).mean(), torch.stack(global_terms).mean()


def host_metrics(metrics: dict) -> dict[str, float]:
    """Metrics with device tensors read on the host in one copy (``total_loss``'s and the step's, on log steps);
    plain numbers pass through."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    values = torch.stack([v.detach().double().reshape(()) for v in tensors.values()]).tolist() if tensors else []
    return {**metrics, **dict(zip(tensors, values, strict=True))}


def answer_loglik(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                  segment_BT: torch.Tensor | None = None, num_sequences: int = 0) -> torch.Tensor:
    """Mean log-likelihood per answer token of each sequence ``[B]`` (``[num_sequences]`` of packed rows, by
    ``segment_BT``); 0 for sequences without answer tokens."""
    targets = labels_BT[:, 1:]
    logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    if segment_BT is None:
        return picked.sum(-1) / mask.sum(-1).clamp_min(1)
    seq = segment_BT[:, 1:].clamp_min(0).reshape(-1)
    sums = picked.new_zeros(num_sequences).index_add_(0, seq, picked.reshape(-1))
    counts = picked.new_zeros(num_sequences).index_add_(0, seq, mask.reshape(-1).float())
    return sums / counts.clamp_min(1)


def counterfactual_evidence_loss(out_real: VLMOutput, out_blind: VLMOutput, labels_BT: torch.Tensor,
                                 has_image_B: torch.Tensor, margin: float,
                                 segment_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Counterfactual L_evd: hinge asking each answer's log-likelihood with the real image to beat the likelihood
    with the image masked by ``margin`` (nats per answer token); penalises answers given from priors alone.
    ``has_image_B`` is per sequence (packed rows: per ``segment_BT`` sequence)."""
    num = has_image_B.shape[0]
    gap_B = (answer_loglik(out_real.logits_BTV, labels_BT, segment_BT, num)
             - answer_loglik(out_blind.logits_BTV, labels_BT, segment_BT, num))
    hinge_B = torch.relu(margin - gap_B) * has_image_B
    return hinge_B.sum() / has_image_B.sum().clamp_min(1)
