"""Spherical linear interpolation — Shoemake 1985, "Animating rotation with quaternion curves"."""

from __future__ import annotations

import torch

from merge.methods.common import BLOCK, accumulation_dtype


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Interpolate between two whole tensors along the great circle through their directions.

        u0 = v0/‖v0‖,  u1 = v1/‖v1‖,  Ω = arccos⟨u0, u1⟩
        slerp(t) = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1

    The tensors are flattened (one angle per tensor). When |cos Ω| > dot_threshold the directions are
    (anti)colinear and sin Ω ≈ 0, so it falls back to lerp: (1−t)·v0 + t·v1. t=0 returns v0 exactly and
    t=1 returns v1 exactly. Computed in float32 blocks; returned in v0's dtype.
    """
    if v0.numel() == 0:
        return v0.clone()
    work = accumulation_dtype(v0.dtype)
    a, b = v0.reshape(-1), v1.reshape(-1)
    starts = range(0, a.numel(), BLOCK)

    def block(x: torch.Tensor, start: int) -> torch.Tensor:
        return x[start : start + BLOCK].to(work)

    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(block(a, s)) for s in starts]))
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(block(b, s)) for s in starts]))
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([(block(a, s) / norm_a * (block(b, s) / norm_b)).sum() for s in starts]).sum().clamp(-1, 1)

    t_ = torch.tensor(t, dtype=work, device=v0.device)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = 1 - t_, t_
    else:
        omega = torch.acos(dot)
        sin_omega = torch.sin(omega)
        coef_a, coef_b = torch.sin((1 - t_) * omega) / sin_omega, torch.sin(t_ * omega) / sin_omega

    out = torch.empty_like(a)
    for s in starts:
        out[s : s + BLOCK] = coef_a * block(a, s) + coef_b * block(b, s)
    return out.reshape(v0.shape)
