"""AsyMoE pieces: evidence-priority experts (causality, upcycling), the asymoe block, and where each loss's gradient
goes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from asymoe_train.config.moe_schema import EvidenceConfig, HyperbolicConfig, MoEConfig, PoolConfig, RouterConfig
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.moe.block import MoEBlock, MoEOutput
from asymoe_train.moe.evidence import EvidenceExperts, TokenContext
from asymoe_train.moe.order import entailment_loss, exterior_angle, half_aperture

D, F, B, T = 32, 48, 3, 10


def asymoe_cfg(geometry: str = "lorentz", loss_kind: str = "routing", hyperbolic_experts: int = 2) -> MoEConfig:
    return MoEConfig(
        variant="asymoe", top_k=2, router_init_std=0.5,
        pools=[PoolConfig(name="vision", num_experts=1), PoolConfig(name="hyperbolic", expert="hyperbolic",
                                                                       num_experts=hyperbolic_experts),
               PoolConfig(name="text", num_experts=1), PoolConfig(name="evidence", expert="evidence", num_experts=1)],
        routers=[RouterConfig(name="vision", modalities=["image"], pools=["vision", "hyperbolic"]),
                 RouterConfig(name="text", modalities=["text"], pools=["text", "hyperbolic", "evidence"])],
        hyperbolic=HyperbolicConfig(geometry=geometry), evidence=EvidenceConfig(num_heads=4, loss_kind=loss_kind),
    )


def asymoe_paper_cfg(geometry: str = "lorentz") -> MoEConfig:
    """conf/model/moe/asymoe_paper.yaml: one expert per group, the paper's evidence expert, score, cone, fixed c."""
    return replace(
        asymoe_cfg(geometry, hyperbolic_experts=1), variant="asymoe_paper",
        hyperbolic=HyperbolicConfig(geometry=geometry, learn_curvature=False, cone_form="paper"),
        evidence=EvidenceConfig(num_heads=4, form="paper", score="learned", alpha_init=0.3, loss_kind="none"),
    )


def structure(seed: int = 0):
    """Sequences: [bos, 3 image, 3 prompt, 2 answer, pad...] with different lengths; context = image + prompt."""
    g = torch.Generator().manual_seed(seed)
    modality = torch.full((B, T), PAD)
    context = torch.zeros(B, T, dtype=torch.bool)
    for b, length in enumerate((10, 9, 8)):
        modality[b, :length] = TEXT
        modality[b, 1:4] = IMAGE
        context[b, : length - 2] = True  # the last two real tokens are the answer
    x = torch.randn(B * T, D, generator=g)
    return x, modality, context


def test_evidence_branch_never_sees_answers_or_the_future():
    torch.manual_seed(0)
    pool = EvidenceExperts(2, D, F, num_heads=4)
    torch.nn.init.normal_(pool.out_EDX, std=0.1)  # a trained evidence branch, not the zero init
    x, modality, context = structure()
    ctx = TokenContext((B, T), context, modality)
    base = pool.prepare(x, ctx)
    for position in (5, 8):  # a prompt token, then an answer token
        x2 = x.clone().reshape(B, T, D)
        x2[:, position:] += 10 * torch.randn(B, T - position, D)
        moved = pool.prepare(x2.reshape(B * T, D), ctx)
        earlier = torch.zeros(B, T, dtype=torch.bool)
        earlier[:, :position] = True
        earlier = earlier.reshape(-1)
        torch.testing.assert_close(moved.evidence_ETD[:, earlier], base.evidence_ETD[:, earlier])
        torch.testing.assert_close(moved.score_T[earlier], base.score_T[earlier])
        for e in range(2):  # the experts' outputs, output projection and memory branch included
            x2_earlier = x2.reshape(B * T, D)[earlier]
            torch.testing.assert_close(pool.expert(e, x2_earlier, moved.evidence_ETD[e, earlier]),
                                       pool.expert(e, x[earlier], base.evidence_ETD[e, earlier]))
    # answer tokens are not evidence: perturbing them changes no other token's evidence output, later ones included
    x3 = x.clone().reshape(B, T, D)
    answers = (~context) & (modality != PAD)
    first_answer = answers.clone()
    first_answer[:, 1:] &= ~answers[:, :-1]  # perturb only the first answer token; the second must not notice
    x3[first_answer] += 10
    others = (~first_answer).reshape(-1)
    moved = pool.prepare(x3.reshape(B * T, D), ctx)
    torch.testing.assert_close(moved.evidence_ETD[:, others], base.evidence_ETD[:, others])
    assert ((base.score_T >= 0) & (base.score_T <= 1)).all()
    assert base.score_T.reshape(B, T)[:, 0].abs().max() == 0  # nothing before the first token: all mass on the sink


