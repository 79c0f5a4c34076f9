"""RAM and RAM+ (tensor-local) — "Reinforced Agent Merging", arXiv:2601.13572 (mergekit 0.1.5's `ram`,
`ramplus_tl`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ram(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    epsilon: float = 1e-5,
    plus: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Merge task vectors τ_i = θ_i − θ_base by who changed each entry: an entry only one model changed takes
    that model's change whole; an entry several changed takes their mean, so shared updates are not
    double-counted and unique ones are not diluted:

        m_ij = [|τ_ij| > ε],  c_j = Σ_i m_ij                       (how many models changed entry j)
        θ_j = θ_base,j + Σ_i m_ij τ_ij · (λ_i [c_j = 1] + [c_j > 1] / c_j)

    RAM has λ_i = 1. RAM+ (`plus` = (r, α)) boosts a model's unique changes by how much it otherwise shares:
        ρ_i = #{j: m_ij, c_j > 1} / max(#{j: m_ij, c_j = 1}, ε),   λ_i = 1 + r · clamp(ρ_i, 0, α)
    counted within the tensor ("tensor-local"). In mergekit 0.1.5's order of operations (RAM+'s λ makes the
    sum float32)."""
    if not others:
        return base
    deltas = torch.stack([x - base for x in others]).view(len(others), -1)
    changed = deltas.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    shared, unique = count > 1, count == 1
    kept = deltas * changed
    unique_part = kept * unique
    if plus is not None:
        r, alpha = plus
        rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
        unique_part = unique_part * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (unique_part + kept * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
