"""Hyperbolic maths and experts, pinned by closed forms, by geoopt (when installed) and by the dense Llama MLP."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from asymoe_train.moe import hyperbolic as H
from asymoe_train.moe.hyperbolic_experts import DEFAULT_INIT_SCALE, HyperbolicExperts

D, F = 32, 48
CURVATURES = [0.1, 1.0, 10.0]
GEOMETRIES = ["lorentz", "poincare"]
NORMS = torch.logspace(-6, math.log10(50), 60, dtype=torch.float64).tolist()
# Relative error of a freshly upcycled expert against the dense MLP on unit-RMS tokens, at the default init scale:
# measured 3.8e-4 (Lorentz) and 3e-7 (Poincaré) for this config (hyperbolic_experts module doc).
UPCYCLE_TOL = 1e-3
F64 = torch.float64


def tangent(norms, dim: int = 16, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Random directions with the given norms (built in fp64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(len(norms), dim, generator=g, dtype=F64)
    return (v / v.norm(dim=-1, keepdim=True) * torch.tensor(norms, dtype=F64)[:, None]).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise |a - b| / |b|."""
    return (a - b).double().norm(dim=-1) / b.double().norm(dim=-1)


def total_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


def origin(c: float, dim: int = 16, dtype=torch.float32) -> torch.Tensor:
    o = torch.zeros(1, 1 + dim, dtype=dtype)
    o[0, 0] = 1 / math.sqrt(c)
    return o


def stereographic(x_NP: torch.Tensor, c: float) -> torch.Tensor:
    """The isometry from the hyperboloid to the Poincaré ball of the same curvature."""
    return x_NP[..., 1:] / (1 + math.sqrt(c) * x_NP[..., :1])


# ---------------------------------------------------------------------------------------------------- maps: log∘exp


@pytest.mark.parametrize("c", [0.1, 0.5, 1.0])
def test_lorentz_log_exp_is_identity(c):
    # Every tangent norm from 1e-6 to 50 is within the exp-map clamp for c ≤ 1 (sqrt(c)·50 ≤ MAX_LORENTZ_THETA).
    v = tangent(NORMS)
    back = H.lorentz_logmap0(H.lorentz_expmap0(v, c), c)
    assert back.dtype == torch.float32
    assert rel_err(back, v).max() < 1e-5


def test_norm_takes_the_rescaled_path_where_squares_overflow():
    # Rows whose squares overflow fp32 (Lorentz coordinates reach ~1e21) next to ordinary and zero rows: the CPU fast
    # path (the plain norm) must hand over to the rescaled norm and give the float64 values and gradients.
    x = torch.tensor([[3e30, -4e30, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1e-20, 0.0, 0.0]], requires_grad=True)
    norm = H._norm(x)
    expected = torch.linalg.vector_norm(x.detach().double(), dim=-1, keepdim=True)
    assert torch.isfinite(norm).all()
    assert torch.allclose(norm.double(), expected, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(norm.sum(), x)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad[:2], torch.tensor([[0.6, -0.8, 0.0], [0.6, 0.8, 0.0]]), atol=1e-6)
    assert not grad[2].any()


def test_lorentz_exp_saturates_past_clamp():
    c = 10.0
    v = tangent(NORMS)
    back = H.lorentz_logmap0(H.lorentz_expmap0(v, c), c)
    theta = math.sqrt(c) * torch.tensor(NORMS, dtype=F64)
    inside = theta <= H.MAX_LORENTZ_THETA
    assert rel_err(back[inside], v[inside]).max() < 1e-5
    # Past the clamp: direction kept, geodesic radius MAX_LORENTZ_THETA / sqrt(c).
    expected = v[~inside] / v[~inside].norm(dim=-1, keepdim=True) * H.MAX_LORENTZ_THETA / math.sqrt(c)
    assert (~inside).any() and rel_err(back[~inside], expected).max() < 1e-5