def reference_evidence_expert(pool: EvidenceExperts, e: int, x_TD, context_BT):
    """Expert e's outputs and the pool's s_evd, one token and one head at a time: attention over the context positions
    strictly before the token plus a null key with zero value; s_evd = mass on real context, averaged over heads and
    experts."""
    h, c = pool.num_heads, D // pool.num_heads
    x_BTD = x_TD.reshape(B, T, D)
    out, score = torch.zeros(B, T, D), torch.zeros(B, T)
    for b in range(B):
        for i in range(T):
            allowed = [j for j in range(i) if context_BT[b, j]]
            for expert in range(pool.num_global_experts):
                q, k, v = (w @ x_BTD[b].T for w in pool.qkv_E3XD[expert])  # each [D, T]
                heads = []
                for head in range(h):
                    rows = slice(head * c, (head + 1) * c)
                    logits = torch.stack([q[rows, i] @ k[rows, j] for j in allowed]
                                         + [q[rows, i] @ pool.null_key_EHC[expert, head]]) * c**-0.5
                    probs = logits.softmax(0)
                    heads.append(sum((p * v[rows, j] for p, j in zip(probs, allowed, strict=False)),
                                     torch.zeros(c)))
                    score[b, i] += probs[:-1].sum() / (h * pool.num_global_experts)
                if expert == e:
                    memory = pool.memory.expert(e, x_BTD[b, i : i + 1])[0]
                    out[b, i] = memory + pool.alpha_E[e] * (pool.out_EDX[e] @ torch.cat(heads))
    return out.reshape(B * T, D), score.reshape(-1)


def test_evidence_expert_equals_per_token_reference():
    torch.manual_seed(0)
    pool = EvidenceExperts(2, D, F, num_heads=4)
    with torch.no_grad():
        for p in (pool.out_EDX, pool.null_key_EHC, *pool.memory.parameters()):
            torch.nn.init.normal_(p, std=0.2)
    x, modality, context = structure()
    prep = pool.prepare(x, TokenContext((B, T), context, modality))
    for e in range(2):
        expected, score = reference_evidence_expert(pool, e, x, context)
        torch.testing.assert_close(pool.expert(e, x, prep.evidence_ETD[e]), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prep.score_T, score, atol=1e-6, rtol=1e-5)


def test_fresh_evidence_expert_is_its_memory_ffn():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F))
    pool = EvidenceExperts(1, D, F, num_heads=4)
    pool.upcycle_from(mlp)
    x, modality, context = structure()
    prep = pool.prepare(x, TokenContext((B, T), context, modality))
    torch.testing.assert_close(pool(x, [B * T], prep.evidence_ETD[0]), mlp(x), atol=1e-6, rtol=1e-6)
    assert pool.alpha_E.item() == pytest.approx(0.5)


