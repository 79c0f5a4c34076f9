"""SCE (select, calculate, erase) — Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models",
arXiv:2408.07990."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge.methods.common import column_blocks
from merge.methods.task_vectors import top_k_mask


def sce(base: torch.Tensor, others: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """Merge task vectors τ_i = θ_i − θ_base with weights from their own energy, after two masks:

        select:    keep the entries whose variance across the models, Var_i τ_i (population), is among the
                   k = ⌊select_topk · #{nonzero variances}⌋ largest (select_topk ≥ 1 keeps all; equal variances
                   at the threshold are kept in flat-index order); the others are zeroed in every τ_i
        calculate: η_i = mean(τ_i²) / Σ_j mean(τ_j²)          (1/N when the sum is below 1e-6)
        erase:     γ = sgn(Σ_i τ_i) (0 counts as +),  m_i = [sgn τ_i = γ]
        θ = θ_base + Σ_i η_i m_i τ_i / max(Σ_i η_i m_i, 1e-6)

    In the merge dtype, in mergekit 0.1.5's order of operations."""
    if not others:
        return base
    deltas = torch.stack([x - base for x in others])
    if select_topk < 1:
        deltas = deltas * _high_variance(deltas, select_topk)
    flat = deltas.view(len(others), -1)
    energy = deltas.square().reshape(len(others), -1).mean(dim=1)  # whole-tensor means, in mergekit's order
    total = torch.sum(energy).item()
    eta = (torch.ones_like(energy) / len(others) if abs(total) < 1e-6 else energy / total).view(-1, 1)
    from merge.methods import fused_bf16  # numba: imported when an SCE merge runs, not on every command

    if fused_bf16.applies(base, others) and len(others) <= fused_bf16.MAX_MODELS_IN_ORDER:
        return fused_bf16.sce_erase(base, deltas, eta)  # the erase below in one compiled pass, same bits
    flat_base = base.reshape(-1)

    def erase(block: slice) -> torch.Tensor:  # per entry: a block of columns of the stack at a time
        d = flat[:, block]
        weights = eta * (d.sign() == torch.where(d.sum(dim=0) >= 0, 1, -1).to(d.dtype))
        return flat_base[block] + (d * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)

    return column_blocks(erase, flat_base.numel()).view(base.shape)


def _high_variance(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's select mask: the ⌊fraction · #nonzero⌋ entries of largest variance across the models."""
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction) if fraction > 0 else 0
    if k == 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    # The ranking is done in float32 or float64 (exact for 16-bit values; kthvalue needs it).
    magnitude = variance.reshape(-1).to(torch.float64 if variance.dtype == torch.float64 else torch.float32)
    return top_k_mask(magnitude, k).reshape(variance.shape)
