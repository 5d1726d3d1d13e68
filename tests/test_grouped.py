"""The grouped expert path against the per-expert loop it replaces, the fused evidence attention against the dense
one, and the block's forward+backward without host reads (model.moe.expert_compute=grouped, on CPU here; the same
checks run on a GPU with ``benchmarks/gpu_checks.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_asymoe import asymoe_cfg, asymoe_paper_cfg
from test_moe import variant
from torch.overrides import TorchFunctionMode

from asymoe_train.config.moe_schema import MoEConfig
from asymoe_train.data.batch import modality_counts
from asymoe_train.modality import IMAGE, PAD, TEXT
from asymoe_train.moe.block import MoEBlock
from asymoe_train.moe.evidence import EvidenceExperts, EvidencePrep, TokenContext
from asymoe_train.moe.experts import SwiGLUExperts
from asymoe_train.moe.grouped import expert_of_rows, grouped_linear, loop_linear, row_experts
from asymoe_train.moe.hyperbolic_experts import HyperbolicExperts
from asymoe_train.moe.pools import set_expert_compute

D, F, B, T = 32, 48, 3, 12

# uneven, with empty experts first, in the middle and last
COUNTS = [[0, 7, 5], [6, 0, 9], [4, 11, 0], [0, 0, 13]]


def rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """|actual - expected| within ``rel`` of the expected tensor's largest entry."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def randomised(pool: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random, so biases, time columns, gates and out projections all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pool.named_parameters():
            if name.endswith(("log_scale_E", "log_c")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pool


def run_both(pool: torch.nn.Module, counts: list[int], extra: int = 3, with_evidence: bool = False):
    """(grouped, loop, loop in fp64) outputs and gradients of ``pool`` on rows sorted by expert plus ``extra``
    padding rows."""
    g = torch.Generator().manual_seed(sum(counts))
    x = torch.randn(sum(counts) + extra, D, generator=g)
    ev = torch.randn(sum(counts) + extra, D, generator=g) if with_evidence else None
    dy = torch.randn(sum(counts), D, generator=g)
    results = []
    for mode, dtype in (("grouped", torch.float32), ("loop", torch.float32), ("loop", torch.float64)):
        clone = copy.deepcopy(pool).to(dtype)
        set_expert_compute(clone, mode)
        xi = x.clone().to(dtype).requires_grad_()
        evi = ev.clone().to(dtype).requires_grad_() if with_evidence else None
        counts_E = torch.tensor(counts)
        y = clone(xi, counts_E, evi) if with_evidence else clone(xi, counts_E)
        assert y.shape == x.shape
        y = y[: sum(counts)]  # padding rows' outputs are unspecified
        (y * dy.to(dtype)).sum().backward()
        grads = {n: p.grad for n, p in clone.named_parameters() if p.grad is not None}
        results.append((y.detach(), xi.grad[: sum(counts)], evi.grad[: sum(counts)] if with_evidence else None,
                        grads))
    return results


SCALARS = ("log_scale_E", "curvature.log_c")


def assert_same(grouped, loop, exact) -> None:
    """Grouped equals loop within 1e-5 relative (fp32). The gradients of a hyperbolic pool's scalars (pre-scales,
    curvature) sum every row's large terms into a small one and lose more than that to fp32 rounding on either path
    (up to 1e-2 of their value on these random weights); those pass when the grouped value is as close to the fp64
    one as the loop's, within a factor of 5."""
    for a, b in zip(grouped[:3], loop[:3]):
        if b is not None:
            rel_close(a, b)
    assert grouped[3].keys() == loop[3].keys() == exact[3].keys() and loop[3]
    for name in loop[3]:
        a, b, ref = grouped[3][name], loop[3][name], exact[3][name]
        scale = ref.abs().max().clamp_min(1e-12)
        own_error = ((b.double() - ref).abs().max() / scale).item()
        err = ((a.double() - ref).abs().max() / scale).item()
        if name in SCALARS:
            assert err <= max(1e-5, 5 * own_error), f"{name}: {err:.2e} from fp64 (the loop's own: {own_error:.2e})"
        else:
            rel_close(a, b)


def test_grouped_linear_equals_loop_and_ignores_padding_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 24, 16, generator=g)
    for counts in COUNTS:
        x = torch.randn(sum(counts) + 2, 16, generator=g)
        n = sum(counts)
        got = grouped_linear(x, w, torch.tensor(counts), "grouped")[:n]
        rel_close(got, loop_linear(x, w, counts)[:n])
        expected = torch.cat([x[sum(counts[:e]) : sum(counts[: e + 1])] @ w[e].T for e in range(3)])
        rel_close(got, expected)
        _, valid = row_experts(torch.tensor(counts), n + 2)
        masked = grouped_linear(x, w, torch.tensor(counts), "grouped", valid_N1=valid)
        assert torch.equal(masked[:n], got) and (masked[n:] == 0).all()
    assert expert_of_rows(torch.tensor([0, 2, 1]), 5).tolist() == [1, 1, 2, 3, 3]
    expert, valid = row_experts(torch.tensor([0, 2, 1]), 5)
    assert expert.tolist() == [1, 1, 2, 2, 2] and valid[:, 0].tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("counts", COUNTS)
