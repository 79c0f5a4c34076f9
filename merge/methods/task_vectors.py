"""The task-vector family — task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA, consensus merging — as one
pipeline on deltas from a base model, the way the papers build on each other:

    τ_i = θ_i − θ_base                                   task vector of model i
    τ̂_i = sparsify(τ_i)                                  none | magnitude (TIES) | random (DARE)
                                                          | magnitude outliers (Breadcrumbs) | rank-random (DELLA)
          (· ‖τ_i‖₁ / ‖τ̂_i‖₁ if rescale)
          (⊙ m_consensus for the consensus methods: TALL masks of the τ_i, `consensus_mask`)
    θ  = θ_base + λ · combine(w_1 τ̂_1, ..., w_n τ̂_n)     sum, or TIES's sign-elected disjoint sum (mean if normalize)

Each method is one choice of (sparsification, sign consensus, defaults): see `TASK_VECTOR_METHODS` in
merge/methods/__init__.py. Arithmetic runs in the merge dtype (the recipe's `dtype`), as in mergekit, so
outputs agree with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from merge.methods.common import BLOCK, blockwise

Prune = Callable[[torch.Tensor, int], torch.Tensor]  # (delta, index of the model) -> pruned delta


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES "trim": keep the k = max(1, ⌊density·n⌋) entries of largest |τ|, zero the rest.

    Entries of equal magnitude at the threshold are kept in flat-index order, so the result is
    deterministic on every device (mergekit sorts with an unstable argsort and keeps an arbitrary subset
    of them: the same count, possibly other positions). O(n), no sort.
    """
    n = delta.numel()
    k = max(1, int(density * n))
    if density >= 1 or k >= n:
        return delta
    flat = delta.reshape(-1)
    if flat.element_size() != 2:
        return (flat * top_k_mask(flat.abs(), k)).reshape(delta.shape)
    # Non-negative 16-bit floats order like their bit patterns: a 32768-bin histogram of |τ| gives the
    # threshold pattern and how many entries lie strictly above it.
    at_least = _magnitude_counts(flat).flip(0).cumsum(0).flip(0)  # at_least[b] = #entries with bits >= b
    threshold = int((at_least >= k).nonzero().max())
    ties_to_keep = k - (int(at_least[threshold + 1]) if threshold + 1 < at_least.numel() else 0)
    out = torch.empty_like(flat)
    for block in _blocks(n):
        d = flat[block]
        bits = d.abs().view(torch.int16)
        keep = bits > threshold
        if ties_to_keep > 0:
            tied = (bits == threshold).nonzero().reshape(-1)[:ties_to_keep]
            keep[tied] = True
            ties_to_keep -= tied.numel()
        out[block] = d * keep  # a product, not a fill: dropped negatives stay -0.0, as in mergekit
    return out.reshape(delta.shape)


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a float32/float64 `magnitude`, ties towards lower indices."""
    threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    above = magnitude > threshold
    missing = k - int(above.sum())
    if missing > 0:
        above[(magnitude == threshold).nonzero().reshape(-1)[:missing]] = True
    return above


def _blocks(n: int) -> list[slice]:
    return [slice(start, start + BLOCK) for start in range(0, n, BLOCK)]


def _magnitude_counts(flat: torch.Tensor) -> torch.Tensor:
    """How many entries of a 16-bit float tensor have each |value| bit pattern (2**15 bins)."""
    counts = torch.zeros(1 << 15, dtype=torch.int64, device=flat.device)
    for block in _blocks(flat.numel()):
        counts += torch.bincount(flat[block].abs().view(torch.int16), minlength=1 << 15)
    return counts


def exact_sum(counts: torch.Tensor, dtype: torch.dtype) -> float:
    """Σ count[b] · value(b) over 16-bit bit patterns b: each product is exact in float64, fsum rounds once."""
    counts = counts.cpu()
    present = counts.nonzero().reshape(-1)
    values = present.to(torch.int16).view(dtype).double()
    return math.fsum((counts[present].double() * values).tolist())


def random_prune(delta: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """DARE's "drop" (Yu et al. 2024, arXiv:2311.03099): τ̂ = m ⊙ τ for the Bernoulli(p = density) keep mask m
    (None keeps everything; the masks come from `fused_bf16.bernoulli_keep`, the same on every device and dtype).
    The rescale is separate: `rescale_l1` (mergekit's rule, the default) or 1/p
    (`rescale_by_density`, the paper's, and early-2024 mergekit's, which built BioMistral's DARE models)."""
    if keep is None:
        return delta
    return delta * keep.to(delta.device).reshape(delta.shape)


def outlier_prune(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop the largest |τ| as outliers and the
    smallest as noise. With r(j) the rank of |τ_j| in ascending order, n entries, k = ⌊density·n⌋:

        keep j  ⇔  b ≤ r(j) < b + k,   b = max(0, n − k − ⌊γ·n⌋)

    (fewer outliers are dropped when density + γ > 1, so k entries always survive). density ≥ 1 keeps
    everything, as mergekit does. Equal magnitudes rank by flat index (a stable sort), so the result is
    deterministic; mergekit's unstable sort may pick other entries among ties at either edge. 16-bit floats
    rank by one histogram of their |τ| bit patterns instead of a sort (the same mask)."""
    if density >= 1:
        return delta
    n = delta.numel()
    k = int(density * n)
    bottom = max(0, n - k - int(gamma * n))
    flat = delta.reshape(-1)
    if flat.element_size() == 2:
        counts = _magnitude_counts(flat)
        if not _odd_nans(counts, flat.dtype):
            return (flat * _band_mask(flat, rank_band(counts, bottom, bottom + k))).reshape(delta.shape)
    order = torch.sort(flat.abs().float(), stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[order[bottom : bottom + k]] = True
    return (flat * keep).reshape(delta.shape)


@dataclass(frozen=True)
class RankBand:
    """The entries of ascending stable rank first ≤ r < end, by their 16-bit |τ| bit patterns: every entry strictly
    between `low` and `high`; at `low`, all but the first `skip` in flat order; at `high`, only the first `take`
    (both rules at once when low == high). Empty (low = high = 2¹⁵, no pattern) when first == end."""

    low: int
    skip: int
    high: int
    take: int


EMPTY_BAND = RankBand(1 << 15, 0, 1 << 15, 0)


def rank_band(counts: torch.Tensor, first: int, end: int) -> RankBand:
    """RankBand of ranks [first, end) from a histogram of |τ| bit patterns (`_magnitude_counts`)."""
    if end <= first:
        return EMPTY_BAND
    through = counts.cpu().cumsum(0)  # through[b] = #entries with bits <= b
    low = int(torch.searchsorted(through, first, right=True))
    high = int(torch.searchsorted(through, end - 1, right=True))
    below = [int(through[b]) - int(counts[b]) for b in (low, high)]
    return RankBand(low, first - below[0], high, end - below[1])


def band_counts(counts: torch.Tensor, band: RankBand) -> torch.Tensor:
    """The bfloat16 histogram of the band's entries as torch prunes them (a product with the mask: dropped Inf/NaN
    become NaN, pattern 0x7FC0; dropped finite entries become zeros, which add nothing to an L1 norm)."""
    kept = torch.zeros_like(counts)
    if band.low < counts.numel():
        kept[band.low : band.high + 1] = counts[band.low : band.high + 1]
        if band.low == band.high:
            kept[band.low] = band.take - band.skip
        else:
            kept[band.low] -= band.skip
            kept[band.high] = band.take
    kept[0x7FC0] += (counts[0x7F80:] - kept[0x7F80:]).sum()
    return kept


def infinity_bits(dtype: torch.dtype) -> int:
    """The bit pattern of +Inf in a 16-bit float dtype: patterns above it are NaNs."""
    return int(torch.tensor(float("inf"), dtype=dtype).view(torch.int16))


def _odd_nans(counts: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a 16-bit |τ| holds NaNs of more than one bit pattern: they would rank by their payload, where a
    sort ranks every NaN equal."""
    return int((counts[infinity_bits(dtype) + 1 :] > 0).sum()) > 1


def _band_mask(flat: torch.Tensor, band: RankBand) -> torch.Tensor:
    """The boolean mask of a RankBand over a flat 16-bit tensor, a block at a time."""
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if band == EMPTY_BAND:
        return keep
    seen = dict.fromkeys((band.low, band.high), 0)  # entries met so far at each edge pattern
    for block in _blocks(flat.numel()):
        bits = flat[block].abs().view(torch.int16)
        inside = (bits > band.low) & (bits < band.high)
        for edge in seen:
            at = (bits == edge).nonzero().reshape(-1)
            order = torch.arange(seen[edge], seen[edge] + at.numel(), device=flat.device)
            seen[edge] += at.numel()
            kept = torch.ones_like(order, dtype=torch.bool)
            if edge == band.low:
                kept &= order >= band.skip
            if edge == band.high:
                kept &= order < band.take
            inside[at[kept]] = True
        keep[block] = inside
    return keep


def rank_random_prune(delta: torch.Tensor, density: float, epsilon: float, uniform: torch.Tensor) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al. 2024, arXiv:2406.11617): a random drop whose keep probability grows with
    magnitude. Per row (a 1-D tensor is one row) of m entries, with r(j) the rank of |τ_j| (0 = smallest):

        p_j = (density − ε) + 2ε · r(j) / (m − 1),      keep j  ⇔  u_j < p_j,   u_j ~ U[0, 1)

    so the mean keep rate is `density`; a one-entry row keeps with p = density. `uniform` holds the u_j
    (drawn by the caller from the method's seeded generator). density ≥ 1 keeps everything."""
    if density >= 1:
        return delta
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    m = rows.shape[1]
    ranks = _row_ranks(rows.abs()).float()
    spread = ranks / (m - 1) if m > 1 else torch.full_like(ranks, 0.5)
    keep = uniform.to(delta.device).reshape(rows.shape) < (density - epsilon) + spread * (2 * epsilon)
    return (rows * keep).reshape(delta.shape)


def _row_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """Each entry's ascending stable rank within its row (int64): a radix sort of 16-bit patterns on the CPU,
    else the inverse permutation of a stable sort."""
    if magnitudes.element_size() == 2 and magnitudes.device.type == "cpu":
        from merge.methods.fused_bf16 import row_ranks  # numba: compiled on first use

        return row_ranks(magnitudes)
    order = torch.sort(magnitudes.float(), dim=1, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def rescale_l1(delta: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """τ̂ · ‖τ‖₁ / ‖τ̂‖₁ — mergekit's `rescale`: the pruned task vector keeps the original's L1 norm (1/p in
    expectation for DARE). Unchanged when either norm is below 1e-7. For 16-bit floats the norms are exact,
    order-free sums, so the result does not depend on device or thread count."""
    ratio = l1_ratio(_l1_norm(delta), _l1_norm(pruned))
    return pruned if ratio is None else pruned.mul_(ratio)  # computed in float32, rounded once to the delta's dtype


def l1_ratio(before: float, after: float) -> float | None:
    """‖τ‖₁ / ‖τ̂‖₁, or None (no rescale) when either norm is below 1e-7."""
    return None if before < 1e-7 or after < 1e-7 else before / after


def _l1_norm(x: torch.Tensor) -> float:
    flat = x.reshape(-1)
    if flat.element_size() == 2:
        return exact_sum(_magnitude_counts(flat), x.dtype)
    return sum(float(flat[block].abs().sum(dtype=torch.float64)) for block in _blocks(flat.numel()))


def consensus_mask(deltas: Sequence[torch.Tensor], lambdas: Sequence[float], k: int) -> torch.Tensor:
    """TALL masks and their consensus (Wang et al., ICML 2024, "Localizing Task Information for Improved Model
    Merging and Compression", arXiv:2405.07813). With τ_MTL = Σ_t τ_t, the multi-task vector:

        m_t = 1{ |τ_t| ≥ λ_t · |τ_MTL − τ_t| }          task t's mask: where τ_t dominates the other tasks' sum
        m_consensus = 1{ Σ_t m_t ≥ k }                   kept where at least k tasks need the entry

    k = 2 drops the paper's "selfish" (one task) and "catastrophic" (no task) entries; k = 0 keeps every entry.
    τ_MTL − τ_t is summed over the other tasks directly (no cancellation), in float32 (float64 stays float64).
    Returns a boolean mask of the deltas' shape."""
    wide = torch.promote_types(deltas[0].dtype, torch.float32)
    flat = [d.reshape(-1) for d in deltas]
    count = torch.zeros(flat[0].numel(), dtype=torch.int32, device=flat[0].device)
    for start in range(0, flat[0].numel(), BLOCK):
        block = slice(start, start + BLOCK)
        tau = [d[block].to(wide) for d in flat]
        total = _sum(tau, wide)
        for t, lambda_t in zip(tau, lambdas):
            count[block] += (t.abs() >= (total - t).abs() * lambda_t).to(torch.int32)
    return (count >= k).reshape(deltas[0].shape)


def tall_mask(delta: torch.Tensor, multi_task: torch.Tensor, lambda_: float) -> torch.Tensor:
    """One task's TALL mask against a given multi-task vector (the compression use of Wang et al. 2024): with
    τ_MTL = θ_merged − θ_base,

        m_t = 1{ |τ_t| ≥ λ_t · |τ_MTL − τ_t| },    θ_t ≈ θ_base + m_t ⊙ τ_MTL   (exact where only task t moved)

    in float32 (float64 stays float64); a boolean mask of `delta`'s shape."""
    wide = torch.promote_types(delta.dtype, torch.float32)
    tau, total = delta.to(wide), multi_task.to(wide)
    return tau.abs() >= (total - tau).abs() * lambda_


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
    this is exactly TIES's elect + disjoint mean. A zero divisor is replaced by 1. The combination is
    elementwise, so it runs over blocks of BLOCK entries that stay in cache.
    """
    if not others:
        return base
    deltas = [(prune(x - base, i) if prune else x - base).reshape(-1) for i, x in enumerate(others)]
    w = [float(torch.tensor(x, dtype=base.dtype)) for x in weights]  # rounded to the merge dtype, like mergekit

    def combine(base: torch.Tensor, *deltas: torch.Tensor) -> torch.Tensor:
        weighted = [d * wi for d, wi in zip(deltas, w)]
        return _combine(base, weighted, w, sign_consensus, normalize, lambda_)

    return blockwise(combine, base, *deltas)


def _sum(terms: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Σ terms accumulated in float32 (float64 stays float64) and rounded once to `dtype`: what torch's sum over
    a stacked dimension gives, without the stack and the strided reduction (4x faster on CPU)."""
    wide = torch.promote_types(dtype, torch.float32)
    total = terms[0].to(wide) + 0.0  # from +0.0, as torch's sum starts: a sum of -0.0 terms is +0.0
    for term in terms[1:]:
        total = total + term.to(wide)
    return total.to(dtype)


def _combine(
    base: torch.Tensor,
    weighted: list[torch.Tensor],
    w: list[float],
    sign_consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """θ_base + λ · (consensus-masked) Σ δ_i (/ Σ w_i) for one block of entries, δ_i = weighted[i]."""
    dtype = base.dtype
    if sign_consensus:
        elected = (_sum(weighted, dtype) >= 0).to(dtype).mul_(2).sub_(1)  # γ = ±1, 0 counting as +
        agrees = [(d * elected > 0).to(dtype) for d in weighted]  # sgn δ_i = γ; a zero δ_i never agrees
        merged = _sum([d * a for d, a in zip(weighted, agrees)], dtype)  # a product keeps mergekit's signed zeros
        if normalize:
            divisor = _sum([a * wi for a, wi in zip(agrees, w)], dtype)
            merged /= divisor.masked_fill_(divisor == 0, 1)
    else:
        merged = _sum(weighted, dtype)
        if normalize:
            total = _sum([torch.tensor(wi, dtype=dtype) for wi in w], dtype)
            merged /= total if abs(float(total)) >= 1e-8 else 1
    if lambda_ != 1:
        merged *= lambda_
    return (base + merged).to(dtype)
