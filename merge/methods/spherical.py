"""Interpolation on the hypersphere beyond two whole tensors: NuSLERP (per-row or flattened SLERP, optionally about
a base), Multi-SLERP (one tangent-space step for N points) and the Karcher mean (its iterated fixed point).

These compute in the merge dtype, step for step as mergekit 0.1.5 does, so outputs agree with it to the bit; set
the recipe's `dtype: float32` for more precision with half-precision models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from merge.methods.common import MergeError, blockwise, column_blocks
from merge.methods.stacked_dots import dots_with

if TYPE_CHECKING:
    from merge.methods.fused_bf16 import KarcherSteps, MultislerpSteps

FUSED_FROM = 1 << 16  # entries: smaller tensors keep torch's steps (the fused ones start threads)


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    flatten: bool = True,
    columns: bool = False,
    eps: float = 1e-8,
    origin: torch.Tensor | None = None,
) -> torch.Tensor:
    """SLERP applied to vectors of a tensor — the whole tensor flattened (`flatten`, the default), or each row
    v[i, :] of a matrix, or each column v[:, j] (`columns`) — one angle per vector:

        u = v / max(‖v‖, 1e-7),   cos Ω = clamp(⟨u0, u1⟩, −1, 1)
        nuslerp(t) = (sin((1−t)Ω) · v0 + sin(tΩ) · v1) / sin Ω
                     (1−t) · v0 + t · v1        where 1 − cos²Ω ≤ eps² (colinear: sin Ω ≈ 0)

    Arcee's "NuSLERP" (mergekit 0.1.5); with `flatten` it is Shoemake's SLERP of the two tensors. With `origin`
    (a base model) it interpolates about it: origin + nuslerp(t, v0 − origin, v1 − origin)."""
    if origin is not None and (flatten or columns):
        return origin + nuslerp(t, v0 - origin, v1 - origin, flatten=flatten, columns=columns, eps=eps)
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif columns:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    def interpolate(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
        colinear = (1 - cos.square()) <= eps**2
        omega = torch.acos(torch.where(colinear, 0, cos))  # a finite angle on the branch that is discarded
        out = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
        return torch.where(colinear, (1 - t) * v0 + t * v1, out) if colinear.any() else out

    if flatten or columns:
        out = interpolate(v0, v1)
        return (out.transpose(0, -1) if columns and not flatten else out).reshape(shape)
    row = shape[-1] if v0.dim() else 1  # rows are independent: a block of rows at a time
    if origin is None:
        return blockwise(interpolate, v0, v1, row=row)
    return blockwise(lambda v0, v1, o: o + interpolate(v0 - o, v1 - o), v0, v1, origin, row=row)


def nuslerp_t(weights: Sequence[float]) -> float:
    """NuSLERP's t from the two models' weights: w1 / (w0 + w1), and 0.5 when they sum to (about) zero."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation of N tensors on the hypersphere (Goddard 2025, "Multi-SLERP"), about `base`
    when given (v_i = θ_i − θ_base, then θ_base is added back), else about the origin (v_i = θ_i):

        u_i = v_i / (‖v_i‖ + eps),  w_i ← w_i / Σ w (normalize_weights)
        μ = Σ w_i u_i / ‖Σ w_i u_i‖                      (the weighted mean direction)
        τ = Σ w_i (u_i − ⟨u_i, μ⟩ μ)                      (the weighted mean in μ's tangent space)
        v = (cos ‖τ‖ · μ + sin ‖τ‖ · τ / ‖τ‖) · Σ w_i ‖v_i‖  (the exponential map back, at the mean norm)

    One tangent-space step: for two inputs it is close to, not equal to, SLERP. When Σ w_i u_i vanishes the
    mean direction is undefined: two inputs fall back to w_0 v_0 + w_1 v_1; more raise MergeError."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors))
    if base is not None:
        stacked -= base
    flat = stacked.view(len(tensors), -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    steps = _multislerp_steps(flat)
    units = steps.units(flat, norms + eps)
    mean = steps.weighted_sum(units, w)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MergeError(
                "the weighted mean of the models' directions is zero (opposed models whose weights cancel), "
                "so multislerp has no direction to follow; change the weights"
            )
        out = (flat[0] * w[0] + flat[1] * w[1]).view(stacked.shape[1:])
    else:
        mean, products = steps.normalized_products(mean, mean_norm, units)
        dots = products.sum(-1, keepdim=True)
        tangent = steps.tangent(units, dots, mean, w)
        length = torch.norm(tangent) + eps
        cos, sin, scale = torch.cos(length), torch.sin(length) / length, (norms.squeeze(-1) * w).sum()
        out = steps.interpolate(mean, tangent, cos, sin, scale).view(stacked.shape[1:])
    return out + base if base is not None else out


class _MultislerpTorchSteps:
    """Multi-SLERP's column-wise steps as torch ops, mergekit's arithmetic: whole-tensor reductions (the norms, the
    dot products' sums) in mergekit's order, per-column steps a block of columns at a time; `fused_bf16.
    MultislerpSteps` gives their bits in one pass each for bfloat16 on the CPU."""

    def units(self, flat: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
        return flat / divisors

    def weighted_sum(self, units: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        column = weights.view(-1, 1)
        return column_blocks(lambda b: (units[:, b] * column).sum(0), units.shape[1])

    def normalized_products(
        self, mean: torch.Tensor, norm: torch.Tensor, units: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean = mean / norm
        return mean, units * mean

    def tangent(
        self, units: torch.Tensor, dots: torch.Tensor, mean: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        column = weights.view(-1, 1)
        return column_blocks(lambda b: ((units[:, b] - dots * mean[b]) * column).sum(0), units.shape[1])

    def interpolate(
        self, mean: torch.Tensor, tangent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        return column_blocks(lambda b: (mean[b] * cos + tangent[b] * sin) * scale, mean.shape[0])


def _multislerp_steps(flat: torch.Tensor) -> _MultislerpTorchSteps | MultislerpSteps:
    if flat.shape[1] >= FUSED_FROM:
        from merge.methods import fused_bf16  # numba: imported when a large merge needs it

        if fused_bf16.applies(flat, []) and flat.shape[0] <= fused_bf16.MAX_MODELS_IN_ORDER:
            return fused_bf16.MultislerpSteps()
    return _MultislerpTorchSteps()


def karcher_mean(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher (Riemannian, Fréchet) mean of N tensors' directions on the unit hypersphere, at their mean
    norm, equal weights α_i = 1/N (Karcher 1977; mergekit's "karcher", arXiv:2603.04972):

        u_i = θ_i / ‖θ_i‖ (inputs with ‖θ_i‖ ≤ tol are left out, the α of the rest renormalised)
        μ_0 = Σ α_i u_i / ‖Σ α_i u_i‖   (u_1 if that is shorter than tol)
        repeat up to max_iter times, until ‖g‖ < tol:
            g = Σ α_i · Ω_i / sin Ω_i · (u_i − cos Ω_i · μ),  cos Ω_i = clamp(⟨μ, u_i⟩, −1, 1)  (Ω_i < tol skipped)
            μ ← cos ‖g‖ · μ + sin ‖g‖ · g / ‖g‖, renormalised
        θ = (Σ_i α_i ‖θ_i‖) · μ

    g is the gradient of ½ Σ α_i d(μ, u_i)² (the log map), so the loop is a Riemannian gradient descent with step
    1. Norms are taken in float32 (float64 inputs: float64); the directions are kept in the merge dtype."""
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1 / len(tensors)] * len(tensors)
    work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    steps = _karcher_steps(tensors, work)
    norms = [steps.norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0 else steps.divide(x, n) for x, n in zip(tensors, norms)]
    kept = [i for i, n in enumerate(norms) if n.item() > tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in kept)
    weights = [alphas[i] / total for i in kept]
    points = [units[i] for i in kept]

    mean, mean_work = steps.weighted_sum(points, weights)
    length = torch.linalg.vector_norm(mean_work)
    mean = points[0].clone() if length.item() < tol else steps.divide(mean, length)
    dots = dots_with(points)  # torch.dot's bits, in one call where that gives them (merge/methods/stacked_dots.py)
    for _ in range(max_iter):
        terms = []  # (cos Ω_i, α_i Ω_i / sin Ω_i, u_i) for the points not at μ
        for a, u, dot in zip(weights, points, dots(mean)):
            cos = torch.clamp(dot, -1.0, 1.0)
            omega = torch.arccos(cos)
            if omega.item() < tol:
                continue
            terms.append((cos, a * (omega / torch.sin(omega)), u))
        if not terms and tol > 0:  # every point at μ: g = 0, and ‖g‖ = 0 < tol ends the loop below anyway
            break
        gradient, gradient_work = steps.gradient_of(mean, terms)
        step = torch.linalg.vector_norm(gradient_work)
        if step.item() < tol:
            break
        mean, mean_work = steps.step(mean, gradient, step)
        length = torch.linalg.vector_norm(mean_work)
        if length.item() > tol:
            mean = steps.divide(mean, length)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


class _TorchSteps:
    """The elementwise steps of the Karcher mean as torch ops, as mergekit writes them (any dtype or device);
    `fused_bf16.KarcherSteps` gives their bits in one pass each for bfloat16 on the CPU. Sums come with their copy
    in the norms' dtype."""

    def __init__(self, work: torch.dtype) -> None:
        self.work = work

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x.to(self.work))

    def weighted_sum(
        self, points: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros_like(points[0])
        for w, u in zip(weights, points):
            total += w * u
        return total, total.to(self.work)

    def gradient_of(
        self, mean: torch.Tensor, terms: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gradient = torch.zeros_like(mean)
        for cos, coef, u in terms:
            gradient += coef * (u - cos * mean)
        return gradient, gradient.to(self.work)

    def step(self, mean: torch.Tensor, gradient: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (torch.cos(step) * mean + torch.sin(step) * (gradient / step)).to(mean.dtype)
        return mean, mean.to(self.work)

    def divide(self, x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        return (x / divisor).to(x.dtype)


def _karcher_steps(tensors: Sequence[torch.Tensor], work: torch.dtype) -> _TorchSteps | KarcherSteps:
    first, *rest = tensors
    if first.numel() >= FUSED_FROM:
        from merge.methods import fused_bf16  # numba: imported when a large merge needs it

        if fused_bf16.applies(first, rest):
            return fused_bf16.KarcherSteps(first)
    return _TorchSteps(work)