def test_ffn_pool_grouped_equals_loop(counts):
    assert_same(*run_both(randomised(SwiGLUExperts(3, D, F)), counts))


@pytest.mark.parametrize("geometry", ["lorentz", "poincare"])
@pytest.mark.parametrize("counts", COUNTS)
def test_hyperbolic_pool_grouped_equals_loop(geometry, counts):
    pool = randomised(HyperbolicExperts(3, D, F, geometry=geometry))
    assert_same(*run_both(pool, counts))


@pytest.mark.parametrize("form", ["additive", "paper"])
@pytest.mark.parametrize("counts", COUNTS)
def test_evidence_pool_grouped_equals_loop(counts, form):
    pool = EvidenceExperts(3, D, F, num_heads=4, form=form)
    assert_same(*run_both(randomised(pool), counts, with_evidence=True))


def dense_prepare(pool: EvidenceExperts, x_TD: torch.Tensor, ctx: TokenContext) -> EvidencePrep:
    """The evidence branch as it was first written: explicit B x H x T x T probabilities per expert, the null slot a
    column of its own."""
    b, t = ctx.batch_shape
    d = x_TD.shape[-1]
    h, c = pool.num_heads, d // pool.num_heads
    x_BTD = x_TD.reshape(b, t, d)
    before_TT = torch.ones(t, t, dtype=torch.bool).tril(-1)
    allowed_B1TT = (before_TT.unsqueeze(0) & ctx.context_BT.unsqueeze(1)).unsqueeze(1)
    outputs, scores = [], []
    for e in range(pool.num_global_experts):
        qkv = torch.nn.functional.linear(x_BTD, pool.qkv_E3XD[e].flatten(0, 1)).unflatten(-1, (3, h, c))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-1, -2)) * c**-0.5
        logits = logits.masked_fill(~allowed_B1TT, float("-inf"))
        null = (q * pool.null_key_EHC[e][None, :, None, :]).sum(-1, keepdim=True) * c**-0.5
        probs = torch.cat([logits, null], dim=-1).softmax(dim=-1)[..., :t]
        outputs.append((probs @ v).transpose(1, 2).reshape(b * t, d))
        scores.append(probs.sum(-1).mean(1).reshape(b * t))
    return EvidencePrep(torch.stack(outputs), torch.stack(scores).mean(0))


def test_fused_evidence_attention_equals_dense_probabilities():
    """Outputs, s_evd and gradients (through both) equal the dense computation, including the null slot, a sequence
    with no context at all and padding."""
    pool = randomised(EvidenceExperts(2, D, F, num_heads=4), seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B * T, D, generator=g)
    modality = torch.full((B, T), TEXT)
    modality[:, 1:4] = IMAGE
    modality[2, 9:] = PAD
    context = torch.ones(B, T, dtype=torch.bool)
    context[:, 8:] = False
    context[1] = False  # no context: every query attends to the null slot only
    ctx = TokenContext((B, T), context, modality)
    w_out, w_score = torch.randn(2, B * T, D, generator=g), torch.randn(B * T, generator=g)
    results = []
    for prepare in (EvidenceExperts.prepare, dense_prepare):
        clone = copy.deepcopy(pool)
        xi = x.clone().requires_grad_()
        prep = prepare(clone, xi, ctx)
        ((prep.evidence_ETD * w_out).sum() + (prep.score_T * w_score).sum()).backward()
        results.append((prep.evidence_ETD.detach(), prep.score_T.detach(), xi.grad,
                        {n: p.grad for n, p in clone.named_parameters() if p.grad is not None}))
    fused, dense = results
    for a, b in zip(fused[:3], dense[:3]):
        rel_close(a, b)
    assert fused[3].keys() == dense[3].keys() == {"qkv_E3XD", "null_key_EHC"}
    for name in dense[3]:
        rel_close(fused[3][name], dense[3][name])
    assert torch.all(fused[1].reshape(B, T)[1] == 0)  # no context, no evidence


