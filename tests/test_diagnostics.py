"""The paper's diagnostics (asymoe_train.evaluation.diagnostics) against a per-token reference loop over the same
model's attention and routing, and the activation shares against the MoE blocks' own expert counts."""

from __future__ import annotations

import math

import pytest
import torch
from test_efficiency import batch, moe_config, tiny, upcycled

from asymoe_train.data.batch import Batch
from asymoe_train.evaluation.diagnostics import diagnostics_metrics, paper_diagnostics
from asymoe_train.modality import PAD


def labelled_batch() -> Batch:
    (ids, mod, pixels, index, context), labels = batch()
    return Batch(ids, labels, mod, pixels, index, context, num_samples=ids.shape[0])


def capture(model, inputs: dict):
    """One teacher-forced forward with eager attention: per layer the attention probabilities, per MoE layer each
    router's global experts ``[N, K]``, and the blocks' outputs."""
    attention, routed = {}, {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: attention.__setitem__(i, o[1]))
             for i, layer in enumerate(model.layers)]
    for i, block in model.moe_blocks().items():
        for name, router in block.routers.items():
            hooks.append(router.register_forward_hook(
                lambda m, a, o, i=i, name=name, block=block: routed.setdefault(i, {}).__setitem__(
                    name, block.reach(name)[o.experts_NK])))
    config = model.lm.config
    previous, config._attn_implementation = config._attn_implementation, "eager"
    with torch.no_grad():
        out = model(**inputs)
    config._attn_implementation = previous
    for hook in hooks:
        hook.remove()
    return attention, routed, out


def test_diagnostics_equal_a_per_token_reference():
    torch.manual_seed(0)
    model = upcycled(tiny(moe_config("asymoe_paper"))).eval()
    b = labelled_batch()
    result = paper_diagnostics(model, [b])
    attention, routed, out = capture(model, b.model_inputs())
    _, routed_blank, out_blank = capture(model, {**b.model_inputs(), "pixel_values_NCHW": torch.zeros_like(
        b.pixel_values_NCHW)})
    rows, t = b.modality_BT.shape
    blocks = model.moe_blocks()
    assert sorted(result["layers"]) == [str(i) for i in blocks]
    for i, block in blocks.items():
        names = [f"{p}{j}" for p, pool in block.pools.items() for j in range(pool.num_global_experts)]
        evd, mem = [0.0] * len(names), [0.0] * len(names)
        hits = {False: [0] * len(names), True: [0] * len(names)}
        served = {False: 0, True: 0}
        for blank, decisions in ((False, routed[i]), (True, routed_blank[i])):
            for router, experts_NK in decisions.items():
                codes = block.router_modalities[router]
                for n in range(rows * t):
                    r, pos = divmod(n, t)
                    if int(b.modality_BT[r, pos]) not in codes:
                        continue
                    served[blank] += experts_NK.shape[1]
                    for k in experts_NK[n].tolist():
                        hits[blank][k] += 1
                        if blank:
                            continue
                        heads = attention[i][r]  # [H, T, T]
                        for h in range(heads.shape[0]):
                            for key in range(t):
                                p = float(heads[h, pos, key]) / heads.shape[0]
                                if b.context_BT[r, key]:
                                    evd[k] += p
                                elif b.modality_BT[r, key] != PAD:
                                    mem[k] += p
        got = result["layers"][str(i)]
        for k, name in enumerate(names):
            f_intact, f_blank = hits[False][k] / served[False], hits[True][k] / served[True]
            assert got["activation_intact"][name] == pytest.approx(f_intact)
            assert got["activation_blanked"][name] == pytest.approx(f_blank)
            expected_r = None if f_intact + f_blank == 0 else (f_intact - f_blank) / (f_intact + f_blank)
            assert got["dependence_ratio"][name] == pytest.approx(expected_r)
            expected_f = None if evd[k] + mem[k] == 0 else evd[k] / (evd[k] + mem[k])
            assert got["grounding_ratio"][name] == pytest.approx(expected_f, rel=1e-5)
        # the shares agree with the block's own counts of the intact pass
        counts = sum(out.moe[i].expert_counts[r].double().sum() for r in block.routers)
        assert sum(got["activation_intact"].values()) == pytest.approx(1.0) and counts == served[False]
        assert any(v is not None and 0 < v < 1 for v in got["grounding_ratio"].values())
    # attention entropy per layer over answer-predicting positions
    for i, probs in attention.items():
        total, count = 0.0, 0
        for r in range(rows):
            for pos in range(t - 1):
                if b.labels_BT[r, pos + 1] == -100:
                    continue
                count += 1
                for h in range(probs.shape[1]):
                    row = probs[r, h, pos]
                    total += -sum(float(p) * math.log(float(p)) for p in row if p > 0) / probs.shape[1]
        assert result["attention_entropy"][i] == pytest.approx(total / count, rel=1e-5)
    assert result["positions"] == count and result["sequences"] == rows
    metrics = diagnostics_metrics(result)
    assert f"diag/entropy/L{len(attention) - 1}" in metrics and any(k.startswith("diag/R/L1/evidence0") for k in metrics)
