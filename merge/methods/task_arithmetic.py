"""Task-vector methods: task arithmetic, TIES and DARE, as one pipeline on deltas from a base model.

    τ_i = θ_i − θ_base                                   task vector of model i
    τ̂_i = prune(τ_i)                                     TIES: keep top-k magnitudes; DARE: random drop
    θ  = θ_base + λ · combine(w_1 τ̂_1, ..., w_n τ̂_n)     sum, or TIES's sign-elected disjoint mean

Arithmetic runs in the merge dtype (the recipe's `dtype`), as in mergekit, so outputs agree with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Prune = Callable[[torch.Tensor, int], torch.Tensor]  # (delta, index of the model) -> pruned delta


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES "trim": keep the k = max(1, ⌊density·n⌋) entries of largest |τ|, zero the rest.

    Entries of equal magnitude at the threshold are kept in flat-index order, so the result is
    deterministic on every device (mergekit sorts with an unstable argsort and keeps an arbitrary subset
    of them: the same count, possibly other positions).
    """
    n = delta.numel()
    k = max(1, int(density * n))
    if density >= 1 or k >= n:
        return delta
    keep = _top_k_magnitude_mask(delta.reshape(-1), k)
    return delta * keep.reshape(delta.shape)


def _top_k_magnitude_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |flat|, ties broken towards lower indices. O(n): no sort."""
    magnitude = flat.abs()
    if magnitude.element_size() == 2:
        # Non-negative 16-bit floats order like their bit patterns: a 32768-bin histogram finds the
        # threshold in one pass (about 20x faster than a sort).
        bits = magnitude.view(torch.int16).to(torch.int32)
        counts = torch.bincount(bits, minlength=1 << 15)
        at_least = counts.flip(0).cumsum(0).flip(0)  # at_least[b] = #entries with bits >= b
        threshold = int((at_least >= k).nonzero().max())
        above = bits > threshold
        tied = bits == threshold
    else:
        values = magnitude.to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
        threshold_value = torch.kthvalue(values, values.numel() - k + 1).values
        above = values > threshold_value
        tied = values == threshold_value
    missing = k - int(above.sum())
    if missing > 0:
        above[tied.nonzero().reshape(-1)[:missing]] = True
    return above


def random_prune(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool) -> torch.Tensor:
    """DARE "drop and rescale" (Yu et al. 2024): keep each entry with probability p = density.

        m ~ Bernoulli(p) elementwise,   τ̂ = m ⊙ τ · (‖τ‖₁ / ‖m ⊙ τ‖₁)   (rescale=True)

    The paper rescales by 1/p; mergekit 0.1.5 (and so medmerge) matches the L1 norm instead, which is
    1/p in expectation and exact per tensor. The mask is drawn on the CPU from `generator`, so a seed
    gives the same bytes on every device and thread count. The L1 norms are summed in float64.
    """
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device="cpu") < density
    pruned = delta * keep.to(delta.device)
    if not rescale:
        return pruned
    before = delta.abs().sum(dtype=torch.float64)
    after = pruned.abs().sum(dtype=torch.float64)
    if before < 1e-7 or after < 1e-7:
        return pruned
    return (pruned.to(torch.float32) * (before / after).to(torch.float32)).to(delta.dtype)


def merge_task_vectors(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    prune: Prune | None = None,
    sign_consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """The shared pipeline. With δ_i = w_i τ̂_i:

        without consensus:  Δ = Σ_i δ_i                    (/ Σ_i w_i if normalize)
        with consensus:     γ = sgn(Σ_i δ_i)  (0 counts as +)
                            Δ = Σ_i δ_i [sgn δ_i = γ]      (/ Σ_i w_i [sgn δ_i = γ] if normalize)
        θ = θ_base + λ Δ

    Weights multiply the task vectors before the sign election (mergekit's order); with equal weights
    this is exactly TIES's elect + disjoint mean. A zero divisor is replaced by 1.
    """
    if not others:
        return base
    deltas = torch.stack([prune(x - base, i) if prune else x - base for i, x in enumerate(others)])
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).reshape(-1, *[1] * base.dim())
    deltas.mul_(w)
    if sign_consensus:
        elected = torch.where(deltas.sum(dim=0) >= 0, 1, -1).to(torch.int8)
        agrees = deltas.sign().to(torch.int8) == elected
        merged = (deltas * agrees).sum(dim=0)
        divisor = (w * agrees).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        merged /= divisor
    if lambda_ != 1:
        merged *= lambda_
    return (base + merged).to(base.dtype)


def task_arithmetic(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): θ = θ_base + λ Σ_i w_i τ_i."""
    return merge_task_vectors(base, others, weights, normalize=normalize, lambda_=lambda_)


def ties(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, arXiv:2306.01708): trim, elect sign, disjoint merge.

    τ̂_i = top-k_i(τ_i) by magnitude (k_i = density_i · n),  γ = sgn(Σ_i w_i τ̂_i)
    θ = θ_base + λ Σ_i w_i τ̂_i [sgn τ̂_i = γ] / Σ_i w_i [sgn τ̂_i = γ]
    """
    return merge_task_vectors(
        base,
        others,
        weights,
        prune=lambda d, i: magnitude_prune(d, densities[i]),
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


def dare_linear(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generator: torch.Generator,
    *,
    rescale: bool = True,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """DARE with a plain weighted sum (Yu et al. 2024, arXiv:2311.03099): θ = θ_base + λ Σ_i w_i DARE(τ_i)."""
    return merge_task_vectors(
        base,
        others,
        weights,
        prune=lambda d, i: random_prune(d, densities[i], generator, rescale),
        normalize=normalize,
        lambda_=lambda_,
    )


def dare_ties(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generator: torch.Generator,
    *,
    rescale: bool = True,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """DARE pruning followed by TIES's sign election and disjoint sum (mean if normalize)."""
    return merge_task_vectors(
        base,
        others,
        weights,
        prune=lambda d, i: random_prune(d, densities[i], generator, rescale),
        sign_consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )
