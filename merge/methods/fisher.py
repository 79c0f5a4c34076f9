"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging",
arXiv:2111.09832)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge.methods.common import MergeError


def fisher_average(
    models: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float], epsilon: float
) -> torch.Tensor:
    """The paper's merge, per entry j, with each model's diagonal Fisher F_i floored at ε:

        θ*(j) = Σ_i λ_i F̃_i(j) θ_i(j) / Σ_i λ_i F̃_i(j),      F̃_i = max(F_i, ε)

    Equal Fishers give the λ-weighted average (`linear`); a model whose Fisher dominates an entry decides it.
    Computed in float32 (float64 stays float64), returned in the models' dtype."""
    if len(fishers) != len(models):
        raise MergeError(f"{len(models)} models but {len(fishers)} Fishers")
    dtype = models[0].dtype
    wide = torch.promote_types(dtype, torch.float32)
    numerator = torch.zeros(models[0].shape, dtype=wide, device=models[0].device)
    denominator = torch.zeros_like(numerator)
    for theta, fisher, weight in zip(models, fishers, weights):
        weighted = fisher.to(wide).clamp_min(epsilon) * weight
        numerator += weighted * theta.to(wide)
        denominator += weighted
    if not bool((denominator != 0).all()):
        raise MergeError("the weighted Fishers sum to zero at some entry (weights of opposite signs?)")
    return (numerator / denominator).to(dtype)