def upcycled_block_error(cfg: MoEConfig) -> tuple[MoEBlock, MoEOutput, float]:
    """A block freshly upcycled from a dense MLP, its output on unit-RMS tokens (as after the decoder's RMSNorm) and
    its relative distance from the MLP's over the non-padding tokens."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F))
    block = MoEBlock.upcycle(mlp, cfg, D, F, "silu")
    x, modality, context = structure()
    x = x / x.square().mean(-1, keepdim=True).sqrt()
    out = block(x, modality.reshape(-1), TokenContext((B, T), context, modality))
    keep = modality.reshape(-1) != PAD
    dense = mlp(x)[keep]
    return block, out, ((out.hidden_TD[keep] - dense).norm() / dense.norm()).item()


@pytest.mark.parametrize("geometry,tolerance", [("lorentz", 2e-3), ("poincare", 1e-5)])
def test_upcycled_asymoe_block_reproduces_dense_mlp(geometry, tolerance):
    _, out, error = upcycled_block_error(asymoe_cfg(geometry))
    assert error < tolerance
    assert {"balance", "evd", "order"} <= set(out.losses)
    assert 0.1 <= out.stats["hyperbolic/curvature"] <= 10
    assert 0 <= out.stats["text/evidence_share"] <= 1 and "text/s_evd_mean" in out.stats


def grads_of(block: MoEBlock, loss: torch.Tensor) -> dict[str, bool]:
    block.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in block.named_parameters()}


def test_each_loss_reaches_its_parameters_and_nothing_else():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F))
    block = MoEBlock.upcycle(mlp, asymoe_cfg(), D, F, "silu")
    for pool in block.pools.values():  # distinct experts, so routing choices matter
        for p in pool.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    x, modality, context = structure()
    x.requires_grad_(True)
    out = block(x, modality.reshape(-1), TokenContext((B, T), context, modality))
    for name in ("balance", "evd"):
        reached = {n for n, hit in grads_of(block, out.losses[name]).items() if hit}
        assert reached and all(n.startswith("routers.") for n in reached), (name, reached)
    assert "routers.text.weight_RD" in {n for n, hit in grads_of(block, out.losses["evd"]).items() if hit}
    x.grad = None
    reached = {n for n, hit in grads_of(block, out.losses["order"]).items() if hit}
    assert reached and reached <= {"pools.hyperbolic.log_scale_E", "pools.hyperbolic.curvature.log_c"}
    assert x.grad is not None and x.grad.abs().sum() > 0  # and the representations that feed the pooled points
    reached = {n for n, hit in grads_of(block, out.hidden_TD.square().sum()).items() if hit}
    assert any(n.startswith("pools.evidence.qkv") for n in reached)  # the LM path trains the evidence branch


def test_entailment_cone_geometry():
    c = torch.tensor(1.0)
    parent = torch.tensor([[2.0, 0.0]])
    along = torch.tensor([[4.0, 0.0]])  # further out on the same ray: inside the cone
    behind = torch.tensor([[-2.0, 0.0]])
    assert exterior_angle(parent, along, c).item() == pytest.approx(0.0, abs=2e-3)  # acos clamp: 1e-6 -> 1.4e-3
    assert exterior_angle(parent, behind, c).item() == pytest.approx(torch.pi, abs=1e-2)
    assert entailment_loss(parent, along, c, 0.1).item() == pytest.approx(0.0, abs=1e-3)
    assert entailment_loss(parent, behind, c, 0.1).item() > 2.5
    assert half_aperture(torch.tensor([[1e-4, 0.0]]), c, 0.1).item() == pytest.approx(torch.pi / 2, abs=1e-2)


# ------------------------------------------------------------------------------------ the paper's form (2026)
def attended_reference(pool: EvidenceExperts, x_TD, context_BT) -> torch.Tensor:
    """Attn(h, c) of every expert ``[E, B*T, D]``, one token and one head at a time (null key, zero value)."""
    h, c = pool.num_heads, D // pool.num_heads
    x_BTD = x_TD.reshape(B, T, D)
    rows = []
    for expert in range(pool.num_global_experts):
        out = []
        for b in range(B):
            for i in range(T):
                allowed = [j for j in range(i) if context_BT[b, j]]
                q, k, v = (w @ x_BTD[b].T for w in pool.qkv_E3XD[expert])
                heads = []
                for head in range(h):
                    part = slice(head * c, (head + 1) * c)
                    logits = torch.stack([q[part, i] @ k[part, j] for j in allowed]
                                         + [q[part, i] @ pool.null_key_EHC[expert, head]]) * c**-0.5
                    probs = logits.softmax(0)
                    heads.append(sum((p * v[part, j] for p, j in zip(probs, allowed, strict=False)), torch.zeros(c)))
                out.append(torch.cat(heads))
        rows.append(torch.stack(out))
    return torch.stack(rows)


def paper_reference(pool: EvidenceExperts, e: int, x_TD, context_BT):
    """Expert e's outputs alpha(h) FFN(h) + (1 - alpha(h)) FFN_evd([h; Attn(h, c)]) and the learned s_evd, token by
    token, with the per-token gate and score written out as the paper's equations."""
    attended = attended_reference(pool, x_TD, context_BT)
    out, score = [], []
    for n in range(x_TD.shape[0]):
        h = x_TD[n]
        alpha = torch.sigmoid(pool.gate_weight_ED[e] @ h + pool.gate_bias_E[e])
        ffn = pool.evidence_ffn
        z = torch.cat([h, attended[e, n]])
        evidence = ffn.down_EDF[e] @ (torch.nn.functional.silu(ffn.gate_EFD[e] @ z) * (ffn.up_EFD[e] @ z))
        out.append(alpha * pool.memory.expert(e, h[None])[0] + (1 - alpha) * evidence)
        logits = [pool.score_weight_ED[k] @ attended[k, n] for k in range(pool.num_global_experts)]
        score.append(torch.sigmoid(sum(logits) / pool.num_global_experts))
    return torch.stack(out), torch.stack(score)


