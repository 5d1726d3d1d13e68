"""AsyMoE pieces: evidence-priority experts (causality, upcycling), the asymoe block, and where each loss's gradient
goes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from asymoe_train.config.schema import EvidenceConfig, HyperbolicConfig, MoEConfig, PoolConfig, RouterConfig
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.moe.block import MoEBlock
from asymoe_train.moe.evidence import EvidenceExperts, TokenContext
from asymoe_train.moe.order import entailment_loss, exterior_angle, half_aperture

D, F, B, T = 32, 48, 3, 10


def asymoe_cfg(geometry: str = "lorentz", loss_kind: str = "routing") -> MoEConfig:
    return MoEConfig(
        variant="asymoe", top_k=2, router_init_std=0.5,
        pools=[PoolConfig(name="vision", num_experts=1), PoolConfig(name="hyperbolic", expert="hyperbolic",
                                                                       num_experts=2),
               PoolConfig(name="text", num_experts=1), PoolConfig(name="evidence", expert="evidence", num_experts=1)],
        routers=[RouterConfig(name="vision", modalities=["image"], pools=["vision", "hyperbolic"]),
                 RouterConfig(name="text", modalities=["text"], pools=["text", "hyperbolic", "evidence"])],
        hyperbolic=HyperbolicConfig(geometry=geometry), evidence=EvidenceConfig(num_heads=4, loss_kind=loss_kind),
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


@pytest.mark.parametrize("geometry,tolerance", [("lorentz", 2e-3), ("poincare", 1e-5)])
def test_upcycled_asymoe_block_reproduces_dense_mlp(geometry, tolerance):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F))
    block = MoEBlock.upcycle(mlp, asymoe_cfg(geometry), D, F, "silu")
    x, modality, context = structure()
    x = x / x.square().mean(-1, keepdim=True).sqrt()  # unit-RMS tokens, as after the decoder's RMSNorm
    out = block(x, modality.reshape(-1), TokenContext((B, T), context, modality))
    keep = modality.reshape(-1) != PAD
    dense = mlp(x)[keep]
    error = (out.hidden_TD[keep] - dense).norm() / dense.norm()
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