def block_cfg(name: str) -> MoEConfig:
    """The variants of tests/test_moe.py and tests/test_asymoe.py (``asymoe_poincare``: the ball geometry)."""
    if name == "asymoe_paper":
        return asymoe_paper_cfg()
    if name.startswith("asymoe"):
        return asymoe_cfg("poincare" if name.endswith("poincare") else "lorentz")
    return variant(name)


VARIANTS = ["vanilla", "moiie", "asymoe", "asymoe_poincare", "asymoe_paper"]


def block_inputs(seed: int = 0):
    """Tokens of B sequences [text, image x3, prompt..., answer x2, pad...] and their context, with the host-side
    modality counts a batch carries, so the evidence branch takes its query subset. (Longer rows than
    tests/test_asymoe.py's ``structure``: the bf16 training check below was measured on these.)"""
    g = torch.Generator().manual_seed(seed)
    modality = torch.full((B, T), PAD)
    context = torch.zeros(B, T, dtype=torch.bool)
    for b, length in enumerate((12, 9, 7)):
        modality[b, :length] = TEXT
        modality[b, 1:4] = IMAGE
        context[b, : length - 2] = True
    x = torch.randn(B * T, D, generator=g)
    return x, modality.reshape(-1), TokenContext((B, T), context, modality, modality_counts=modality_counts(modality))