def randomise(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("compute", ["loop", "grouped"])
def test_paper_gate_and_learned_score_equal_per_token_reference(compute):
    """The pool (fused attention, then the expert on its rows: the per-expert loop or the grouped matmuls) against
    the per-token reference: outputs, s_evd, and the gradients of both w.r.t. the tokens and every parameter."""
    pool = EvidenceExperts(2, D, F, num_heads=4, form="paper", score="learned")
    pool.compute = pool.memory.compute = pool.evidence_ffn.compute = compute
    randomise(pool)
    x, modality, context = structure()
    g = torch.Generator().manual_seed(1)
    w_out, w_score = torch.randn(B * T, D, generator=g), torch.randn(B * T, generator=g)
    results = []
    for which in ("pool", "reference"):
        pool.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        if which == "pool":
            prep = pool.prepare(xi, TokenContext((B, T), context, modality))
            # expert 1's rows, then expert 0's: the pool sees tokens sorted by expert
            out = pool(torch.cat([xi, xi]), [B * T, B * T], torch.cat([prep.evidence_ETD[0], prep.evidence_ETD[1]]))
            outputs, score = out.unflatten(0, (2, B * T)), prep.score_T
        else:
            pairs = [paper_reference(pool, e, xi, context) for e in range(2)]
            outputs, score = torch.stack([o for o, _ in pairs]), pairs[0][1]
        ((outputs * w_out).sum() + (score * w_score).sum()).backward()
        results.append((outputs.detach(), score.detach(), xi.grad,
                        {n: p.grad.clone() for n, p in pool.named_parameters() if p.grad is not None}))
    (out, score, dx, grads), (ref_out, ref_score, ref_dx, ref_grads) = results

    def close(actual, expected, what):  # fp32 sums of different order: within 1e-5 of the largest entry
        err = ((actual - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-5, f"{what}: relative error {err:.2e}"

    close(out, ref_out, "outputs")
    close(score, ref_score, "s_evd")
    close(dx, ref_dx, "token gradients")
    assert grads.keys() == ref_grads.keys() and {"gate_weight_ED", "gate_bias_E", "score_weight_ED",
                                                  "evidence_ffn.gate_EFD", "qkv_E3XD"} <= grads.keys()
    for name in ref_grads:
        close(grads[name], ref_grads[name], name)
    assert not (score == score[0]).all()  # the score depends on the token


def test_fresh_paper_form_expert_is_the_dense_ffn_whatever_the_gate():
    """Upcycling copies the FFN into both FFNs with zeros on W3's context half: the expert is the FFN to 1e-5 with
    any attention and any gate (here all drawn at random after upcycling)."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F))
    pool = EvidenceExperts(2, D, F, num_heads=4, alpha_init=0.3, form="paper", score="learned")
    pool.upcycle_from(mlp, generator=torch.Generator().manual_seed(0))
    assert pool.gate_bias_E.tolist() == pytest.approx([torch.logit(torch.tensor(0.3)).item()] * 2)
    assert pool.gate_weight_ED.abs().max() == 0 and pool.score_weight_ED.abs().max() == 0
    with torch.no_grad():
        for p in (pool.gate_weight_ED, pool.gate_bias_E, pool.null_key_EHC, pool.score_weight_ED):
            p.normal_(std=1.0)
    x, modality, context = structure()
    prep = pool.prepare(x, TokenContext((B, T), context, modality))
    assert prep.evidence_ETD.abs().max() > 0.1  # the context half sees real attention outputs
    dense = mlp(x)
    for compute in ("loop", "grouped"):
        pool.compute = pool.memory.compute = pool.evidence_ffn.compute = compute
        out = pool(torch.cat([x, x]), [B * T, B * T], torch.cat([prep.evidence_ETD[0], prep.evidence_ETD[1]]))
        torch.testing.assert_close(out, torch.cat([dense, dense]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("geometry,tolerance", [("lorentz", 2e-3), ("poincare", 1e-5)])
def test_upcycled_asymoe_paper_block_reproduces_dense_mlp(geometry, tolerance):
    """The whole asymoe_paper block (the Lorentz expert is exact only to its maps' rounding, as for asymoe)."""
    block, out, error = upcycled_block_error(asymoe_paper_cfg(geometry))
    assert error < tolerance
    assert "evd" not in out.losses and {"balance", "order"} <= set(out.losses)  # the paper's loss (eq. 21)
    assert "pools.hyperbolic.curvature.log_c" not in dict(block.named_parameters())  # fixed curvature
    assert out.stats["hyperbolic/curvature"].item() == pytest.approx(1.0)
    assert out.stats["evidence/alpha_e0"].item() == pytest.approx(0.3, abs=1e-6)  # w_a = 0 at init
    assert out.stats["text/s_evd_mean"].item() == pytest.approx(0.5)  # w_evd = 0 at init


def test_learned_score_enters_the_text_router_and_trains_through_it():
    """The text router's logits on the evidence expert get + beta * s_evd (learned, not detached): the balance
    loss, which reads only router probabilities, reaches w_evd and the evidence attention."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F))
    block = MoEBlock.upcycle(mlp, asymoe_paper_cfg(), D, F, "silu")
    with torch.no_grad():
        block.pools["evidence"].score_weight_ED.normal_(std=1.0)
    x, modality, context = structure()
    ctx = TokenContext((B, T), context, modality)
    out = block(x, modality.reshape(-1), ctx)
    reached = {n for n, hit in grads_of(block, out.losses["balance"]).items() if hit}
    assert {"pools.evidence.score_weight_ED", "pools.evidence.qkv_E3XD", "routers.text.weight_RD"} <= reached
    # the bias itself: text-router logits with the score against the router alone
    captured = {}
    router = block.routers["text"]
    router.register_forward_hook(lambda module, args, result: captured.update(args=args, logits=result.logits_NR))
    block(x, modality.reshape(-1), ctx)
    score = block.pools["evidence"].prepare(x, ctx, block.query_codes("evidence")).score_T
    plain = torch.nn.functional.linear(x, router.weight_RD)
    expected = plain.clone()
    expected[:, -1] += block.cfg.evidence.beta * score
    torch.testing.assert_close(captured["logits"], expected)


def test_paper_cone_and_meru_cone_against_closed_forms():
    """Parent v = (2, 0), children along, at a right angle and behind, c = 1, K = 0.1 (values worked by hand)."""
    from asymoe_train.moe.order import paper_angle, paper_half_aperture

    c, k = torch.tensor(1.0), 0.1
    v = torch.tensor([[2.0, 0.0]])
    # psi(v) = asin(2K / (1 + K |v|^2)) = asin(0.2 / 1.4); MERU: asin(2K / |v|) = asin(0.1)
    assert paper_half_aperture(v, c, k).item() == pytest.approx(math.asin(1 / 7), abs=1e-6)
    assert half_aperture(v, c, k).item() == pytest.approx(math.asin(0.1), abs=1e-5)
    # <v, t>_L = 4 - 5 = -1 for t = v: xi = acos(-1/4)
    assert paper_angle(v, v, c).item() == pytest.approx(math.acos(-0.25), abs=1e-6)
    # t = (3, 0): <v, t>_L = 6 - sqrt(5 * 10); xi = acos(<v, t>_L / 6)
    t = torch.tensor([[3.0, 0.0]])
    assert paper_angle(v, t, c).item() == pytest.approx(math.acos((6 - math.sqrt(50)) / 6), abs=1e-6)
    # at a right angle, t = (0, 2): <v, t>_L = -5 < -|v||t| = -4, so the ratio clamps to -1: xi = pi
    right = torch.tensor([[0.0, 2.0]])
    assert paper_angle(v, right, c).item() == pytest.approx(math.pi, abs=2e-3)
    # MERU's exterior angle there: acos(-sqrt(5/6))
    assert exterior_angle(v, right, c).item() == pytest.approx(math.acos(-math.sqrt(5 / 6)), abs=1e-5)
    # the loss is relu(xi - psi) in either form, averaged over the pairs
    both = torch.cat([v, v])
    children = torch.cat([t, right])
    expected = (math.acos((6 - math.sqrt(50)) / 6) + math.pi) / 2 - math.asin(1 / 7)
    assert entailment_loss(both, children, c, k, form="paper").item() == pytest.approx(expected, abs=2e-3)
    # MERU: the child along the ray is inside the cone (angle 0), the one at a right angle outside
    expected_meru = (0 + math.acos(-math.sqrt(5 / 6)) - math.asin(0.1)) / 2
    assert entailment_loss(both, children, c, k).item() == pytest.approx(expected_meru, abs=1e-5)
    # curvature c: psi uses c|v|^2, xi is unchanged in form (the time coordinates follow c)
    c2 = torch.tensor(2.0)
    assert paper_half_aperture(v, c2, k).item() == pytest.approx(math.asin(0.2 / 1.8), abs=1e-6)
    inner = 6 - math.sqrt((0.5 + 4) * (0.5 + 9))
    assert paper_angle(v, t, c2).item() == pytest.approx(math.acos(inner / 6), abs=1e-6)