@pytest.mark.parametrize("c", CURVATURES)
def test_poincare_log_exp_is_identity(c):
    v = tangent(NORMS)
    back = H.poincare_logmap0(H.poincare_expmap0(v, c), c)
    theta = math.sqrt(c) * torch.tensor(NORMS, dtype=F64)
    theta_max = math.atanh(1 - H.BALL_EPS)  # the exp map saturates at the ball margin
    inside = theta < theta_max - 0.1
    # A ball point r = tanh(θ) is stored with rounding ≤ 2^-24 (r in [0.5, 1)); artanh'(r) = cosh²θ amplifies it,
    # and a few roundings (norm, tanh, product) add up: 8·2^-24·cosh²θ/θ relative, floored at 1e-5. This is 1e-5
    # up to θ ≈ 2.9 and 3e-3 at θ = 6; fp32 cannot do better near the boundary, which is why Lorentz is the default.
    tol = torch.clamp(8 * 2.0**-24 * torch.cosh(theta) ** 2 / theta, min=1e-5)
    assert (rel_err(back, v)[inside] <= tol[inside]).all()
    # Past the margin: direction kept, geodesic radius artanh(1 - BALL_EPS) / sqrt(c) (up to the rounding of r).
    beyond = theta > theta_max
    expected = v[beyond] / v[beyond].norm(dim=-1, keepdim=True) * theta_max / math.sqrt(c)
    assert beyond.any() and rel_err(back[beyond], expected).max() < 1e-3


# ------------------------------------------------------------------------------------------- the hyperboloid itself


@pytest.mark.parametrize("c", CURVATURES)
def test_lorentz_points_on_manifold(c):
    # fp32 coordinates resolve <x, x>_L = -x0² + |xs|² only to ~2^-23·x0², i.e. relative ~1e-7·cosh²θ against 1/c,
    # so the 1e-4 check is meaningful up to θ ≈ 4; test to sqrt(c)|v| = 3.5.
    norms = [n for n in NORMS if math.sqrt(c) * n <= 3.5]
    x = H.lorentz_expmap0(tangent(norms), c)
    assert (x[:, 0] > 0).all()
    assert ((c * H.lorentz_inner(x, x) + 1).abs() < 1e-4).all()

    g = torch.Generator().manual_seed(1)
    weight, bias, time = (torch.randn(*shape, generator=g) * 0.5 / 4 for shape in ((24, 16), (24,), (24,)))
    y = H.lorentz_linear(x, weight, c, bias, time)
    assert y.shape == (len(norms), 25) and (y[:, 0] > 0).all()
    assert ((c * H.lorentz_inner(y, y) + 1).abs() < 1e-4).all()
    # The time column reads x_0: the layer is not a function of the space part alone.
    assert not torch.allclose(y, H.lorentz_linear(x, weight, c, bias))


def test_lorentz_linear_identity_and_bias():
    c = 0.7
    x = H.lorentz_expmap0(tangent([0.3, 1.0, 2.0], dtype=F64), c)
    assert torch.allclose(H.lorentz_linear(x, torch.eye(16, dtype=F64), c), x, atol=1e-12)
    bias = torch.linspace(-1, 1, 16, dtype=F64)
    y = H.lorentz_linear(x, torch.eye(16, dtype=F64), c, bias)
    assert torch.allclose(y, H.lorentz_project(x[:, 1:] + bias, c), atol=1e-12)
    assert torch.allclose(c * H.lorentz_inner(y, y), -torch.ones(3, dtype=F64), atol=1e-12)


# -------------------------------------------------------------------------------------- closed forms (no geoopt)


