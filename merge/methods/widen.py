"""WIDEN — Yu et al. 2024, "Extend Model Merging from Fine-Tuned to Pre-Trained Large Language Models via Weight
Disentanglement", arXiv:2408.03092."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge.methods.common import MergeError


def widen(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    above_average_value_ratio: float = 1.0,
    score_calibration_value: float = 1.0,
    token_rows: bool = False,
) -> torch.Tensor:
    """Merge N models into the base by how much each moved each column, in magnitude and in direction, ranked
    within the model (so a pre-trained model's large shifts and a fine-tune's small ones compete on equal terms).

    A matrix W (out × in; a token embedding is taken transposed, `token_rows`, so its columns are the tokens) is
    disentangled column by column into magnitude m_j = ‖W[:, j]‖₂ and direction D[:, j] = W[:, j] / m_j; for each
    model n against the base:

        ΔM_n,j = |m_n,j − m_0,j|,    ΔD_n,j = 1 − cos(D_n[:, j], D_0[:, j])
        r_n,j  = rank of ΔM_n,j among the model's k columns / k  (ascending, ties in column order; so for ΔD)
        S_n,j  = s                      if r_n,j > t · mean_j r_n,j      (score calibration: important columns)
                 softmax_n(r_n,j)       otherwise                        (the models' share of the column)
        θ = θ_0 + Σ_n ½ (S^M_n,j + S^D_n,j) · τ_n[:, j],     τ_n = θ_n − θ_0

    t = `above_average_value_ratio`, s = `score_calibration_value`. A vector (norm weights, biases) has no
    direction: its entries are scored directly, S_n,i from |τ_n,i| (not ranked) by the same rule, and
    θ = θ_0 + Σ_n S_n ⊙ τ_n. A zero column has direction 0 (cosine 0 with anything). In float32 (float64 stays
    float64), returned in the base's dtype; as the authors' release computes it."""
    if not others:
        return base
    if base.dim() not in (1, 2):
        raise MergeError(f"widen merges vectors and matrices, not {base.dim()}-dimensional tensors")
    wide = torch.promote_types(base.dtype, torch.float32)
    theta0 = base.to(wide)
    tau = torch.stack([x.to(wide) - theta0 for x in others])
    if base.dim() == 1:
        scores = _importance(tau.abs(), above_average_value_ratio, score_calibration_value)
        return (theta0 + (scores * tau).sum(dim=0)).to(base.dtype)
    if token_rows:
        theta0, tau = theta0.T, tau.transpose(1, 2)
    magnitude0, direction0 = _disentangle(theta0)
    magnitude_change, direction_change = [], []
    for n in range(len(others)):
        magnitude, direction = _disentangle(theta0 + tau[n])
        magnitude_change.append((magnitude - magnitude0).abs())
        direction_change.append(1 - torch.cosine_similarity(direction, direction0, dim=0))
    scores = [
        _importance(_ranks(torch.stack(change)), above_average_value_ratio, score_calibration_value)
        for change in (magnitude_change, direction_change)
    ]
    weights = 0.5 * (scores[0] + scores[1])  # (N, columns)
    merged = theta0 + (tau * weights.unsqueeze(1)).sum(dim=0)
    return (merged.T if token_rows else merged).to(base.dtype)


def _disentangle(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(column norms, columns scaled to unit norm; a zero column stays zero)."""
    magnitude = torch.linalg.vector_norm(w, dim=0)
    return magnitude, w / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))


def _ranks(change: torch.Tensor) -> torch.Tensor:
    """Each row's entries replaced by their ascending rank / row length (a stable sort: ties in column order)."""
    k = change.shape[1]
    order = torch.argsort(change, dim=1, stable=True)
    ranks = torch.empty_like(change)
    ranks.scatter_(
        1, order, (torch.arange(k, dtype=change.dtype, device=change.device) / k).expand_as(change).contiguous()
    )
    return ranks


def _importance(significance: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    """softmax over the models, calibrated to `calibration` where a model's significance exceeds `ratio` times
    its mean."""
    scores = torch.softmax(significance, dim=0)
    above = significance > significance.mean(dim=1, keepdim=True) * ratio
    return scores.masked_fill(above, calibration)
