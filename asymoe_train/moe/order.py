"""Hyperbolic entailment-cone order loss L_order (Lorentz model), in two forms (``model.moe.hyperbolic.cone_form``).

* ``meru``: MERU's half-aperture asin(2K / (sqrt(c)|x|)) and exterior angle (the angle at the parent between the
  geodesic to the child and the ray from the origin).
* ``paper`` (AsyMoE, ICMR 2026, eqs. 15-17): psi(v) = asin(2K / (1 + K c|v|^2)) and
  xi(v, t) = acos(<v, t>_L / (|v| |t|)), with |.| the norm of the space coordinates (the paper leaves ||.||_L for
  hyperboloid points undefined; the Lorentz norm would make the ratio constant). The paper fixes c = 1, where
  c|v|^2 is its |v|^2. <v, t>_L <= -1/c < 0, so the ratio is negative: xi is obtuse, and it is pi (the clamp, zero
  gradient) where |<v, t>_L| exceeds |v||t|, i.e. for points near the origin; the cone then trains through psi.

For every sequence with an image, the pooled text point should lie inside the entailment cone of the pooled image
point (``cone_parent: vision``; or the reverse with ``text``). Points come from the hyperbolic pool's own map: the
pre-scaled mean hidden state of the modality's tokens, exp-mapped at the origin with the pool's curvature.

# B rows, T positions, S sequences (rows, or a packed row's sequences), D model dim
"""

from __future__ import annotations

import torch

from asymoe_train.modality import IMAGE, TEXT
from asymoe_train.moe.evidence import TokenContext
from asymoe_train.moe.hyperbolic import lorentz_expmap0, no_host_reads

EPS = 1e-6


def half_aperture(x_space_ND: torch.Tensor, c: torch.Tensor, aperture: float) -> torch.Tensor:
    """Half-aperture of the cone at x: asin(2K / (sqrt(c) |x|)), clamped so points near the origin get a wide cone."""
    ratio = 2 * aperture / (c.sqrt() * x_space_ND.norm(dim=-1) + EPS)
    return torch.asin(ratio.clamp(-1 + EPS, 1 - EPS))


def exterior_angle(x_space_ND: torch.Tensor, y_space_ND: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Angle at x between the geodesic to y and the ray from the origin through x (MERU's oxy angle)."""
    x_time = torch.sqrt(1 / c + x_space_ND.square().sum(-1))
    y_time = torch.sqrt(1 / c + y_space_ND.square().sum(-1))
    c_xyl = c * ((x_space_ND * y_space_ND).sum(-1) - x_time * y_time)
    numer = y_time + c_xyl * x_time
    denom = x_space_ND.norm(dim=-1) * torch.sqrt((c_xyl.square() - 1).clamp_min(EPS)) + EPS
    return torch.acos((numer / denom).clamp(-1 + EPS, 1 - EPS))


def paper_half_aperture(v_space_ND: torch.Tensor, c: torch.Tensor, aperture: float) -> torch.Tensor:
    """The paper's psi(v) = asin(2K / (1 + K c|v|^2)) (module doc), clamped into asin's domain."""
    ratio = 2 * aperture / (1 + aperture * c * v_space_ND.square().sum(-1))
    return torch.asin(ratio.clamp(-1 + EPS, 1 - EPS))


def paper_angle(v_space_ND: torch.Tensor, t_space_ND: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The paper's xi(v, t) = acos(<v, t>_L / (|v| |t|)), |.| the space coordinates' norm (module doc)."""
    v_time = torch.sqrt(1 / c + v_space_ND.square().sum(-1))
    t_time = torch.sqrt(1 / c + t_space_ND.square().sum(-1))
    inner = (v_space_ND * t_space_ND).sum(-1) - v_time * t_time
    denom = v_space_ND.norm(dim=-1) * t_space_ND.norm(dim=-1) + EPS
    return torch.acos((inner / denom).clamp(-1 + EPS, 1 - EPS))


CONE_FORMS = {"meru": (exterior_angle, half_aperture), "paper": (paper_angle, paper_half_aperture)}


def entailment_loss(parent_ND: torch.Tensor, child_ND: torch.Tensor, c: torch.Tensor, aperture: float,
                    keep_N: torch.Tensor | None = None, form: str = "meru") -> torch.Tensor:
    """Mean of relu(angle(parent, child) - half_aperture(parent)) over the pairs (those ``keep_N`` marks, if given),
    in cone form ``form``; zero when every child is inside its parent's cone, or without pairs."""
    angle, half = CONE_FORMS[form]
    violation_N = torch.relu(angle(parent_ND, child_ND, c) - half(parent_ND, c, aperture))
    if keep_N is None:
        return violation_N.sum() / max(violation_N.shape[0], 1)
    return (violation_N * keep_N).sum() / keep_N.sum().clamp_min(1)


def pooled_points(x_TD: torch.Tensor, ctx: TokenContext, scale: torch.Tensor, c: torch.Tensor):
    """(image points, text points, which sequences have both) as Lorentz space coordinates ``[S, D]`` and a float
    mask ``[S]``, one per sequence (a row, or a packed row's sequences). Sequences without both get a fixed point
    instead (masked out of the loss; no host read selects them)."""
    segment_BT, num = ctx.sequences()
    seq_T = segment_BT.reshape(-1).clamp_min(0)
    x_TD = x_TD.float()
    points, present = [], []
    for code in (IMAGE, TEXT):
        mask_T = (ctx.modality_BT.reshape(-1) == code).float()
        sums_SD = x_TD.new_zeros(num, x_TD.shape[-1]).index_add_(0, seq_T, x_TD * mask_T.unsqueeze(-1))
        counts_S = x_TD.new_zeros(num).index_add_(0, seq_T, mask_T)
        points.append(sums_SD / counts_S.clamp_min(1).unsqueeze(-1))
        present.append(counts_S > 0)
    both_S1 = (present[0] & present[1]).unsqueeze(-1)
    with no_host_reads():
        image_SP, text_SP = (lorentz_expmap0(scale * torch.where(both_S1, p, 1.0), c)[:, 1:] for p in points)
    return image_SP, text_SP, both_S1[:, 0].float()


def order_loss(x_TD: torch.Tensor, ctx: TokenContext, scale: torch.Tensor, c: torch.Tensor, parent: str,
               aperture: float, form: str = "meru") -> torch.Tensor:
    """L_order of one MoE layer."""
    image, text, both = pooled_points(x_TD, ctx, scale, c)
    if parent == "vision":
        return entailment_loss(image, text, c, aperture, both, form)
    return entailment_loss(text, image, c, aperture, both, form)
