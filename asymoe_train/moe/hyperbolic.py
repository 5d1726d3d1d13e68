"""Hyperbolic geometry for the inter-modality experts, written once: the Lorentz (hyperboloid) model and the Poincaré
ball, both of curvature -c (c > 0), with maps at the origin, distances, hyperbolic linear layers, and a learnable
clamped curvature.

Conventions. A Lorentz point x = (x_0, x_space) has <x, x>_L = -x_0² + |x_space|² = -1/c and x_0 > 0; its origin is
(1/sqrt(c), 0). Tangent vectors at the origin have time component 0 and are passed as their space part only. The
Poincaré ball is {|x| < 1/sqrt(c)} with metric (2 / (1 - c|x|²))² times the Euclidean one; geoopt's
``Lorentz(k=1/c)`` and ``PoincareBall(c=c)`` use the same conventions (the tests pin that).

Numerics. Every public function computes in at least fp32 with autocast off (bf16/fp16 inputs are upcast, fp64 stays
fp64) and returns the dtype of its first argument. Each clamp is named below with the reason for its value.

# N any leading dims, D space dims of a point, P = 1 + D coordinates of a Lorentz point, F output dims of a layer
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import torch
from torch import nn

# Floor for a norm that is divided by: keeps v / |v| and its gradient finite at the origin (v = 0). The maps are
# written as v * f(|v|) with f even, smooth and f(0) = 1, so below this floor f is 1 to working precision anyway.
MIN_NORM = 1e-15
# Largest sqrt(c)·|v| the Lorentz exp map accepts; larger tangent vectors keep their direction and saturate at this
# geodesic radius. sinh(50) ≈ 2.6e21: coordinates and the exp map's Jacobian (~cosh θ) stay ~1e17 below the fp32
# maximum (3.4e38), room for a wide matvec over the coordinates and for backward products with large gradients, while
# log∘exp is exact up to here (tested: tangent norms up to 50 at c = 1).
MAX_LORENTZ_THETA = 50.0
# Margin of the Poincaré ball: points are clipped to radius (1 - BALL_EPS)/sqrt(c). fp32 resolves 1 - r down to
# ~6e-8, so 1e-5 keeps clipped points strictly inside with ~170 ulps to spare; it caps geodesic radius at
# artanh(1 - 1e-5)/sqrt(c) ≈ 6.1/sqrt(c) (geoopt's fp32 default, 4e-3, caps it at 3.1).
BALL_EPS = 1e-5
# Floor under the sqrt of the normalised squared Lorentz chord in the distance. The normalised value is either
# ≥ 1 or exactly 0 (x == y), where sqrt has an infinite slope; any floor in between keeps the gradient finite there.
MIN_CHORD_SQ = 1e-30


def _fp32(fn):
    """Run ``fn`` with floating tensors upcast to at least fp32 and autocast off; cast the result to arg 0's dtype."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0]
        floats = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in floats), torch.float32)

        def cast(a):
            return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

        with torch.autocast(first.device.type, enabled=False):
            out = fn(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
        return out.to(first.dtype)

    return wrapper


# Whether ``_norm`` may read a flag on the host (CPU only); off inside :func:`no_host_reads`.
_HOST_CHECKS = contextvars.ContextVar("hyperbolic_host_checks", default=True)


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Within this block the maps read nothing on the host, on CPU too (the grouped expert path, which keeps every
    count and check on the device wherever it runs)."""
    token = _HOST_CHECKS.set(False)
    try:
        yield
    finally:
        _HOST_CHECKS.reset(token)


def _norm(x_ND: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dim, keepdim, that does not overflow: |x| = m·|x/m| with m = max_i |x_i|
    (detached; the identity has the exact gradient). Lorentz coordinates reach ~1e21, whose squares overflow fp32.

    On CPU the plain norm is tried first and kept when every row is finite (checking costs no device sync there): the
    rescaled one takes four more passes over ``x`` forward and backward, most of a hyperbolic expert's element-wise
    time at the demo's sizes. Only rows whose squares overflow differ, and those take the rescaled path. Not within
    :func:`no_host_reads`."""
    if x_ND.device.type == "cpu" and _HOST_CHECKS.get():
        plain_N1 = torch.linalg.vector_norm(x_ND, dim=-1, keepdim=True)
        if bool(plain_N1.isfinite().all()):
            return plain_N1
    m_N1 = x_ND.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x_ND.dtype).tiny)
    return m_N1 * torch.linalg.vector_norm(x_ND / m_N1, dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------- Lorentz


@_fp32
def lorentz_inner(x_NP: torch.Tensor, y_NP: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Lorentz (Minkowski) inner product -x_0 y_0 + <x_space, y_space>. Plain products: they overflow fp32 for points
    with sqrt(c)·radius above ~44, and cancel for nearby far points; ``lorentz_distance`` avoids it for that reason."""
    xy_NP = x_NP * y_NP
    inner_N1 = xy_NP[..., 1:].sum(-1, keepdim=True) - xy_NP[..., :1]
    return inner_N1 if keepdim else inner_N1[..., 0]


@_fp32
def lorentz_project(x_ND: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """The Lorentz point with space part ``x_ND``: the time coordinate sqrt(1/c + |x|²) is recomputed (overflow-free,
    as a hypot) so the point lies on the hyperboloid. Returns ``[..., 1 + D]``."""
    radius = torch.as_tensor(1.0 / c, dtype=x_ND.dtype, device=x_ND.device).sqrt()
    time_N1 = torch.hypot(_norm(x_ND), radius.expand_as(x_ND[..., :1]))
    return torch.cat([time_N1, x_ND], dim=-1)


def lorentz_expmap0_parts(v_ND: torch.Tensor, c: float | torch.Tensor,
                          scale: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``lorentz_expmap0(scale · v)`` as (time ``[..., 1]``, space ``[..., D]``), for callers that use the parts
    separately (fp32 is the caller's business here). ``scale`` (a scalar, or one per row ``[..., 1]``) joins the
    per-row factor, which saves the pass over ``v`` that forming ``scale · v`` would take."""
    sqrt_c = c**0.5
    theta_N1 = sqrt_c * (scale * _norm(v_ND)).clamp_min(MIN_NORM)
    clamped_N1 = theta_N1.clamp_max(MAX_LORENTZ_THETA)
    # v·sinh(θ)/θ rather than sinh(θ)·v/|v|: the same value, exact and smooth through v = 0.
    return torch.cosh(clamped_N1) / sqrt_c, v_ND * (scale * torch.sinh(clamped_N1) / theta_N1)


def lorentz_logmap0_space(space_ND: torch.Tensor, c: float | torch.Tensor,
                          scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``lorentz_logmap0`` of the point whose space part is ``space_ND`` (the time coordinate is implied by it),
    divided by ``scale`` (a scalar, or one per row ``[..., 1]``) within the per-row factor."""
    z_N1 = c**0.5 * _norm(space_ND).clamp_min(MIN_NORM)
    return space_ND * (torch.asinh(z_N1) / (z_N1 * scale))


@_fp32
def lorentz_expmap0(v_ND: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Exponential map at the origin: tangent space part ``v_ND`` to the point (cosh θ, sinh θ · v/|v|) / sqrt(c),
    θ = sqrt(c)|v|. θ is clamped to ``MAX_LORENTZ_THETA`` (direction kept). Returns ``[..., 1 + D]``."""
    return torch.cat(lorentz_expmap0_parts(v_ND, c), dim=-1)


@_fp32
def lorentz_logmap0(x_NP: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Logarithmic map at the origin: the space part of the tangent vector, asinh(sqrt(c)|x_s|)/sqrt(c) · x_s/|x_s|.

    Read from the space part only (asinh), not from x_0 (arcosh): accurate near the origin, where arcosh(1 + δ) loses
    half the digits, and at large radius alike. Assumes ``x_NP`` lies on the hyperboloid. Returns ``[..., D]``.
    """
    return lorentz_logmap0_space(x_NP[..., 1:], c)


@_fp32
def lorentz_distance(x_NP: torch.Tensor, y_NP: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Geodesic distance arcosh(-c<x, y>_L)/sqrt(c), evaluated as 2/sqrt(c) · asinh(sqrt(c)/2 · |x - y|_L).

    The chord |x - y|_L = sqrt(<x - y, x - y>_L) is split into an angular and a radial part that are both ≥ 0 and
    free of cancellation: with a = |x_s|, b = |y_s|, unit directions x̂, ŷ, time coordinates X = hypot(a, 1/sqrt(c)),
    Y = hypot(b, 1/sqrt(c)), S = X + Y and g = S - (a + b) = (1/c)/(X + a) + (1/c)/(Y + b),
    |x - y|_L² = a b |x̂ - ŷ|² + (a - b)² g (2S - g) / S².
    So the distance is accurate for nearby points (no arcosh at 1) and for far ones (no overflow: nothing is squared
    at the scale of the coordinates). Like ``lorentz_logmap0`` it reads the space parts; x_0 is implied by them.
    """
    radius = torch.as_tensor(1.0 / c, dtype=x_NP.dtype, device=x_NP.device).sqrt()
    xs_ND, ys_ND = x_NP[..., 1:], y_NP[..., 1:]
    a_N1, b_N1 = _norm(xs_ND), _norm(ys_ND)
    xt_N1, yt_N1 = torch.hypot(a_N1, radius), torch.hypot(b_N1, radius)
    s_N1 = xt_N1 + yt_N1
    g_N1 = radius.square() / (xt_N1 + a_N1) + radius.square() / (yt_N1 + b_N1)
    # Floors on a, b: directions of (near-)origin points are arbitrary; the clamps zero the gradient of sqrt at 0.
    a_N1, b_N1 = a_N1.clamp_min(MIN_NORM), b_N1.clamp_min(MIN_NORM)
    angular_N1 = a_N1.sqrt() * b_N1.sqrt() * _norm(xs_ND / a_N1 - ys_ND / b_N1)
    radial_N1 = (a_N1 - b_N1).abs() * (g_N1 * (2 * s_N1 - g_N1)).sqrt() / s_N1
    # hypot(angular, radial) with the floor below sqrt, so the gradient is finite (zero) at x == y.
    m_N1 = torch.maximum(angular_N1, radial_N1).detach().clamp_min(torch.finfo(x_NP.dtype).tiny)
    chord_sq_N1 = ((angular_N1 / m_N1).square() + (radial_N1 / m_N1).square()).clamp_min(MIN_CHORD_SQ)
    chord_N = (m_N1 * chord_sq_N1.sqrt())[..., 0]
    return 2.0 / c**0.5 * torch.asinh(c**0.5 / 2.0 * chord_N)


@_fp32
def lorentz_linear(
    x_NP: torch.Tensor,
    weight_FD: torch.Tensor,
    c: float | torch.Tensor,
    bias_F: torch.Tensor | None = None,
    weight_time_F: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lorentz-linear layer ("fully hyperbolic", Chen et al. 2022): the full point (x_0, x_space) is mapped by the
    weight matrix [weight_time_F | weight_FD] plus ``bias_F`` to a new space part, and the time coordinate is
    recomputed so the output lies on the hyperboloid of curvature -c. Returns ``[..., 1 + F]``.

    Not Euclidean in disguise: read back at the origin, log0 ∘ lorentz_linear ∘ exp0 is
    v ↦ ρ(W σ(θ) v + w_t cosh(θ)/sqrt(c) + b) with σ, ρ the sinh and asinh radial rescalings, which depends on c and
    is not affine in v, even with no bias or time column (on the ball, exp0 → matvec → log0 is exactly linear).
    """
    space_NF = nn.functional.linear(x_NP[..., 1:], weight_FD, bias_F)
    if weight_time_F is not None:
        space_NF = space_NF + x_NP[..., :1] * weight_time_F
    return lorentz_project(space_NF, c)


# ---------------------------------------------------------------------------------------------------------- Poincaré


@_fp32
def poincare_project(x_ND: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Clip to the ball: points beyond radius (1 - BALL_EPS)/sqrt(c) are scaled back onto it, others are unchanged."""
    max_norm = (1.0 - BALL_EPS) / c**0.5
    return x_ND * (max_norm / _norm(x_ND).clamp_min(MIN_NORM)).clamp_max(1.0)


@_fp32
def poincare_expmap0(v_ND: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Exponential map at the origin: tanh(sqrt(c)|v|) · v / (sqrt(c)|v|), clipped by ``poincare_project`` (so it
    saturates at geodesic radius artanh(1 - BALL_EPS)/sqrt(c), direction kept)."""
    theta_N1 = c**0.5 * _norm(v_ND).clamp_min(MIN_NORM)
    return poincare_project(v_ND * (torch.tanh(theta_N1) / theta_N1), c)


@_fp32
def poincare_logmap0(y_ND: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Logarithmic map at the origin: artanh(sqrt(c)|y|) · y / (sqrt(c)|y|); sqrt(c)|y| is clamped to 1 - BALL_EPS
    so points on (or rounded past) the boundary map to a finite tangent vector."""
    z_N1 = c**0.5 * _norm(y_ND).clamp_min(MIN_NORM)
    return y_ND * (torch.atanh(z_N1.clamp_max(1.0 - BALL_EPS)) / z_N1)


@_fp32
def mobius_add(x_ND: torch.Tensor, y_ND: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Möbius addition x ⊕ y = ((1 + 2c<x,y> + c|y|²) x + (1 - c|x|²) y) / (1 + 2c<x,y> + c²|x|²|y|²).

    The denominator is ≥ (1 - c|x||y|)² > 0 inside the ball; it is floored at MIN_NORM for points on the boundary.
    """
    xy_N1 = (x_ND * y_ND).sum(-1, keepdim=True)
    x2_N1 = x_ND.square().sum(-1, keepdim=True)
    y2_N1 = y_ND.square().sum(-1, keepdim=True)
    num_ND = (1 + 2 * c * xy_N1 + c * y2_N1) * x_ND + (1 - c * x2_N1) * y_ND
    den_N1 = 1 + 2 * c * xy_N1 + c**2 * x2_N1 * y2_N1
    return num_ND / den_N1.clamp_min(MIN_NORM)


@_fp32
def mobius_matvec(x_ND: torch.Tensor, weight_FD: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Möbius matrix-vector product M ⊗ x = exp0(M log0(x)) (Ganea et al. 2018), M = ``weight_FD`` applied like
    ``nn.Linear``; equal to tanh(|Mx|/|x| artanh(sqrt(c)|x|)) Mx / (sqrt(c)|Mx|). Returns ``[..., F]``."""
    return poincare_expmap0(nn.functional.linear(poincare_logmap0(x_ND, c), weight_FD), c)


@_fp32
def poincare_distance(x_ND: torch.Tensor, y_ND: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Geodesic distance 2/sqrt(c) · artanh(sqrt(c) |(-x) ⊕ y|), evaluated as
    2/sqrt(c) · asinh(sqrt(c) |x - y| / sqrt((1 - c|x|²)(1 - c|y|²))): the same value, accurate for nearby points and
    with no artanh to saturate near the boundary. 1 - c|x|² is floored at BALL_EPS: projected points have ≥ 2e-5, so
    the floor only keeps points outside the ball finite."""
    x_conf_N1 = (1 - c * x_ND.square().sum(-1, keepdim=True)).clamp_min(BALL_EPS)
    y_conf_N1 = (1 - c * y_ND.square().sum(-1, keepdim=True)).clamp_min(BALL_EPS)
    z_N1 = c**0.5 * _norm(x_ND - y_ND) / (x_conf_N1 * y_conf_N1).sqrt()
    return 2.0 / c**0.5 * torch.asinh(z_N1[..., 0])


@_fp32
def poincare_linear(
    x_ND: torch.Tensor, weight_FD: torch.Tensor, c: float | torch.Tensor, bias_F: torch.Tensor | None = None
) -> torch.Tensor:
    """Hyperbolic linear layer on the ball (Ganea et al. 2018): (M ⊗ x) ⊕ b, with the bias point b = exp0(``bias_F``)
    given as a tangent vector at the origin so it can be trained as a Euclidean parameter. Returns ``[..., F]``.

    With a zero bias, log0(M ⊗ exp0(v)) = Mv: the curvature acts through the Möbius bias addition.
    """
    y_NF = mobius_matvec(x_ND, weight_FD, c)
    if bias_F is not None:
        y_NF = mobius_add(y_NF, poincare_expmap0(bias_F, c), c)
    return poincare_project(y_NF, c)


# --------------------------------------------------------------------------------------------------------- curvature


class Curvature(nn.Module):
    """A learnable (or, with ``learnable=False``, fixed) curvature magnitude c > 0 (the manifold's curvature is -c),
    stored as log c.

    ``forward()`` returns c clamped to [c_min, c_max] in fp32 (the clamp is on log c, so no overflow however far the
    parameter is pushed). Outside the bounds the gradient is zero, as for any hard clamp. Weight decay on ``log_c``
    would pull c towards 1; leave it out of decay unless that prior is wanted.
    """

    def __init__(self, init: float = 1.0, c_min: float = 0.1, c_max: float = 10.0, learnable: bool = True):
        super().__init__()
        if not 0.0 < c_min <= init <= c_max:
            raise ValueError(f"curvature bounds need 0 < c_min <= init <= c_max; got {c_min}, {init}, {c_max}")
        self.c_min, self.c_max = c_min, c_max
        # shape [1], not a 0-d scalar: DeepSpeed's parameter broadcast cannot view 0-d tensors as bytes
        log_c = torch.tensor([math.log(init)])
        if learnable:
            self.log_c = nn.Parameter(log_c)
        else:  # fixed curvature (the AsyMoE paper's -1): a buffer, so no optimizer or trainable group can move it
            self.register_buffer("log_c", log_c)

    def forward(self) -> torch.Tensor:
        return self.log_c.float().clamp(math.log(self.c_min), math.log(self.c_max)).exp().squeeze(0)

    def extra_repr(self) -> str:
        return f"c_min={self.c_min}, c_max={self.c_max}"
