"""PCB-Merging — Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging", arXiv:2410.02396
(the data-free version: no evolutionary search of the per-model coefficients)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pcb(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    ratio: float = 0.1,
    lambda_: float = 1.0,
    outliers: float = 1e-4,
) -> torch.Tensor:
    """Weight each entry of each task vector τ_i = θ_i − θ_base (i = 1..n, d entries) by how it competes
    within its own task and with the other tasks, keep the top `ratio` of each task's weights, and average:

        ã_i  = clamp(|τ_i|, q_i(outliers), q_i(1 − outliers)),  τ̃_i = sgn(τ_i) ã_i   (outlier clamp)
        β_intra,i = exp(n · Norm(ã_i)²)                  intra-balancing (self-awareness): a softmax up to its
                                                         normaliser, sharper the more tasks compete
        β_inter,i = tanh(τ_i ⊙ Σ_j τ_j)                  inter-balancing (cross-awareness): < 0 where τ_i
                                                         opposes the others
        β_i = β_intra,i ⊙ β_inter,i
        s_i = Norm(max(β_i, b_i)),   b_i = β_i's value of ascending rank ⌊(1 − ratio)·d⌋
                                                         drop: weights at or below b_i become 0, the best 1
        θ = θ_base + λ · Σ_i s_i ⊙ τ̃_i / max(Σ_i s_i, 1e−12)  rescale, and the paper's scale λ

    Norm(x) = (x − min x) / (max x − min x) over a task's d entries (0 where they are all equal); q_i(p) is
    ã_i's value of ascending rank ⌊p·d⌋, and q_i(1 − p) of rank ⌊(1 − p)·d⌋ − 1, as the authors' release
    ranks them. Per tensor (the authors flatten the whole model; mergekit applies TIES's trim per tensor
    too), in float32 (float64 stays float64), returned in the base's dtype."""
    if not others:
        return base
    wide = torch.promote_types(base.dtype, torch.float32)
    tau = torch.stack([(x - base).reshape(-1) for x in others]).to(wide)
    n, d = tau.shape
    clamped = tau.abs()
    low = _ranked(clamped, int(d * outliers))
    high = _ranked(clamped, max(int(d * (1 - outliers)) - 1, 0))
    clamped.clamp_(low, high)  # its min is `low` and its max `high`, entries of it: Norm needs no other pass
    # β = exp(n · Norm(ã)²) ⊙ tanh(τ ⊙ Σ_j τ_j), built in one buffer (these are the big tensors: n × d each)
    balance = torch.sub(clamped, low).div_(_span(low, high)).square_().mul_(n).exp_()
    balance.mul_(torch.tanh(tau.sum(dim=0) * tau))
    floor = _ranked(balance, min(int(d * (1 - ratio)), d - 1))
    span = _span(floor, balance.amax(dim=1, keepdim=True))
    kept = balance.clamp_(min=floor).sub_(floor).div_(span)  # Norm(max(β, b)): its min is b, its max β's
    tau.sign_().mul_(clamped)  # τ̃ = sgn(τ) ã
    merged = (kept * tau).sum(dim=0).div_(kept.sum(dim=0).clamp_(min=1e-12))
    return (base.to(wide) + lambda_ * merged.reshape(base.shape)).to(base.dtype)


def _ranked(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Each row's value of ascending rank `rank` (0-based), as a column."""
    return torch.kthvalue(x, rank + 1, dim=1, keepdim=True).values


def _span(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """high − low, with 1 where a row's values are all equal (Norm is 0 there, not 0/0)."""
    span = high - low
    return torch.where(span > 0, span, torch.ones_like(span))