@pytest.mark.parametrize("c", CURVATURES)
def test_lorentz_distance_closed_forms(c):
    norms = [n for n in NORMS if math.sqrt(c) * n <= 40]
    v = tangent(norms)
    x = H.lorentz_expmap0(v, c)
    # From the origin along a geodesic: d = |v|, and d = arcosh(sqrt(c)·x_0)/sqrt(c) (fp64 reference).
    d0 = H.lorentz_distance(origin(c).expand_as(x), x, c)
    assert rel_err(d0[:, None], v.norm(dim=-1, keepdim=True)).max() < 1e-5
    x64 = H.lorentz_expmap0(v.double(), c)
    far = math.sqrt(c) * x64[:, 0] > 1.5  # arcosh is ill-conditioned at 1; compare where it is not
    arcosh = torch.acosh(math.sqrt(c) * x64[far, 0]) / math.sqrt(c)
    assert rel_err(d0[far, None], arcosh[:, None]).max() < 1e-5
    y = H.lorentz_expmap0(tangent(norms, seed=1), c)
    assert torch.equal(H.lorentz_distance(x, y, c), H.lorentz_distance(y, x, c))
    assert (H.lorentz_distance(x, x, c) < 1e-6).all()


@pytest.mark.parametrize("c", CURVATURES)
def test_lorentz_and_poincare_agree_through_the_isometry(c):
    v, w = tangent([0.01, 0.5, 1.0, 2.0, 4.0], dtype=F64), tangent([3.0, 0.2, 1.5, 0.01, 5.0], seed=1, dtype=F64)
    v, w = v / math.sqrt(c), w / math.sqrt(c)
    x, y = H.lorentz_expmap0(v, c), H.lorentz_expmap0(w, c)
    # Poincaré's metric at the origin is 4× Euclidean, so the same geodesic is exp0(v/2) on the ball.
    assert torch.allclose(stereographic(x, c), H.poincare_expmap0(v / 2, c), atol=1e-12, rtol=1e-10)
    d_lorentz = H.lorentz_distance(x, y, c)
    d_ball = H.poincare_distance(stereographic(x, c), stereographic(y, c), c)
    assert torch.allclose(d_lorentz, d_ball, rtol=1e-9, atol=0)
    # And the Poincaré distance in its textbook form 2/sqrt(c)·artanh(sqrt(c)|(-x) ⊕ y|).
    px, py = stereographic(x, c), stereographic(y, c)
    textbook = 2 / math.sqrt(c) * torch.atanh(math.sqrt(c) * H.mobius_add(-px, py, c).norm(dim=-1))
    assert torch.allclose(d_ball, textbook, rtol=1e-9, atol=0)


@pytest.mark.parametrize("c", CURVATURES)
def test_mobius_identities(c):
    r = 1 / math.sqrt(c)  # tangent norms in units of the curvature radius
    x = H.poincare_expmap0(tangent([0.1 * r, 0.8 * r, 1.5 * r, 2.5 * r], dtype=F64), c)
    y = H.poincare_expmap0(tangent([2.0 * r, 0.3 * r, 1.0 * r, 0.05 * r], seed=1, dtype=F64), c)
    a = H.poincare_expmap0(tangent([1.0 * r, 1.0 * r, 2.0 * r, 0.5 * r], seed=2, dtype=F64), c)
    zero = torch.zeros_like(x)
    assert torch.allclose(H.mobius_add(x, zero, c), x) and torch.allclose(H.mobius_add(zero, x, c), x)
    assert torch.allclose(H.mobius_add(-x, x, c), zero, atol=1e-12)
    assert torch.allclose(H.mobius_add(-x, H.mobius_add(x, y, c), c), y, atol=1e-10)  # left cancellation
    # Left Möbius translations are isometries; distance from the origin is 2/sqrt(c)·artanh(sqrt(c)|x|).
    d = H.poincare_distance(x, y, c)
    assert torch.allclose(H.poincare_distance(H.mobius_add(a, x, c), H.mobius_add(a, y, c), c), d, rtol=1e-9)
    d0 = H.poincare_distance(zero, x, c)
    assert torch.allclose(d0, 2 / math.sqrt(c) * torch.atanh(math.sqrt(c) * x.norm(dim=-1)), rtol=1e-10)
    # Flat limit: x ⊕ y → x + y.
    assert torch.allclose(H.mobius_add(x * 1e-4, y * 1e-4, 1.0), (x + y) * 1e-4, rtol=1e-6)
    # Rotations commute with ⊗; a·I scales the geodesic radius by a.
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=F64))
    assert torch.allclose(H.mobius_matvec(x, q, c), x @ q.T, atol=1e-12)
    scaled = torch.tanh(0.5 * torch.atanh(math.sqrt(c) * x.norm(dim=-1, keepdim=True))) / math.sqrt(c)
    assert torch.allclose(H.mobius_matvec(x, 0.5 * torch.eye(16, dtype=F64), c), scaled * x / x.norm(dim=-1, keepdim=True))


