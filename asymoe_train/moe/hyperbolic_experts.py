"""Hyperbolic inter-modality experts: SwiGLU FFNs whose layers act on a hyperbolic manifold (DESIGN §2).

One expert, for a token x of the Euclidean residual stream, with s its learnable pre-scale and c the pool's curvature:

    p = exp0(s·x)                                   point on the manifold (Lorentz by default, or the Poincaré ball)
    g = log0(HypLinear_gate(p)) / s                 hidden pre-activations, read back in the tangent space at the
    u = log0(HypLinear_up(p)) / s                   origin and unscaled
    h = act(g) · u                                  the SwiGLU nonlinearity, where it is well defined: on tangent
                                                    vectors at the origin, i.e. ordinary vectors
    y = log0(HypLinear_down(exp0(s·h))) / s         back onto the manifold, down-projected, read back, unscaled

HypLinear is a Lorentz-linear layer (the full point, time coordinate included, times a weight matrix plus a bias,
time recomputed) or a Möbius matvec followed by a Möbius bias addition. Biases and the Lorentz time columns are stored
in the units of the Euclidean FFN and multiplied by s before they enter the manifold, so that as s → 0 every layer
reads back as W·x + b (the time column adds w_t/sqrt(c)) and the expert tends to the Euclidean SwiGLU FFN exactly;
it also keeps their effective learning rate from growing like 1/s. Upcycling copies the dense FFN's weights and zeroes
biases and time columns; the error against the dense MLP is then O(c·s²·|·|²) (the exp/log maps' cubic terms).

Default scale. s = init_scale / sqrt(D), so ``init_scale`` is the tangent norm given to a token of unit RMS (a
post-RMSNorm hidden state). At the default 0.04, a freshly upcycled Lorentz expert matches the dense MLP on unit-RMS
tokens to a relative error |y - y_mlp| / |y_mlp| (over 256 tokens, worst of 3 seeds, c = 1) of 3.6e-4 for
D=32/F=48 with transformers' LlamaMLP init, 6.2e-4 with std-0.02 weights, and 5e-5 to 7e-5 for D=1024/F=2816 (the
Poincaré expert matches to fp32 rounding, ~5e-7, see below). The error grows like c·(init_scale · RMS)²: ×10 at
c = 10, ×9 to ×16 for tokens of RMS 3. Curvature is felt at the same order, which is the price of upcycling: at the
default scale, c from 1 to 10 changes the output by 3e-3 (D=32) and 6e-4 (D=1024) relative; at init_scale 0.3 by
0.16 and 0.03, at 1.0 by 0.8 and 0.2. s and c are learnable, so training can move the experts into the curved regime;
with Adam each moves by about the learning rate per step, so give ``log_scale_E`` and ``curvature.log_c`` a larger
learning rate if that should happen within one fine-tuning run.

Poincaré note. log0(M ⊗ exp0(v)) = M v exactly, so with zero biases the Poincaré expert equals the Euclidean FFN for
every scale and curvature; curvature acts through the Möbius bias additions, whose gradient at zero is not zero, so it
appears once the biases train. The Lorentz expert depends on c from the start (x_0 = cosh(θ)/sqrt(c), the asinh read
back), hence the default.

Grouped path (``model.moe.expert_compute``, default on CUDA). All experts of the pool in one pass over the
expert-sorted rows: each matmul is one grouped GEMM in the training precision (bf16 operands, fp32 accumulation on
tensor cores), while the maps, norms, clamps, biases and time columns stay fp32, with the per-expert pre-scales,
biases and time columns gathered per row. On CUDA the element-wise chains between the matmuls are compiled
(``torch.compile``, dynamic shapes), so each runs as a few fused kernels. ``_expert`` (fp32 throughout, one expert at
a time) is the reference the tests pin it against.

# N tokens in a slice, D model dim, F expert hidden dim, E experts in the pool, P = 1 + D, Q = 1 + F Lorentz coords
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from transformers.activations import ACT2FN

from asymoe_train.config.names import HYPERBOLIC_GEOMETRIES
from asymoe_train.moe.experts import WHOLE, Shard, copy_mlp
from asymoe_train.moe.grouped import (
    as_counts,
    grouped_applies,
    grouped_linear,
    per_expert,
    row_experts,
)
from asymoe_train.moe.hyperbolic import (
    Curvature,
    lorentz_expmap0_parts,
    lorentz_logmap0_space,
    mobius_add,
    no_host_reads,
    poincare_expmap0,
    poincare_linear,
    poincare_logmap0,
    poincare_project,
)

# Parameter names of each layer: (space weight, bias, Lorentz time column).
LAYERS = {
    "gate": ("gate_EFD", "gate_bias_EF", "gate_time_EF"),
    "up": ("up_EFD", "up_bias_EF", "up_time_EF"),
    "down": ("down_EDF", "down_bias_ED", "down_time_ED"),
}
# Tangent norm of a unit-RMS token at init (pre-scale = DEFAULT_INIT_SCALE / sqrt(hidden_size)); see the module doc.
DEFAULT_INIT_SCALE = 0.04


class HyperbolicExperts(nn.Module):
    """E hyperbolic SwiGLU experts sharing one learnable curvature; space weights stacked ``[E, out, in]`` as in
    ``SwiGLUExperts`` (same names, so upcycling and inspection read the same), plus biases, Lorentz time columns and
    a per-expert log pre-scale.

    Args:
        geometry: ``"lorentz"`` (hyperboloid, default) or ``"poincare"`` (ball).
        init_scale: tangent norm of a unit-RMS token at init; the pre-scale is ``init_scale / sqrt(hidden_size)``.
        curvature_init, curvature_min, curvature_max: the pool's curvature c (manifold curvature -c), learnable as
            log c and clamped to [curvature_min, curvature_max].
        learn_curvature: false keeps c at ``curvature_init`` (a buffer, not a parameter).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act: str = "silu",
        *,
        geometry: str = "lorentz",
        init_scale: float = DEFAULT_INIT_SCALE,
        curvature_init: float = 1.0,
        curvature_min: float = 0.1,
        curvature_max: float = 10.0,
        learn_curvature: bool = True,
        shard: Shard = WHOLE,
    ):
        super().__init__()
        if geometry not in HYPERBOLIC_GEOMETRIES:
            raise ValueError(f"unknown geometry '{geometry}'; expected one of {list(HYPERBOLIC_GEOMETRIES)}")
        if not init_scale > 0:
            raise ValueError(f"init_scale={init_scale} must be > 0 (it is the tangent norm of a unit-RMS token)")
        self.num_global_experts = num_experts
        self.first_expert, num_experts = shard.local(num_experts)
        self.num_experts = num_experts
        self.geometry = geometry
        self.init_scale = init_scale
        self.act_name = act
        self.act = ACT2FN[act]
        self.compute = "auto"  # model.moe.expert_compute: the grouped path (module doc) or the per-expert loop
        self.curvature = Curvature(curvature_init, curvature_min, curvature_max, learn_curvature)
        self.log_scale_E = nn.Parameter(torch.full((self.num_global_experts,),
                                                   math.log(init_scale / math.sqrt(hidden_size))))
        self.gate_EFD = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_EFD = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        for weight in (self.gate_EFD, self.up_EFD, self.down_EDF):
            nn.init.normal_(weight, std=0.02)
        # Biases (tangent vectors of the bias points on the ball) and the Lorentz time columns, in Euclidean-FFN
        # units: they enter the layers multiplied by the pre-scale (module doc).
        self.gate_bias_EF = nn.Parameter(torch.zeros(num_experts, intermediate_size))
        self.up_bias_EF = nn.Parameter(torch.zeros(num_experts, intermediate_size))
        self.down_bias_ED = nn.Parameter(torch.zeros(num_experts, hidden_size))
        lorentz = geometry == "lorentz"
        self.gate_time_EF = nn.Parameter(torch.zeros(num_experts, intermediate_size)) if lorentz else None
        self.up_time_EF = nn.Parameter(torch.zeros(num_experts, intermediate_size)) if lorentz else None
        self.down_time_ED = nn.Parameter(torch.zeros(num_experts, hidden_size)) if lorentz else None

    def _poincare_layer(self, name: str, e: int, point: torch.Tensor, scale: torch.Tensor,
                        c: torch.Tensor) -> torch.Tensor:
        """Poincaré layer ``name`` of expert ``e`` on a point, read back as a tangent vector at the origin and
        unscaled."""
        weight, bias, _ = (getattr(self, attr) for attr in LAYERS[name])
        return poincare_logmap0(poincare_linear(point, weight[e], c, bias[e] * scale), c) / scale

    def _lorentz_expert(self, e: int, x_ND: torch.Tensor, scale: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The Lorentz expert of ``_expert`` in fewer passes over the hidden activations, same maths:

        * gate and up read the same point, so they run as one matmul over the concatenated weights, whose time
          column is one more input column (the point's time coordinate) rather than a pass over the outputs;
        * log0 reads a point's space part only, so the time coordinates that ``lorentz_linear`` would recompute are
          never formed (``lorentz_project`` then ``lorentz_logmap0`` is ``lorentz_logmap0_space`` of the space part);
        * the pre-scale and the unscaling join the maps' per-row factors instead of multiplying whole tensors."""
        num_hidden, dtype = self.gate_EFD.shape[1], x_ND.dtype

        def cat(*params: nn.Parameter) -> torch.Tensor:  # expert e's rows, gate then up, in the compute dtype
            return torch.cat([p[e] for p in params]).to(dtype)

        point_NP = torch.cat(lorentz_expmap0_parts(x_ND, c, scale), dim=-1)  # time, then space
        weight_GP = torch.cat([cat(self.gate_time_EF, self.up_time_EF).unsqueeze(-1) * scale,
                               cat(self.gate_EFD, self.up_EFD)], dim=-1)
        # G = 2F: the gate layer's outputs, then the up layer's
        space_NG = nn.functional.linear(point_NP, weight_GP, cat(self.gate_bias_EF, self.up_bias_EF) * scale)
        # log0 per layer: the norms are over each layer's own F coordinates
        tangent_N2F = lorentz_logmap0_space(space_NG.unflatten(-1, (2, num_hidden)), c, scale)
        h_NF = self.act(tangent_N2F[:, 0]) * tangent_N2F[:, 1]
        time_N1, space_NF = lorentz_expmap0_parts(h_NF, c, scale)
        # the down layer's time column as an addcmul over its D outputs: cheaper than joining a column to its F inputs
        space_ND = torch.addcmul(nn.functional.linear(space_NF, cat(self.down_EDF), cat(self.down_bias_ED) * scale),
                                 time_N1, cat(self.down_time_ED) * scale)
        return lorentz_logmap0_space(space_ND, c, scale)

    def _expert(self, e: int, x_ND: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x_ND.dtype, torch.float32)
        # fp32 throughout (see hyperbolic.py); autocast would put the matvecs back in bf16.
        with torch.autocast(x_ND.device.type, enabled=False):
            scale = self.log_scale_E[self.first_expert + e].to(dtype).exp()
            if self.geometry == "lorentz":
                return self._lorentz_expert(e, x_ND.to(dtype), scale, c.to(dtype))
            p_ND = poincare_expmap0(x_ND.to(dtype) * scale, c)
            h_NF = self.act(self._poincare_layer("gate", e, p_ND, scale, c)) * self._poincare_layer("up", e, p_ND,
                                                                                                 scale, c)
            return self._poincare_layer("down", e, poincare_expmap0(h_NF * scale, c), scale, c)

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to its tokens; returns ``x_ND``'s dtype."""
        return self._expert(e, x_ND, self.curvature()).to(x_ND.dtype)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor | list[int]) -> torch.Tensor:
        """Tokens sorted by expert, ``counts_E[e]`` of them for expert e; returns outputs in the same order (rows
        after the last slice give unspecified outputs)."""
        c = self.curvature()
        if not grouped_applies(x_ND, self.gate_EFD, self.compute):
            return per_expert(lambda e, x: self._expert(e, x, c), counts_E, x_ND).to(x_ND.dtype)
        counts_E = as_counts(counts_E, x_ND.device)
        expert_N, valid_N1 = row_experts(counts_E, x_ND.shape[0])
        held = slice(self.first_expert, self.first_expert + self.num_experts)
        with no_host_reads(), torch.autocast(x_ND.device.type, enabled=False):
            scale_N1 = self.log_scale_E[held].float().exp()[expert_N].unsqueeze(-1)
            if self.geometry == "lorentz":
                return self._lorentz_rows(x_ND, counts_E, expert_N, valid_N1, scale_N1, c)
            return self._poincare_rows(x_ND, counts_E, expert_N, valid_N1, scale_N1, c)

    def _gathered(self, expert_N: torch.Tensor, *names: str) -> list[torch.Tensor]:
        """Per-row fp32 copies of per-expert vectors (biases, time columns)."""
        return [getattr(self, name).float()[expert_N] for name in names]

    def _lorentz_rows(self, x_ND, counts_E, expert_N, valid_N1, scale_N1, c) -> torch.Tensor:
        """The grouped Lorentz experts: three grouped GEMMs in ``x_ND``'s dtype, fp32 element-wise chains between
        them (fused on CUDA)."""
        dtype = x_ND.dtype
        time_N1, space_ND = _fused(_lorentz_in, x_ND)(x_ND, c, scale_N1)
        gate_NF = grouped_linear(space_ND.to(dtype), self.gate_EFD, counts_E, self.compute, valid_N1=valid_N1)
        up_NF = grouped_linear(space_ND.to(dtype), self.up_EFD, counts_E, self.compute, valid_N1=valid_N1)
        time_N1, space_NF = _fused(_lorentz_hidden, x_ND)(
            gate_NF, up_NF, time_N1, *self._gathered(expert_N, "gate_bias_EF", "gate_time_EF", "up_bias_EF",
                                                     "up_time_EF"), c, scale_N1, self.act)
        down_ND = grouped_linear(space_NF.to(dtype), self.down_EDF, counts_E, self.compute, valid_N1=valid_N1)
        return _fused(_lorentz_out, x_ND)(down_ND, time_N1, *self._gathered(expert_N, "down_bias_ED", "down_time_ED"),
                                          c, scale_N1).to(dtype)

    def _poincare_rows(self, x_ND, counts_E, expert_N, valid_N1, scale_N1, c) -> torch.Tensor:
        """The grouped Poincaré experts: each layer's matvec M log0(p) as a grouped GEMM in ``x_ND``'s dtype, the
        maps and Möbius bias additions in fp32."""
        dtype = x_ND.dtype

        def layer(name: str, point_NX: torch.Tensor) -> torch.Tensor:
            weight, bias, _ = (getattr(self, attr) for attr in LAYERS[name])
            lin = grouped_linear(poincare_logmap0(point_NX, c).to(dtype), weight, counts_E, self.compute,
                                 valid_N1=valid_N1)
            bias_point = poincare_expmap0(bias.float()[expert_N] * scale_N1, c)
            y = poincare_project(mobius_add(poincare_expmap0(lin.float(), c), bias_point, c), c)
            return poincare_logmap0(y, c) / scale_N1

        p_ND = poincare_expmap0(x_ND.float() * scale_N1, c)
        h_NF = self.act(layer("gate", p_ND)) * layer("up", p_ND)
        return layer("down", poincare_expmap0(h_NF * scale_N1, c)).to(dtype)

    @torch.no_grad()
    def upcycle_from(self, mlp: nn.Module, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Copy a dense SwiGLU MLP (separate or fused gate/up) into every expert's space weights (sparse
        upcycling), zero the biases and time columns, and reset the pre-scale to ``init_scale``."""
        copy_mlp(self.gate_EFD, self.up_EFD, self.down_EDF, mlp, noise_std, generator, self.first_expert,
                 self.num_global_experts)
        for name, param in self.named_parameters():
            if "_bias_" in name or "_time_" in name:
                param.zero_()
        self.log_scale_E.fill_(math.log(self.init_scale / math.sqrt(self.gate_EFD.shape[-1])))

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters split over expert-parallel ranks (dim 0 = the experts held here)."""
        return ((n, p) for n, p in self.named_parameters() if n not in ("log_scale_E", "curvature.log_c"))

    def params_per_expert(self) -> int:
        """Parameters of one expert (the pool's shared curvature not included)."""
        return sum(p.numel() for _, p in self.expert_parameters()) // self.num_experts + 1  # + its pre-scale

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, geometry={self.geometry}, init_scale={self.init_scale}"


# ------------------------------------------------------------------ the grouped Lorentz path's element-wise chains
# Each is fp32 and row-wise, between two grouped GEMMs; on CUDA each is compiled into a few fused kernels.


def _lorentz_in(x_ND: torch.Tensor, c: torch.Tensor, scale_N1: torch.Tensor):
    """exp0(s·x) as (time, space) in fp32."""
    return lorentz_expmap0_parts(x_ND.float(), c, scale_N1)


def _lorentz_hidden(gate_NF, up_NF, time_N1, gate_bias_NF, gate_time_NF, up_bias_NF, up_time_NF, c, scale_N1, act):
    """Biases and time columns of the gate and up layers, their log0 read-outs, the SwiGLU product, and exp0 of it:
    (time, space) of the down layer's input point."""
    gate_NF = gate_NF.float() + (gate_bias_NF + time_N1 * gate_time_NF) * scale_N1
    up_NF = up_NF.float() + (up_bias_NF + time_N1 * up_time_NF) * scale_N1
    h_NF = act(lorentz_logmap0_space(gate_NF, c, scale_N1)) * lorentz_logmap0_space(up_NF, c, scale_N1)
    return lorentz_expmap0_parts(h_NF, c, scale_N1)


def _lorentz_out(down_ND, time_N1, down_bias_ND, down_time_ND, c, scale_N1):
    """The down layer's bias and time column, and the log0 read-out of its output, unscaled."""
    space_ND = down_ND.float() + (down_bias_ND + time_N1 * down_time_ND) * scale_N1
    return lorentz_logmap0_space(space_ND, c, scale_N1)


_COMPILED: dict = {}


def _fused(fn, like: torch.Tensor):
    """``fn`` compiled (dynamic shapes) on CUDA, where its element-wise chain fuses into few kernels; eager
    elsewhere (on CPU the per-op kernels are as fast, and compiling costs seconds per shape family). Where
    compiling fails (no Triton or C++ compiler), it warns once and stays eager: same numbers, more kernels."""
    if like.device.type != "cuda":
        return fn
    if fn not in _COMPILED:
        compiled = torch.compile(fn, dynamic=True)

        def run(*args):
            if _COMPILED[fn] is fn:
                return fn(*args)
            try:
                return compiled(*args)
            except Exception as exn:  # inductor/Triton build errors surface at the first call
                warnings.warn(f"hyperbolic experts: torch.compile of {fn.__name__} failed ({type(exn).__name__}: "
                              f"{str(exn).splitlines()[0][:200]}); running it eagerly", stacklevel=2)
                _COMPILED[fn] = fn
                return fn(*args)

        _COMPILED[fn] = run
    return _COMPILED[fn]