def block_step(block: MoEBlock, mode: str, seed: int = 0, inputs=None):
    set_expert_compute(block, mode)
    x, modality, ctx = inputs or block_inputs(seed)
    x.requires_grad_()
    out = block(x, modality, ctx)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    loss = (out.hidden_TD * dy).sum() + sum(out.losses.values())
    block.zero_grad(set_to_none=True)
    loss.backward()
    return out, x.grad, {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", VARIANTS)
def test_block_grouped_equals_loop(name):
    torch.manual_seed(0)
    block = randomised(MoEBlock(block_cfg(name), D, F, "silu"))
    (out_g, dx_g, grads_g), (out_l, dx_l, grads_l) = (block_step(copy.deepcopy(block), m) for m in ("grouped", "loop"))
    rel_close(out_g.hidden_TD, out_l.hidden_TD)
    rel_close(dx_g, dx_l)
    assert grads_g.keys() == grads_l.keys()
    for n in grads_l:
        if not n.endswith(SCALARS):  # fp32 cancellation: pinned against fp64 per pool above
            rel_close(grads_g[n], grads_l[n])
    assert out_g.losses.keys() == out_l.losses.keys()
    for key in out_l.losses:
        rel_close(out_g.losses[key], out_l.losses[key])
    for router, counts in out_l.expert_counts.items():
        assert torch.equal(out_g.expert_counts[router], counts)
        assert int(out_g.router_tokens[router]) == int(out_l.router_tokens[router]) > 0
    _, modality, _ = block_inputs()
    assert sum(int(t) for t in out_l.router_tokens.values()) == int((modality != PAD).sum())
    assert (out_l.hidden_TD[modality == PAD] == 0).all()  # padding: no expert, no output


class HostReads(TorchFunctionMode):
    """Records every call that copies a tensor's data to the host (a device sync on a GPU) or whose output size
    depends on data (``nonzero``, boolean masks, ``bincount`` and ``repeat_interleave`` without a size)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.bincount, torch.bincount, torch.unique, torch.Tensor.unique, torch.masked_select,
             torch.Tensor.masked_select, torch.argwhere}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        if func in self.READS:
            self.calls.append(name)
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
                self.calls.append(name)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put,
                    torch.Tensor.index_put_):
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, tuple | list) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.calls.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", VARIANTS)
def test_block_forward_and_backward_read_nothing_on_the_host(name):
    torch.manual_seed(0)
    block = randomised(MoEBlock(block_cfg(name), D, F, "silu"))
    block_step(block, "grouped")  # warm
    inputs = block_inputs(1)  # the batch is host data: made before the step
    with HostReads() as reads:
        block_step(block, "grouped", inputs=inputs)
    assert reads.calls == []
    # the detector works: the loop path reads the counts on the host
    with HostReads() as reads:
        block_step(block, "loop", inputs=inputs)
    assert any(call.endswith("tolist") for call in reads.calls)


def test_bf16_grouped_training_tracks_fp32():
    """A short training run of the AsyMoE block in bf16 (grouped: bf16 matmuls, fp32 maps) follows the fp32 run
    of the per-expert reference: same loss curve within bf16 tolerance, both falling."""
    torch.manual_seed(0)
    block = randomised(MoEBlock(block_cfg("asymoe"), D, F, "silu"), seed=5)
    with torch.no_grad():  # smaller weights, so the run is a gentle regression rather than a blow-up
        for p in block.parameters():
            p.mul_(0.3)
    x, modality, ctx = block_inputs(2)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)) * 0.1
    curves = {}
    for mode, dtype in (("loop", torch.float32), ("grouped", torch.bfloat16)):
        run = copy.deepcopy(block).to(dtype)
        set_expert_compute(run, mode)
        opt = torch.optim.Adam(run.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            out = run(x.to(dtype), modality, ctx)
            loss = (out.hidden_TD.float() - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[mode] = torch.tensor(losses)
    ref, bf16 = curves["loop"], curves["grouped"]
    assert ref[-1] < 0.8 * ref[0] and bf16[-1] < 0.8 * bf16[0]
    # bf16 weights and activations: a few routing decisions flip on the way (measured: at most 3.7 % apart at one
    # step, 1e-4 at the end)
    assert ((bf16 - ref).abs() / ref).max() < 0.05, (ref, bf16)
    assert abs(bf16[-1] - ref[-1]) / ref[-1] < 0.02


def test_evidence_queries_only_for_tokens_routed_to_the_pool():
    """With the batch's host-side modality counts, the evidence branch asks queries only for the tokens of the
    routers that reach it (text here): their outputs and s_evd equal the all-token computation, the block's output,
    losses and gradients are unchanged, and image tokens get zero rows."""

    torch.manual_seed(0)
    block = randomised(MoEBlock(block_cfg("asymoe"), D, F, "silu"))
    assert block.query_codes("evidence") == (TEXT,)
    x, modality, subset_ctx = block_inputs(3)
    counts = subset_ctx.modality_counts
    ctx = TokenContext(subset_ctx.batch_shape, subset_ctx.context_BT, subset_ctx.modality_BT)
    assert subset_ctx.query_positions((TEXT,))[0].shape == (B, max(row[TEXT] for row in counts))
    pool = block.pools["evidence"]
    full, subset = pool.prepare(x, ctx), pool.prepare(x, subset_ctx, (TEXT,))
    text = modality == TEXT
    rel_close(subset.evidence_ETD[:, text], full.evidence_ETD[:, text])
    rel_close(subset.score_T[text], full.score_T[text])
    assert (subset.evidence_ETD[:, modality == IMAGE] == 0).all() and (subset.score_T[modality == IMAGE] == 0).all()
    results = []
    for context in (ctx, subset_ctx):
        run = copy.deepcopy(block)
        xi = x.clone().requires_grad_()
        out = run(xi, modality, context)
        ((out.hidden_TD ** 2).sum() + sum(out.losses.values())).backward()
        results.append((out, xi.grad, {n: p.grad for n, p in run.named_parameters() if p.grad is not None}))
    (out_full, dx_full, g_full), (out_sub, dx_sub, g_sub) = results
    rel_close(out_sub.hidden_TD, out_full.hidden_TD)
    rel_close(dx_sub, dx_full)
    for key in out_full.losses:
        rel_close(out_sub.losses[key], out_full.losses[key])
    assert g_sub.keys() == g_full.keys()
    for name in g_full:
        if not name.endswith(SCALARS):
            rel_close(g_sub[name], g_full[name])
