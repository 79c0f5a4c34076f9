"""RAM and RAM+ (tensor-local) — "Reinforced Agent Merging", arXiv:2601.13572 (mergekit 0.1.5's `ram`,
`ramplus_tl`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge.methods.common import BLOCK, blockwise


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
    sum float32), a block of entries at a time."""
    if not others:
        return base

    def changes(base: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        deltas = torch.stack([x - base for x in others])
        changed = deltas.abs() > epsilon
        return deltas, changed, changed.sum(dim=0, keepdim=True)

    boost = None
    if plus is not None:  # ρ_i counts over the whole tensor first (exact integers, so the blocks' order is free)
        r, alpha = plus
        shared_count = torch.zeros(len(others), dtype=torch.int64, device=base.device)
        unique_count = torch.zeros_like(shared_count)
        flat = [x.reshape(-1) for x in (base, *others)]
        for start in range(0, base.numel(), BLOCK):
            _, changed, count = changes(*(x[start : start + BLOCK] for x in flat))
            shared_count += (changed & (count > 1)).sum(dim=1)
            unique_count += (changed & (count == 1)).sum(dim=1)
        rho = shared_count / unique_count.clamp(min=epsilon)
        boost = (1 + r * rho.clamp(min=0, max=alpha)).view(-1, 1, 1)  # per model, over (entries, 1) blocks

    def merge(base: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        deltas, changed, count = changes(base, *others)
        shared, unique = count > 1, count == 1
        kept = deltas * changed
        unique_part = kept * unique if boost is None else kept * unique * boost
        return base + (unique_part + kept * shared / count.clamp(min=1)).sum(dim=0)

    return blockwise(merge, base, *others)