def test_poincare_linear_bias_is_a_mobius_translation():
    c = 2.0
    x = H.poincare_expmap0(tangent([0.3, 1.0], dtype=F64), c)
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.2
    bias = torch.linspace(-0.5, 0.5, 8, dtype=F64)
    out = H.poincare_linear(x, weight, c, bias)
    expected = H.mobius_add(H.mobius_matvec(x, weight, c), H.poincare_expmap0(bias, c), c)
    assert torch.allclose(out, expected, atol=1e-12)
    # Without a bias the exp -> matvec -> log round trip is linear (Euclidean in disguise): the bias is what bends it.
    assert torch.allclose(H.poincare_logmap0(H.poincare_linear(x, weight, c), c), H.poincare_logmap0(x, c) @ weight.T)


# ------------------------------------------------------------------------------------------------------- geoopt


@pytest.mark.parametrize("c", CURVATURES)
def test_lorentz_matches_geoopt(c):
    geoopt = pytest.importorskip("geoopt")
    manifold = geoopt.Lorentz(k=torch.tensor(1 / c, dtype=F64))  # geoopt: <x, x> = -k, curvature -1/k
    norms = [n for n in NORMS if 1e-3 <= math.sqrt(c) * n <= 20]
    v, w = tangent(norms, dtype=F64), tangent(norms[::-1], seed=1, dtype=F64)
    x, y = H.lorentz_expmap0(v, c), H.lorentz_expmap0(w, c)
    zero = torch.zeros(len(norms), 1, dtype=F64)
    assert torch.allclose(x, manifold.expmap0(torch.cat([zero, v], -1)), rtol=1e-5, atol=1e-5)
    assert torch.allclose(H.lorentz_logmap0(x, c), manifold.logmap0(x)[:, 1:], rtol=1e-5, atol=1e-5)
    reference = manifold.dist(x, y)
    assert torch.allclose(H.lorentz_distance(x, y, c), reference, rtol=1e-5, atol=1e-5)
    # fp32 points (rounded from the fp64 ones), fp32 maths, against geoopt in fp64: still within 1e-5.
    d32 = H.lorentz_distance(x.float(), y.float(), c)
    assert d32.dtype == torch.float32
    assert rel_err(d32[:, None], reference[:, None]).max() < 1e-5


@pytest.mark.parametrize("c", CURVATURES)
def test_poincare_matches_geoopt(c):
    geoopt = pytest.importorskip("geoopt")
    ball = geoopt.PoincareBall(c=torch.tensor(c, dtype=F64))
    # Tangent radius ≤ 2: geoopt clamps artanh at 1 - 1e-7, which would cut off distances between points further out.
    norms = [n / math.sqrt(c) for n in torch.linspace(1e-3, 2.0, 20).tolist()]
    v, w = tangent(norms, dtype=F64), tangent(norms[::-1], seed=1, dtype=F64)
    x, y = H.poincare_expmap0(v, c), H.poincare_expmap0(w, c)
    m = torch.randn(12, 16, generator=torch.Generator().manual_seed(2), dtype=F64) * 0.3
    assert torch.allclose(x, ball.expmap0(v), atol=1e-10)
    assert torch.allclose(H.poincare_logmap0(x, c), ball.logmap0(x), atol=1e-10)
    assert torch.allclose(H.mobius_add(x, y, c), ball.mobius_add(x, y), atol=1e-10)
    assert torch.allclose(H.mobius_matvec(x, m, c), ball.mobius_matvec(m, x), atol=1e-10)
    reference = ball.dist(x, y)
    assert torch.allclose(H.poincare_distance(x, y, c), reference, rtol=1e-5, atol=1e-5)
    assert rel_err(H.poincare_distance(x.float(), y.float(), c)[:, None], reference[:, None]).max() < 1e-5


