"""The AsyMoE paper's diagnostics (arXiv 2606.00275, eqs. 2-6), teacher-forced on labelled evaluation sequences.

Per MoE layer and expert k (``<pool><i>``, every pool, so evidence experts can be read against the others):

* evidence-grounding ratio F(E_k) = E[A_evd] / (E[A_evd] + E[A_mem]): over the tokens routed to k, the attention
  mass of the layer's self-attention (head-averaged) on evidence positions (image and prompt tokens:
  ``Batch.context_BT``) against memory positions (the other real tokens: special and answer tokens);
* evidence-dependence ratio R_k = (f_intact - f_blanked) / (f_intact + f_blanked), with f the share of its router's
  assignments expert k receives when the image is intact and when it is blanked (zero pixels, the counterfactual
  evidence loss's blind input); positive: the expert is chosen more when there is evidence to use.

Per decoder layer: the attention entropy -sum_j p_j log p_j of the self-attention of answer-predicting positions
(the last prompt token and the answer tokens but the last, as the grounding probe), averaged over heads and
positions, in nats.

The attention probabilities come from the layers' own eager attention (switched on for the diagnostics only) and the
routing from forward hooks on the routers, so the diagnostics see exactly what the model computes. Expectations are
over tokens (sums over the batches, divided once at the end).

# B sequences, H heads, T positions (N = B*T flattened), K top-k, L decoder layers
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from asymoe_train.data.batch import Batch
from asymoe_train.data.conversation import IGNORE
from asymoe_train.modality import PAD


def _expert_names(block) -> list[str]:
    """Name of each global expert of a block: ``<pool><index in pool>``."""
    return [f"{name}{i}" for name, pool in block.pools.items() for i in range(pool.num_global_experts)]


@torch.no_grad()
def paper_diagnostics(model, batches: Iterable[Batch], device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> dict:
    """``{"layers": {layer: {"grounding_ratio": {expert: F}, "dependence_ratio": {expert: R},
    "activation_intact": {expert: f}, "activation_blanked": {expert: f}}}, "attention_entropy": [L floats],
    "sequences": int, "positions": answer-predicting positions}``; MoE layers only under ``layers``, experts that
    received no token get None."""
    layers, blocks = model.layers, model.moe_blocks()
    config = model.lm.config
    attention: dict[int, torch.Tensor] = {}
    routed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)  # layer -> (experts_NK, served_N)

    def keep_attention(index: int):
        def hook(module, args, output):
            attention[index] = output[1]  # (attn_output, attn_weights) from eager attention
        return hook

    def keep_routing(index: int, block, router: str):
        def hook(module, args, output):
            # the modality of each token is not an input of the router; the block's served mask is rebuilt below
            routed[index].append((router, block.reach(router)[output.experts_NK]))
        return hook

    hooks = [layer.self_attn.register_forward_hook(keep_attention(i)) for i, layer in enumerate(layers)]
    hooks += [router.register_forward_hook(keep_routing(i, block, name))
              for i, block in blocks.items() for name, router in block.routers.items()]
    previous, config._attn_implementation = config._attn_implementation, "eager"
    was_training = model.training
    model.eval()
    names = {i: _expert_names(block) for i, block in blocks.items()}
    mass = {i: torch.zeros(2, len(n), dtype=torch.float64) for i, n in names.items()}  # [evidence, memory] x E
    counts = {i: torch.zeros(2, len(n), dtype=torch.float64) for i, n in names.items()}  # [intact, blanked] x E
    served = {i: torch.zeros(2, dtype=torch.float64) for i in names}  # assignments per pass
    entropy_L = torch.zeros(len(layers), dtype=torch.float64)
    positions = sequences = 0
    try:
        for batch in batches:
            batch.to(device, dtype)
            sequences += batch.input_ids_BT.shape[0]
            inputs = batch.model_inputs()
            evidence_BT = batch.context_BT
            memory_BT = (batch.modality_BT != PAD) & ~evidence_BT
            predicts_BT = torch.zeros_like(batch.labels_BT, dtype=torch.bool)
            predicts_BT[:, :-1] = batch.labels_BT[:, 1:] != IGNORE
            positions += int(predicts_BT.sum())
            for blanked in (False, True):
                routed.clear()
                if blanked:
                    inputs = {**inputs, "pixel_values_NCHW": torch.zeros_like(batch.pixel_values_NCHW)}
                model(**inputs)
                for i, block in blocks.items():
                    for router, experts_NK in routed[i]:
                        served_N = torch.isin(batch.modality_BT.reshape(-1), getattr(block, f"codes_{router}"))
                        hits_NE = torch.zeros(served_N.shape[0], len(names[i]), dtype=torch.float64,
                                              device=served_N.device)
                        hits_NE.scatter_add_(1, experts_NK, torch.ones_like(experts_NK, dtype=torch.float64))
                        hits_NE *= served_N[:, None]
                        counts[i][int(blanked)] += hits_NE.sum(0).cpu()
                        served[i][int(blanked)] += float(served_N.sum()) * experts_NK.shape[-1]
                        if not blanked:
                            probs_BHTT = attention[i].float()
                            on_N2 = torch.stack([(probs_BHTT * where[:, None, None, :]).sum(-1).mean(1).reshape(-1)
                                                 for where in (evidence_BT, memory_BT)], dim=-1)
                            mass[i] += (on_N2.double()[:, :, None] * hits_NE[:, None, :]).sum(0).cpu()
                if not blanked:
                    for i in range(len(layers)):
                        p = attention[i].float()
                        entropy_BHT = -(p * p.clamp_min(1e-30).log()).sum(-1)
                        entropy_L[i] += entropy_BHT.mean(1)[predicts_BT].double().sum().cpu()
    finally:
        config._attn_implementation = previous
        for hook in hooks:
            hook.remove()
        model.train(was_training)

    def ratio(a: float, b: float) -> float | None:
        return None if a + b <= 0 else (a - b) / (a + b)

    report = {}
    for i, experts in names.items():
        f = counts[i] / served[i].clamp_min(1)[:, None]
        evd, mem = mass[i]
        report[str(i)] = {
            "grounding_ratio": {e: (float(evd[k] / (evd[k] + mem[k])) if evd[k] + mem[k] > 0 else None)
                                for k, e in enumerate(experts)},
            "dependence_ratio": {e: ratio(float(f[0, k]), float(f[1, k])) for k, e in enumerate(experts)},
            "activation_intact": {e: float(f[0, k]) for k, e in enumerate(experts)},
            "activation_blanked": {e: float(f[1, k]) for k, e in enumerate(experts)},
        }
    return {"layers": report, "attention_entropy": (entropy_L / max(positions, 1)).tolist(),
            "sequences": sequences, "positions": positions}


def diagnostics_metrics(diagnostics: dict) -> dict[str, float]:
    """The diagnostics as flat metrics to log: ``diag/F/L<layer>/<expert>``, ``diag/R/...``, ``diag/entropy/L<i>``."""
    metrics = {f"diag/entropy/L{i}": h for i, h in enumerate(diagnostics["attention_entropy"])}
    for layer, values in diagnostics["layers"].items():
        for short, key in (("F", "grounding_ratio"), ("R", "dependence_ratio")):
            metrics.update({f"diag/{short}/L{layer}/{e}": v for e, v in values[key].items() if v is not None})
    return metrics