# ---------------------------------------------------------------------------------------------------- gradients


def assert_finite_grads(*tensors):
    for t in tensors:
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("norm", [0.0, 1e-6, 50.0, 1e4])
def test_map_gradients_finite(geometry, norm):
    expmap0, logmap0 = {"lorentz": (H.lorentz_expmap0, H.lorentz_logmap0),
                        "poincare": (H.poincare_expmap0, H.poincare_logmap0)}[geometry]
    c = torch.tensor(1.0, requires_grad=True)
    v = tangent([norm] * 3).requires_grad_(True)
    x = expmap0(v, c)
    point = x.detach().requires_grad_(True)
    (x.sum() + logmap0(x, c).sum()).backward()
    logmap0(point, c).sum().backward()
    assert_finite_grads(v, c, point)
    if norm == 0.0 and geometry == "lorentz":  # at the origin the space part of exp0 is v to first order
        assert torch.allclose(v.grad, torch.full_like(v, 2.0))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("norms", [(0.0, 0.0), (2.0, 2.0), (30.0, 0.0), (70.0, 60.0)])
def test_distance_gradients_finite(geometry, norms):
    c = torch.tensor(1.0, requires_grad=True)
    v, w = tangent([norms[0]] * 2), tangent([norms[1]] * 2, seed=int(norms[0] != norms[1]))
    if geometry == "lorentz":
        x, y = H.lorentz_expmap0(v, 1.0), H.lorentz_expmap0(w, 1.0)
        distance = H.lorentz_distance
    else:
        x, y = H.poincare_expmap0(v, 1.0), H.poincare_expmap0(w, 1.0)
        distance = H.poincare_distance
    x.requires_grad_(True)
    y.requires_grad_(True)
    d = distance(x, y, c)
    assert torch.isfinite(d).all()
    d.sum().backward()
    assert_finite_grads(x, y, c)


# ------------------------------------------------------------------------------------------------------ curvature


def test_curvature_clamped():
    curvature = H.Curvature()
    assert curvature().item() == pytest.approx(1.0)
    with torch.no_grad():
        curvature.log_c.fill_(1e4)
    assert curvature().item() == pytest.approx(10.0)
    with torch.no_grad():
        curvature.log_c.fill_(-1e4)
    assert curvature().item() == pytest.approx(0.1)
    assert H.Curvature(2.0, c_min=0.5, c_max=4.0)().item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="curvature bounds"):
        H.Curvature(20.0)


# -------------------------------------------------------------------------------------------------------- experts


def llama_mlp(seed: int = 0) -> LlamaMLP:
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F, hidden_act="silu"))


def unit_rms_tokens(num: int = 64, seed: int = 1) -> torch.Tensor:
    """Tokens of unit RMS per coordinate, like post-RMSNorm hidden states."""
    return torch.randn(num, D, generator=torch.Generator().manual_seed(seed))


def randomised(experts: HyperbolicExperts, seed: int = 0) -> HyperbolicExperts:
    """Every parameter random (biases and time columns included) so all paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if name.endswith(("_EFD", "_EDF", "_EF", "_ED")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return experts


def set_curvature(experts: HyperbolicExperts, c: float) -> None:
    with torch.no_grad():
        experts.curvature.log_c.fill_(math.log(c))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_forward_equals_per_expert_loop(geometry):
    experts = randomised(HyperbolicExperts(3, D, F, geometry=geometry, init_scale=0.5))
    counts = [5, 0, 7]
    x = unit_rms_tokens(sum(counts))
    y = experts(x, counts)
    loop = torch.cat([experts.expert(0, x[:5]), experts.expert(1, x[5:5]), experts.expert(2, x[5:])])
    assert y.shape == x.shape
    assert torch.allclose(y, loop, atol=1e-6, rtol=1e-6)


def reference_lorentz_expert(experts: HyperbolicExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """The module doc's maths layer by layer: exp0, three Lorentz-linear layers with their time coordinates formed,
    log0 of the full points (the experts skip the time coordinates and fuse gate with up)."""
    c, s = experts.curvature(), experts.log_scale_E[e].exp()

    def layer(name, point):
        weight, bias, time = (getattr(experts, f"{name}_{suffix}") for suffix in
                              (("EFD", "bias_EF", "time_EF") if name != "down" else ("EDF", "bias_ED", "time_ED")))
        return H.lorentz_logmap0(H.lorentz_linear(point, weight[e], c, bias[e] * s, time[e] * s), c) / s

    point = H.lorentz_expmap0(x * s, c)
    h = torch.nn.functional.silu(layer("gate", point)) * layer("up", point)
    return layer("down", H.lorentz_expmap0(h * s, c))


@pytest.mark.parametrize("rms", [1.0, 30.0])
def test_fused_lorentz_expert_equals_layer_by_layer_maths(rms):
    experts = randomised(HyperbolicExperts(2, D, F, init_scale=0.5))
    set_curvature(experts, 2.5)
    x = unit_rms_tokens(16) * rms
    assert torch.allclose(experts.expert(1, x), reference_lorentz_expert(experts, 1, x), rtol=1e-5, atol=1e-5 * rms)
    # gradients in fp64, where rounding cannot hide a difference in the maths (at rms 30 the points reach cosh(24))
    experts, x = experts.double(), x.double()
    y, reference = experts.expert(1, x), reference_lorentz_expert(experts, 1, x)
    grads = torch.autograd.grad(y.square().sum(), list(experts.parameters()), allow_unused=True)
    expected = torch.autograd.grad(reference.square().sum(), list(experts.parameters()), allow_unused=True)
    for (name, _), g, ref in zip(experts.named_parameters(), grads, expected, strict=True):
        if ref is None or not ref.any():  # expert 0's weights
            assert g is None or not g.any(), name
        else:
            # the curvature is fp32 by design (Curvature.forward), so its gradient passes through fp32
            tol = 1e-6 if name == "curvature.log_c" else 1e-9
            assert torch.allclose(g, ref, rtol=tol, atol=tol * ref.abs().max()), name


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_upcycled_expert_matches_dense_mlp(geometry):
    mlp = llama_mlp()
    experts = randomised(HyperbolicExperts(2, D, F, geometry=geometry))
    experts.upcycle_from(mlp)
    x = unit_rms_tokens()
    with torch.no_grad():
        dense = mlp(x)
        y = experts(torch.cat([x, x]), [len(x), len(x)])
    assert total_rel_err(y[: len(x)], dense) < UPCYCLE_TOL
    assert total_rel_err(y[len(x):], dense) < UPCYCLE_TOL


def test_expert_tends_to_euclidean_ffn_as_scale_shrinks():
    mlp, x = llama_mlp(), unit_rms_tokens()
    errors = []
    for scale in (0.1, 0.01):
        experts = HyperbolicExperts(1, D, F, init_scale=scale)
        experts.upcycle_from(mlp)
        with torch.no_grad():
            errors.append(total_rel_err(experts.expert(0, x), mlp(x)))
    # The deviation is second order in the scale: 10× smaller scale, ~100× smaller error.
    assert errors[1] < errors[0] / 50


def test_lorentz_output_depends_on_curvature():
    # All weights fixed, c from 1 to 10: measured 3.4e-3 relative change at the default scale (9× this expert's
    # upcycling error, 3.8e-4) and 0.17 at init_scale 0.3 (a Euclidean FFN in disguise would not move at all).
    mlp, x = llama_mlp(), unit_rms_tokens()
    for scale, min_change in ((DEFAULT_INIT_SCALE, 2 * UPCYCLE_TOL), (0.3, 0.1)):
        experts = HyperbolicExperts(1, D, F, init_scale=scale)
        experts.upcycle_from(mlp)
        with torch.no_grad():
            dense = mlp(x)
            y1 = experts.expert(0, x)
            set_curvature(experts, 10.0)
            y10 = experts.expert(0, x)
        assert total_rel_err(y10, y1) > max(min_change, 5 * total_rel_err(y1, dense))


def test_poincare_output_depends_on_curvature_through_biases():
    mlp, x = llama_mlp(), unit_rms_tokens()
    experts = HyperbolicExperts(1, D, F, geometry="poincare", init_scale=0.3)
    experts.upcycle_from(mlp)
    with torch.no_grad():
        y1 = experts.expert(0, x)
        set_curvature(experts, 10.0)
        y10 = experts.expert(0, x)
        # Zero biases: Möbius matvecs read back through log0 are linear, so c has no effect (module doc).
        assert total_rel_err(y10, y1) < 1e-5
        for bias in (experts.gate_bias_EF, experts.up_bias_EF, experts.down_bias_ED):
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)))
        y10 = experts.expert(0, x)
        set_curvature(experts, 1.0)
        y1 = experts.expert(0, x)
    assert total_rel_err(y10, y1) > 0.1


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("rms", [0.0, 1e3])
def test_expert_gradients_finite(geometry, rms):
    experts = randomised(HyperbolicExperts(2, D, F, geometry=geometry))
    x = (unit_rms_tokens(6) * rms).requires_grad_(True)
    y = experts(x, [4, 2])
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert_finite_grads(x, *experts.parameters())


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bf16(geometry):
    mlp = llama_mlp()
    experts = HyperbolicExperts(2, D, F, geometry=geometry)
    experts.upcycle_from(mlp)
    x = unit_rms_tokens()
    with torch.no_grad():
        dense = mlp(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the maths stays fp32 under autocast
            y = experts(x, [40, 24])
        assert y.dtype == torch.float32 and total_rel_err(y, dense) < UPCYCLE_TOL
        y = experts.to(torch.bfloat16)(x.bfloat16(), [40, 24])
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert total_rel_err(y.float(), dense) < 3e-2  # bf16 weights and output: ~2^-8 relative


def test_curvature_clamped_in_experts():
    experts = randomised(HyperbolicExperts(1, D, F, curvature_min=0.5, curvature_max=2.0))
    x = unit_rms_tokens(8)
    outputs = {}
    for log_c, expected in ((1e3, 2.0), (-1e3, 0.5), (math.log(2.0), 2.0)):
        with torch.no_grad():
            experts.curvature.log_c.fill_(log_c)
            assert experts.curvature().item() == pytest.approx(expected)
            outputs[log_c] = experts.expert(0, x)
        assert torch.isfinite(outputs[log_c]).all()
    assert torch.equal(outputs[1e3], outputs[math.log(2.0)])  # pushed past the bound = at the bound


def test_params_per_expert_and_errors():
    lorentz = HyperbolicExperts(3, D, F)
    poincare = HyperbolicExperts(3, D, F, geometry="poincare")
    weights, biases = 3 * F * D, 2 * F + D
    assert poincare.params_per_expert() == weights + biases + 1  # + the log pre-scale
    assert lorentz.params_per_expert() == weights + 2 * biases + 1  # + the time columns
    with pytest.raises(ValueError, match="unknown geometry 'klein'"):
        HyperbolicExperts(1, D, F, geometry="klein")
    with pytest.raises(ValueError, match="init_scale"):
        HyperbolicExperts(1, D, F, init_scale=0.0)
    with pytest.raises(ValueError, match="cannot upcycle"):
        HyperbolicExperts(1, D, F + 1).upcycle_from(llama_mlp())


def test_a_fixed_curvature_is_a_buffer_at_its_init():
    """hyperbolic.learn_curvature=false (the AsyMoE paper's curvature -1): no parameter, nothing to train, and the
    value (in the state dict, so checkpoints keep it) is the init."""
    from asymoe_train.moe.hyperbolic import Curvature

    fixed, learned = Curvature(1.0, learnable=False), Curvature(2.0)
    assert list(fixed.parameters()) == [] and "log_c" in fixed.state_dict()
    assert fixed().item() == 1.0 and [n for n, _ in learned.named_parameters()] == ["log_c"]
    assert learned().item() == pytest.approx(2.0)
