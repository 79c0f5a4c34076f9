"""The task-vector pipeline of merge/methods/task_vectors.py for bfloat16 tensors on the CPU, fused into compiled
passes (numba): bit for bit the same results as `merge_task_vectors` with `magnitude_prune` (TIES),
`outlier_prune` (Breadcrumbs), DARE's `random_prune` or no sparsification, and `rescale_l1` / the 1/density rescale
(tests/merge/test_fused_bf16.py). Also DELLA's per-row ranks of 16-bit magnitudes (`row_ranks`, a radix sort)
and SCE's erase step (`sce_erase`).

    τ_i = θ_i − θ_base,  τ̂_i = m_i ⊙ τ_i (· s_i),  δ_i = w_i τ̂_i
    θ   = θ_base + λ · Σ_i δ_i [sgn δ_i = γ] / Σ_i w_i [sgn δ_i = γ],   γ = sgn Σ_i δ_i   (TIES)
    θ   = θ_base + λ · Σ_i δ_i (/ Σ_i w_i)                                                 (no consensus)

torch runs that chain as about thirty elementwise passes, each converting bfloat16 to float32 and back. Here each
entry is read once, carried in float32 and rounded to bfloat16 exactly where torch rounds (round to nearest even,
NaN to 0x7FC0), so the two agree to the bit. A TIES trim needs one histogram pass per model first (its threshold
is an order statistic of |τ_i|; Breadcrumbs' band has two), and so does DARE's L1 rescale (both norms from one
histogram). Work is split into contiguous ranges run on torch's thread count (the kernels release the GIL); every
range computes the same values, so results do not depend on the thread count. The kernels compile on first use
after an install (about 10 s on 2 cores) and are cached by numba after that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from numba import njit

from merge.methods.task_vectors import EMPTY_BAND, band_counts, exact_sum, infinity_bits, l1_ratio, rank_band

# what m_i keeps: everything, TIES's top-k |τ|, DARE's Bernoulli draw, Breadcrumbs' band of |τ| ranks
ALL, MAGNITUDE, RANDOM, BAND = 0, 1, 2, 3
ROW = 4096  # entries per inner block: the k weighted deltas of a block stay in L1/L2 cache
MIN_PARALLEL = 1 << 16  # smaller tensors run in the calling thread
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always")
def _value(bits: np.uint16) -> np.float32:
    """The float32 value of bfloat16 bits (exact)."""
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@njit(inline="always")
def _round(x: np.float32) -> np.uint16:
    """float32 -> bfloat16 bits as torch converts: round to nearest, ties to even; NaN becomes 0x7FC0."""
    u = np.float32(x).view(np.uint32)
    rounded = np.uint16(np.uint32(u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return np.uint16(0x7FC0) if x != x else rounded


@njit(inline="always")
def _rounded(x: np.float32) -> np.float32:
    return _value(_round(x))


@njit(inline="always")
def _splitmix(key: np.uint64, index: np.int64) -> np.uint64:
    """SplitMix64's output number `index` for stream `key` (Steele et al. 2014): a counter-based generator, so
    any output is computed on its own, in any order, on any thread."""
    z = np.uint64(key + np.uint64(index + 1) * GOLDEN)
    z = np.uint64((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9))
    z = np.uint64((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB))
    return np.uint64(z ^ (z >> np.uint64(31)))


@njit(inline="always")
def _draw(key: np.uint64, j: np.int64) -> np.uint32:
    """Entry j's 32 random bits: the low half of output j // 2 for even j, the high half for odd j."""
    z = _splitmix(key, j >> 1)
    return np.uint32(z >> np.uint64(32)) if j & 1 else np.uint32(z & np.uint64(0xFFFFFFFF))


@njit(inline="always")
def _fill_draws(key: np.uint64, start: np.int64, size: np.int64, draws: np.ndarray) -> None:
    """draws[jj] = _draw(key, start + jj) for an even `start`, one SplitMix64 output per two entries."""
    for pair in range((size + 1) // 2):
        z = _splitmix(key, (start >> 1) + pair)
        draws[2 * pair] = np.uint32(z & np.uint64(0xFFFFFFFF))
        draws[2 * pair + 1] = np.uint32(z >> np.uint64(32))


@njit(nogil=True, cache=True)
def _bernoulli_range(key: np.uint64, limit: np.uint64, out: np.ndarray, lo: int, hi: int) -> None:
    for j in range(lo, hi):
        out[j] = _draw(key, j) < limit


@njit(nogil=True, cache=True)
def _delta_counts_range(
    base: np.ndarray,
    other: np.ndarray,
    key: np.uint64,
    limit: np.uint64,
    random: bool,
    counts: np.ndarray,
    lo: int,
    hi: int,
) -> None:
    """counts[c] += #entries with code c = (|τ| bits) + 2¹⁵ · [dropped by the DARE draw] (never dropped unless
    `random`): one histogram gives both ‖τ‖₁ and ‖m ⊙ τ‖₁. A row's codes are computed first (a loop that
    vectorises), then counted."""
    codes = np.empty(ROW, np.uint16)
    draws = np.empty(ROW, np.uint32)
    for start in range(lo, hi, ROW):
        size = min(ROW, hi - start)
        base_row, other_row = base[start : start + size], other[start : start + size]
        if random:
            _fill_draws(key, start, size, draws)
            for jj in range(size):
                magnitude = _round(_value(other_row[jj]) - _value(base_row[jj])) & np.uint16(0x7FFF)
                codes[jj] = magnitude | (np.uint16(0x8000) if draws[jj] >= limit else np.uint16(0))
        else:
            for jj in range(size):
                codes[jj] = _round(_value(other_row[jj]) - _value(base_row[jj])) & np.uint16(0x7FFF)
        for jj in range(size):
            counts[np.int64(codes[jj])] += 1


@njit(nogil=True, cache=True)
def _nth_equal(base: np.ndarray, other: np.ndarray, magnitude: np.uint16, nth: int, lo: int, hi: int) -> int:
    """The flat index of the nth (1-based) entry in [lo, hi) whose |τ| has bits `magnitude`: rows are counted
    whole (a loop that vectorises) until the one that holds it."""
    for start in range(lo, hi, ROW):
        size = min(ROW, hi - start)
        base_row, other_row = base[start : start + size], other[start : start + size]
        found = 0
        for jj in range(size):
            found += (_round(_value(other_row[jj]) - _value(base_row[jj])) & np.uint16(0x7FFF)) == magnitude
        if found < nth:
            nth -= found
            continue
        for jj in range(size):
            if (_round(_value(other_row[jj]) - _value(base_row[jj])) & np.uint16(0x7FFF)) == magnitude:
                nth -= 1
                if nth == 0:
                    return start + jj
    return -1


@njit(nogil=True, cache=True)
def _ordered_counts_range(bits: np.ndarray, counts: np.ndarray, lo: int, hi: int) -> None:
    xs = bits[lo:hi]
    for j in range(hi - lo):
        b = xs[j]
        counts[b | np.uint16(0x8000) if b < 0x8000 else np.uint16(0xFFFF) - b] += 1


def ordered_counts(x: torch.Tensor) -> torch.Tensor:
    """The histogram of a 16-bit float CPU tensor's values by order key, 2¹⁶ int64 counts: key k counts the
    entries whose bit pattern maps to k, where positive patterns get the sign bit set and negative ones are
    flipped, so that keys order like the values (NaNs at the ends). One pass, a histogram per thread."""
    flat = _bits(x)

    def count(lo: int, hi: int) -> np.ndarray:
        counts = np.zeros(1 << 16, np.int64)
        _ordered_counts_range(flat, counts, lo, hi)
        return counts

    return torch.from_numpy(sum(_parallel(count, flat.size)))


@njit(nogil=True, cache=True)
def _row_ranks_range(keys: np.ndarray, infinity: np.uint16, ranks: np.ndarray, lo: int, hi: int) -> None:
    """ranks[r, j] = the ascending stable rank of keys[r, j] in its row, for rows lo..hi-1 of 16-bit |x| bit
    patterns (which order like the values; every NaN pattern, above `infinity`'s, counts as 0x7FFF, as a sort
    ranks NaNs equal and last): a two-pass (low byte, high byte) LSD radix sort per row, O(m)."""
    m = keys.shape[1]
    canonical = np.empty(m, np.uint16)
    by_low = np.empty(m, np.int64)
    order = np.empty(m, np.int64)
    counts = np.empty(257, np.int64)
    for r in range(lo, hi):
        row = keys[r]
        for j in range(m):
            k = row[j]
            canonical[j] = np.uint16(0x7FFF) if k > infinity else k
        for byte in range(2):
            shift = np.uint16(8 * byte)
            source = by_low if byte else order  # pass 0 reads the identity order
            target = order if byte else by_low
            counts[:] = 0
            for j in range(m):
                counts[np.int64((canonical[j] >> shift) & np.uint16(0xFF)) + 1] += 1
            for b in range(256):
                counts[b + 1] += counts[b]
            for p in range(m):
                j = source[p] if byte else p
                b = np.int64((canonical[j] >> shift) & np.uint16(0xFF))
                target[counts[b]] = j
                counts[b] += 1
        for p in range(m):
            ranks[r, order[p]] = p


def row_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """The ascending stable rank of every entry within its row of a 2-D 16-bit float tensor of magnitudes (no
    negative values): what `torch.sort(x.float(), dim=1, stable=True)` ranks, without the sort (int64)."""
    keys = magnitudes.contiguous().view(torch.int16).numpy().view(np.uint16)
    infinity = np.uint16(infinity_bits(magnitudes.dtype))
    ranks = np.empty(keys.shape, np.int64)
    _parallel(lambda lo, hi: _row_ranks_range(keys, infinity, ranks, lo, hi), keys.shape[0], 1, keys.size)
    return torch.from_numpy(ranks)


@njit(inline="always")
def _pruned(d: np.uint16, keep: bool, scale: np.float32, weight: np.float32) -> np.float32:
    """w_i · s_i · (m_i ⊙ τ_i) for one entry, rounded where torch rounds. The 0/1 mask is a product, as torch
    prunes (dropped negatives stay -0.0); it is exact, so torch's rounding after it changes nothing but NaN bits,
    which the next rounding sets anyway. The rescale is a product with a float32 scalar (torch skips it when it
    is 1: a product with 1 changes no bits, and a test inside the loop would stop it vectorising)."""
    v = _value(d) * (np.float32(1) if keep else np.float32(0))
    return _rounded(_rounded(v * scale) * weight)


@njit(nogil=True, cache=True)
def _combine_range(
    base: np.ndarray,
    others: tuple,
    rule: np.ndarray,
    threshold: np.ndarray,
    cutoff: np.ndarray,
    upper: np.ndarray,
    upper_cutoff: np.ndarray,
    key: np.ndarray,
    limit: np.ndarray,
    scale: np.ndarray,
    weight: np.ndarray,
    consensus: bool,
    normalize: bool,
    weight_total: np.float32,
    lambda_: np.float32,
    out: np.ndarray,
    lo: int,
    hi: int,
) -> None:
    k = len(others)
    weighted = np.empty((k, ROW), np.float32)  # δ_i for one row of entries
    rows = np.empty((3, ROW), np.float32)
    draws = np.empty(ROW, np.uint32)
    total, merged, divisor = rows[0], rows[1], rows[2]
    for start in range(lo, hi, ROW):
        size = min(ROW, hi - start)
        base_row = base[start : start + size]  # row views: indexing from 0 lets LLVM vectorise the loops
        # One loop per rule: a rule test inside the loop keeps LLVM from vectorising it.
        for i in range(k):
            other, row, scale_i, weight_i = others[i][start : start + size], weighted[i], scale[i], weight[i]
            if rule[i] == MAGNITUDE and 0 <= cutoff[i] - start < size - 1:  # the row where kept ties end
                threshold_i, last = threshold[i], cutoff[i] - start
                for jj in range(size):
                    d = _round(_value(other[jj]) - _value(base_row[jj]))
                    magnitude = d & np.uint16(0x7FFF)
                    keep = (magnitude > threshold_i) | ((magnitude == threshold_i) & (jj <= last))
                    row[jj] = _pruned(d, keep, scale_i, weight_i)
            elif rule[i] == MAGNITUDE:  # every other row keeps all its ties or none: one comparison
                lowest = np.uint16(threshold[i] if cutoff[i] >= start + size - 1 else threshold[i] + 1)
                for jj in range(size):
                    d = _round(_value(other[jj]) - _value(base_row[jj]))
                    row[jj] = _pruned(d, (d & np.uint16(0x7FFF)) >= lowest, scale_i, weight_i)
            elif rule[i] == BAND and (
                0 <= cutoff[i] - start < size - 1 or 0 <= upper_cutoff[i] - start < size - 1
            ):  # a row where the band's edges change: entries at `threshold` kept after `cutoff`, at `upper` up to
                # `upper_cutoff`
                low, high, after, through = np.int32(threshold[i]), upper[i], cutoff[i] - start, upper_cutoff[i] - start
                for jj in range(size):
                    d = _round(_value(other[jj]) - _value(base_row[jj]))
                    magnitude = np.int32(d & np.uint16(0x7FFF))
                    keep = ((magnitude > low) | ((magnitude == low) & (jj > after))) & (
                        (magnitude < high) | ((magnitude == high) & (jj <= through))
                    )
                    row[jj] = _pruned(d, keep, scale_i, weight_i)
            elif rule[i] == BAND:  # elsewhere each edge is kept whole or not at all: two comparisons
                lowest = np.int32(threshold[i]) + (np.int32(0) if cutoff[i] < start else np.int32(1))
                highest = upper[i] - (np.int32(0) if upper_cutoff[i] >= start + size - 1 else np.int32(1))
                for jj in range(size):
                    d = _round(_value(other[jj]) - _value(base_row[jj]))
                    magnitude = np.int32(d & np.uint16(0x7FFF))
                    row[jj] = _pruned(d, (magnitude >= lowest) & (magnitude <= highest), scale_i, weight_i)
            elif rule[i] == RANDOM:
                _fill_draws(key[i], start, size, draws)
                limit_i = limit[i]
                for jj in range(size):
                    d = _round(_value(other[jj]) - _value(base_row[jj]))
                    row[jj] = _pruned(d, draws[jj] < limit_i, scale_i, weight_i)
            else:
                for jj in range(size):
                    row[jj] = _rounded(_value(_round(_value(other[jj]) - _value(base_row[jj]))) * weight_i)
        for jj in range(size):
            total[jj] = 0  # torch's sums start from +0.0
        for i in range(k):
            row = weighted[i]
            for jj in range(size):
                total[jj] += row[jj]
        if consensus:  # one pass per model again, so each loop is a plain vectorisable one
            for jj in range(size):
                merged[jj] = 0
                divisor[jj] = 0
            for i in range(k):
                row, weight_i = weighted[i], weight[i]
                for jj in range(size):
                    v = row[jj]
                    # sgn δ_i = γ, γ = sgn Σ δ_i with 0 counting as + (the bfloat16 rounding keeps the sign)
                    positive = total[jj] >= 0
                    agrees = np.float32(1) if (positive & (v > 0)) | ((not positive) & (v < 0)) else np.float32(0)
                    merged[jj] += _rounded(v * agrees)
                    divisor[jj] += agrees * weight_i
            for jj in range(size):
                m = _rounded(merged[jj])
                if normalize:
                    d = _rounded(divisor[jj])
                    m = _rounded(m / (d if d != 0 else np.float32(1)))
                total[jj] = m
        elif normalize:
            for jj in range(size):
                total[jj] = _rounded(_rounded(total[jj]) / weight_total)
        else:
            for jj in range(size):
                total[jj] = _rounded(total[jj])
        out_row = out[start : start + size]
        for jj in range(size):
            m = total[jj] if lambda_ == 1 else _rounded(total[jj] * lambda_)
            out_row[jj] = _round(_value(base_row[jj]) + m)


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="medmerge-fused")


def _ranges(n: int, align: int = ROW, entries: int | None = None) -> list[tuple[int, int]]:
    """[lo, hi) ranges of n items (entries, or rows of `entries` entries in all), one per thread, each a multiple
    of `align` long but the last."""
    threads = max(1, torch.get_num_threads())
    if (n if entries is None else entries) < MIN_PARALLEL or threads == 1:
        return [(0, n)]
    step = -(-n // threads // align) * align
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _parallel(run: Callable[[int, int], object], n: int, align: int = ROW, entries: int | None = None) -> list[object]:
    ranges = _ranges(n, align, entries)
    if len(ranges) == 1:
        return [run(*ranges[0])]
    return list(_pool(len(ranges)).map(lambda r: run(*r), ranges))


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)


def _tensor(bits: np.ndarray, shape: torch.Size) -> torch.Tensor:
    """The bfloat16 tensor of `bits` (no copy)."""
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).reshape(shape)


def applies(base: torch.Tensor, others: Sequence[torch.Tensor]) -> bool:
    """Whether the fused path takes this merge: bfloat16 tensors on the CPU."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (base, *others))


def bernoulli_keep(key: int, numel: int, density: float) -> torch.Tensor:
    """DARE's keep mask m ~ Bernoulli(density), m_j = [U_j < density] with U_j = draw j of the counter-based
    stream `key` / 2**32: the same mask the fused path applies, for the torch path (any device or dtype)."""
    out = np.empty(numel, np.bool_)
    limit = _limit(density)
    _parallel(lambda lo, hi: _bernoulli_range(np.uint64(key), limit, out, lo, hi), numel)
    return torch.from_numpy(out)


def _limit(density: float) -> np.uint64:
    """P(U < limit / 2**32) = density to within 2**-32."""
    return np.uint64(min(1 << 32, round(density * (1 << 32))))


@dataclass
class _Model:
    """What the combine pass needs to know about model i's sparsification and rescale."""

    rule: int = ALL
    threshold: int = 0  # MAGNITUDE: the lowest kept |τ| bits; BAND: the band's low edge
    cutoff: int = -1  # MAGNITUDE: the last kept entry at `threshold`; BAND: the last dropped one (-1: none)
    upper: int = 0  # BAND: the band's high edge
    upper_cutoff: int = -1  # BAND: the last kept entry at `upper`
    key: int = 0
    limit: int = 0
    scale: float = 1.0


def _counts(base: np.ndarray, other: np.ndarray, key: int, limit: int, random: bool) -> list[np.ndarray]:
    """Per range of `_ranges`: the histogram of `_delta_counts_range`'s codes (2¹⁶ bins)."""

    def run(lo: int, hi: int) -> np.ndarray:
        counts = np.zeros(1 << 16, np.int64)
        _delta_counts_range(base, other, np.uint64(key), np.uint64(limit), random, counts, lo, hi)
        return counts

    return _parallel(run, base.size)  # type: ignore[return-value]


def _l1_scale(counts: np.ndarray, kept: np.ndarray) -> float:
    """rescale_l1's factor from |τ| and |τ̂| histograms (1, no rescale, where `l1_ratio` gives none)."""
    ratio = l1_ratio(*(exact_sum(torch.from_numpy(c), torch.bfloat16) for c in (counts, kept)))
    return 1.0 if ratio is None else ratio


def _nth_at(base: np.ndarray, other: np.ndarray, parts: list[np.ndarray], magnitude: int, nth: int) -> int:
    """The flat index of the nth (1-based) entry whose |τ| has bits `magnitude`, -1 for nth = 0: the range of
    `_ranges` that holds it (from the per-range histograms `parts`), then the entry."""
    if nth <= 0:
        return -1
    for (lo, hi), part in zip(_ranges(base.size), parts):
        if nth <= part[magnitude]:
            return _nth_equal(base, other, np.uint16(magnitude), nth, lo, hi)
        nth -= int(part[magnitude])
    raise AssertionError("the histogram counted more entries than there are")


def _magnitude_model(base: np.ndarray, other: np.ndarray, density: float, rescale: bool) -> _Model:
    """TIES's trim as a (threshold bits, cutoff index) rule: magnitude_prune keeps |τ| bits above the threshold
    and the first entries at it in flat order, k = max(1, ⌊density·n⌋) in all."""
    n = base.size
    k = max(1, int(density * n))
    if density >= 1 or k >= n:
        return _Model()
    parts = [p[: 1 << 15] for p in _counts(base, other, 0, 0, False)]
    counts = sum(parts)
    at_least = np.cumsum(counts[::-1])[::-1]
    threshold = int(np.nonzero(at_least >= k)[0].max())
    ties = k - (int(at_least[threshold + 1]) if threshold + 1 < at_least.size else 0)
    cutoff = _nth_at(base, other, parts, threshold, ties)
    scale = 1.0
    if rescale:
        kept = counts.copy()
        kept[:threshold] = 0
        kept[threshold] = ties  # dropped entries are finite, so they add only zeros to ‖τ̂‖₁
        scale = _l1_scale(counts, kept)
    return _Model(MAGNITUDE, threshold, cutoff, scale=scale)


def _band_model(base: np.ndarray, other: np.ndarray, density: float, gamma: float, rescale: bool) -> _Model:
    """Breadcrumbs' band of |τ| ranks (outlier_prune) as a (low edge, last dropped at it, high edge, last kept at
    it) rule, from one histogram."""
    n = base.size
    if density >= 1:
        return _Model()
    k = int(density * n)
    bottom = max(0, n - k - int(gamma * n))
    parts = [p[: 1 << 15] for p in _counts(base, other, 0, 0, False)]
    counts = sum(parts)
    band = rank_band(torch.from_numpy(counts), bottom, bottom + k)
    scale = 1.0
    if rescale:
        scale = _l1_scale(counts, band_counts(torch.from_numpy(counts), band).numpy())
    if band == EMPTY_BAND:
        return _Model(BAND, band.low, -1, band.high, -1, scale=scale)
    return _Model(
        BAND,
        band.low,
        _nth_at(base, other, parts, band.low, band.skip),
        band.high,
        _nth_at(base, other, parts, band.high, band.take),
        scale=scale,
    )


def _random_model(base: np.ndarray, other: np.ndarray, key: int, density: float, rescale: str | None) -> _Model:
    """DARE's drop as a (key, limit) rule; `rescale` is "l1" (mergekit's), "density" (1/p, the paper's) or None."""
    if density >= 1:
        return _Model()
    limit = int(_limit(density))
    scale = 1.0
    if rescale == "density":
        scale = 1 / density
    elif rescale == "l1":
        codes = sum(_counts(base, other, key, limit, True))
        kept, dropped = codes[: 1 << 15].copy(), codes[1 << 15 :]
        every = kept + dropped
        # torch prunes with a product: a dropped finite entry becomes ±0, a dropped Inf/NaN a NaN
        kept[0] += dropped[:0x7F80].sum()
        kept[0x7FC0] += dropped[0x7F80:].sum()
        scale = _l1_scale(every, kept)
    return _Model(RANDOM, key=key, limit=limit, scale=scale)


def fused_task_vectors(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    magnitude_densities: Sequence[float] | None = None,
    band_gammas: Sequence[float] | None = None,
    random_keys: Sequence[int] | None = None,
    random_densities: Sequence[float] | None = None,
    rescale: str | None = None,
    sign_consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """merge_task_vectors(base, others, weights, prune=..., ...) for bfloat16 on the CPU, with no sparsification,
    TIES's trim (`magnitude_densities`), Breadcrumbs' outlier_prune (the same with `band_gammas`) or DARE's drop
    (`random_keys`, `random_densities`: bernoulli_keep's masks),
    each pruned τ̂_i rescaled by `rescale` ("l1", or "density" for DARE) when it was pruned."""
    flat_base = _bits(base)
    flats = [_bits(x) for x in others]
    if magnitude_densities is not None and band_gammas is not None:
        models = [
            _band_model(flat_base, x, d, g, rescale == "l1") for x, d, g in zip(flats, magnitude_densities, band_gammas)
        ]
    elif magnitude_densities is not None:
        models = [_magnitude_model(flat_base, x, d, rescale == "l1") for x, d in zip(flats, magnitude_densities)]
    elif random_keys is not None and random_densities is not None:
        models = [_random_model(flat_base, x, k, d, rescale) for x, k, d in zip(flats, random_keys, random_densities)]
    else:
        models = [_Model() for _ in flats]
    # weights and scales as torch holds them: bfloat16-rounded weights, float32 scalar operands
    w = np.array([float(torch.tensor(x, dtype=torch.bfloat16)) for x in weights], np.float32)
    weight_total = np.float32(1)
    if normalize and not sign_consensus:
        total = np.float32(0)
        for x in w:  # _sum's order: float32, from +0.0, rounded once to bfloat16
            total = np.float32(total + x)
        rounded = float(torch.tensor(total).bfloat16())
        weight_total = np.float32(rounded if abs(rounded) >= 1e-8 else 1)
    out = np.empty_like(flat_base)
    arrays = (
        np.array([m.rule for m in models], np.int64),
        np.array([m.threshold for m in models], np.uint16),
        np.array([m.cutoff for m in models], np.int64),
        np.array([m.upper for m in models], np.int32),
        np.array([m.upper_cutoff for m in models], np.int64),
        np.array([m.key for m in models], np.uint64),
        np.array([m.limit for m in models], np.uint64),
        np.array([m.scale for m in models], np.float32),
        w,
    )
    _parallel(
        lambda lo, hi: _combine_range(
            flat_base,
            tuple(flats),
            *arrays,
            sign_consensus,
            normalize,
            weight_total,
            np.float32(lambda_),
            out,
            lo,
            hi,
        ),
        flat_base.size,
    )
    return _tensor(out, base.shape)


# torch's sum over the models adds in order from +0.0 (checked on every bit pattern for 1-17 rows; 33 rows sum in
# another order): the fused SCE erase and Multi-SLERP steps take up to 16 models, the torch steps the rest
MAX_MODELS_IN_ORDER = 16


@njit(nogil=True, cache=True, error_model="numpy")  # no ZeroDivisionError check in the loop
def _sce_erase_range(
    base: np.ndarray, deltas: tuple, eta: np.ndarray, floor: np.float32, out: np.ndarray, lo: int, hi: int
) -> None:
    total = np.empty(ROW, np.float32)
    num = np.empty(ROW, np.float32)
    den = np.empty(ROW, np.float32)
    for start in range(lo, hi, ROW):
        size = min(ROW, hi - start)
        total[:size] = 0
        num[:size] = 0
        den[:size] = 0
        for k in range(len(deltas)):
            row = deltas[k][start : start + size]
            for jj in range(size):
                total[jj] += _value(row[jj])
        for k in range(len(deltas)):
            row = deltas[k][start : start + size]
            e = eta[k]
            for jj in range(size):
                d = _value(row[jj])
                positive = _rounded(total[jj]) >= 0  # γ = +1 (a NaN sum gives −1)
                agrees = (d > 0) if positive else (d < 0)  # sgn d = γ; sgn 0 = sgn NaN = 0 never agrees
                w = _rounded(e * (np.float32(1) if agrees else np.float32(0)))
                num[jj] += _rounded(d * w)
                den[jj] += w
        base_row = base[start : start + size]
        out_row = out[start : start + size]
        for jj in range(size):
            weight = _rounded(den[jj])
            weight = floor if weight < floor else weight
            out_row[jj] = _round(_value(base_row[jj]) + _rounded(_rounded(num[jj]) / weight))


def sce_erase(base: torch.Tensor, deltas: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """SCE's erase and merge for bfloat16 on the CPU, as torch rounds it (merge/methods/sce.py):

        γ = sgn Σ_i τ_i,  w_i = η_i [sgn τ_i = γ],  θ = θ_base + Σ_i w_i τ_i / max(Σ_i w_i, 1e-6)

    `deltas` the (N, ...) stack of τ_i (N ≤ MAX_MODELS_IN_ORDER), `eta` the N bfloat16 η_i. Sums over the models
    accumulate in float32 from +0.0 in model order and round once, as torch's sum over a short dimension does."""
    flat_base = _bits(base)
    flats = tuple(_bits(d) for d in deltas.unbind(0))
    weights = eta.reshape(-1).float().numpy().astype(np.float32)
    floor = np.float32(float(torch.tensor(1e-6, dtype=torch.bfloat16)))  # clamp's bound, in the tensor's dtype
    out = np.empty_like(flat_base)
    _parallel(lambda lo, hi: _sce_erase_range(flat_base, flats, weights, floor, out, lo, hi), flat_base.size)
    return _tensor(out, base.shape)


@njit(nogil=True, cache=True)
def _karcher_gradient_range(
    mean: np.ndarray,
    points: tuple,
    cosines: np.ndarray,
    coefs: np.ndarray,
    gradient: np.ndarray,
    gradient32: np.ndarray,
    lo: int,
    hi: int,
) -> None:
    total = np.empty(ROW, np.float32)
    for start in range(lo, hi, ROW):
        size = min(ROW, hi - start)
        m = mean[start : start + size]
        total[:size] = 0
        for i in range(len(points)):
            u = points[i][start : start + size]
            cos, coef = cosines[i], coefs[i]
            for jj in range(size):
                tangent = _rounded(_value(u[jj]) - _rounded(cos * _value(m[jj])))
                total[jj] = _rounded(total[jj] + _rounded(coef * tangent))
        out, out32 = gradient[start : start + size], gradient32[start : start + size]
        for jj in range(size):
            out[jj] = _round(total[jj])  # already a bfloat16 value: these are its bits
            out32[jj] = total[jj]


@njit(nogil=True, cache=True)
def _weighted_sum_range(
    points: tuple, weights: np.ndarray, out: np.ndarray, out32: np.ndarray, lo: int, hi: int
) -> None:
    total = np.empty(ROW, np.float32)
    for start in range(lo, hi, ROW):
        size = min(ROW, hi - start)
        total[:size] = 0
        for i in range(len(points)):
            u, w = points[i][start : start + size], weights[i]
            for jj in range(size):
                total[jj] = _rounded(total[jj] + _rounded(w * _value(u[jj])))
        o, o32 = out[start : start + size], out32[start : start + size]
        for jj in range(size):
            o[jj] = _round(total[jj])
            o32[jj] = total[jj]


@njit(nogil=True, cache=True, error_model="numpy")  # x / 0 is ±Inf or NaN, as in torch
def _karcher_step_range(
    mean: np.ndarray,
    gradient: np.ndarray,
    cos_step: np.float32,
    sin_step: np.float32,
    step: np.float32,
    out: np.ndarray,
    out32: np.ndarray,
    lo: int,
    hi: int,
) -> None:
    m, g, o, o32 = mean[lo:hi], gradient[lo:hi], out[lo:hi], out32[lo:hi]
    for j in range(hi - lo):  # indices from 0 over slices: numba then vectorises (not over range(lo, hi))
        bits = _round(_rounded(cos_step * _value(m[j])) + _rounded(sin_step * _rounded(_value(g[j]) / step)))
        o[j] = bits
        o32[j] = _value(bits)


@njit(nogil=True, cache=True, error_model="numpy")  # x / 0 is ±Inf or NaN, as in torch
def _divide_range(x: np.ndarray, divisor: np.float32, out: np.ndarray, lo: int, hi: int) -> None:
    xs, o = x[lo:hi], out[lo:hi]
    for j in range(hi - lo):
        o[j] = _round(_value(xs[j]) / divisor)


class KarcherSteps:
    """The elementwise steps of the Karcher mean (merge/methods/spherical.py) for bfloat16 tensors on the CPU, each
    one pass, with the bits of torch's ops (about twenty passes per iteration, each rounding to bfloat16):

        Σ_i w_i u_i                                   (`weighted_sum`, μ_0 before it is normalised)
        g  = Σ_i c_i (u_i − cos Ω_i · μ)              (`gradient_of`, c_i = α_i Ω_i / sin Ω_i)
        μ' = cos ‖g‖ · μ + sin ‖g‖ · g / ‖g‖          (`step`)
        x / ‖x‖                                       (`divide`)

    as torch evaluates them: every product, difference and sum rounds to bfloat16; a Python float is a float32
    operand, a 0-d float32 tensor on the left of `*` (cos ‖g‖, sin ‖g‖) is rounded to bfloat16 first and one on the
    right of `/` is not. The sums also come in float32, for torch's norm of them, in one float32 buffer per tensor
    (a float32 result is valid until the next call); the bfloat16 results are fresh tensors (numba vectorises no
    loop whose output may alias an input)."""

    def __init__(self, like: torch.Tensor) -> None:
        self.float32 = torch.empty(like.shape, dtype=torch.float32)  # from torch's allocator, as `.float()` would be
        self.float32_flat = self.float32.view(-1).numpy()

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """‖x‖ in float32, as torch.linalg.vector_norm(x.float()) (the same float32 values, in a reused buffer)."""
        return torch.linalg.vector_norm(self.float32.copy_(x))

    def weighted_sum(
        self, points: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ w_i u_i accumulated from zero in order, and its float32 copy."""
        flats = tuple(_bits(u) for u in points)
        factors = np.array(weights, np.float32)
        out = torch.empty_like(points[0])
        bits, bits32 = _bits(out), self.float32_flat
        _parallel(lambda lo, hi: _weighted_sum_range(flats, factors, bits, bits32, lo, hi), bits.size)
        return out, self.float32

    def gradient_of(
        self, mean: torch.Tensor, terms: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ c (u − cos · μ) over terms (cos, c, u) accumulated from zero in order, and its float32 copy."""
        if not terms:
            return torch.zeros_like(mean), self.float32.zero_()
        points = tuple(_bits(u) for _, _, u in terms)
        cosines = np.array([float(cos) for cos, _, _ in terms], np.float32)  # bfloat16 values: exact
        coefs = np.array([float(coef) for _, coef, _ in terms], np.float32)
        out = torch.empty_like(mean)
        flat_mean, bits, bits32 = _bits(mean), _bits(out), self.float32_flat
        _parallel(
            lambda lo, hi: _karcher_gradient_range(flat_mean, points, cosines, coefs, bits, bits32, lo, hi), bits.size
        )
        return out, self.float32

    def step(self, mean: torch.Tensor, gradient: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos ‖g‖ · μ + sin ‖g‖ · g / ‖g‖ (step = ‖g‖, float32), and its float32 copy."""
        cos_step = np.float32(float(torch.cos(step).to(torch.bfloat16)))
        sin_step = np.float32(float(torch.sin(step).to(torch.bfloat16)))
        length = np.float32(float(step))
        out = torch.empty_like(mean)
        flat_mean, flat_gradient, bits, bits32 = _bits(mean), _bits(gradient), _bits(out), self.float32_flat
        _parallel(
            lambda lo, hi: _karcher_step_range(
                flat_mean, flat_gradient, cos_step, sin_step, length, bits, bits32, lo, hi
            ),
            bits.size,
        )
        return out, self.float32

    def divide(self, x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        """x / divisor (a float32 0-d tensor)."""
        flat, value = _bits(x), np.float32(float(divisor))
        out = torch.empty_like(x)
        bits = _bits(out)
        _parallel(lambda lo, hi: _divide_range(flat, value, bits, lo, hi), flat.size)
        return out


@njit(nogil=True, cache=True)
def _weighted_column_sum_range(units: np.ndarray, weights: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    total = np.empty(ROW, np.float32)
    for start in range(lo, hi, ROW):
        size = min(ROW, hi - start)
        total[:size] = 0
        for i in range(units.shape[0]):
            u, w = units[i, start : start + size], weights[i]
            for jj in range(size):
                total[jj] += _rounded(_value(u[jj]) * w)
        o = out[start : start + size]
        for jj in range(size):
            o[jj] = _round(total[jj])


@njit(nogil=True, cache=True, error_model="numpy")
def _normalized_products_range(
    mean: np.ndarray, norm: np.float32, units: np.ndarray, out: np.ndarray, products: np.ndarray, lo: int, hi: int
) -> None:
    m, o = mean[lo:hi], out[lo:hi]
    for j in range(hi - lo):
        o[j] = _round(_value(m[j]) / norm)
    for i in range(units.shape[0]):
        u, p = units[i, lo:hi], products[i, lo:hi]
        for j in range(hi - lo):
            p[j] = _round(_value(u[j]) * _value(o[j]))


@njit(nogil=True, cache=True)
def _tangent_sum_range(
    units: np.ndarray, dots: np.ndarray, mean: np.ndarray, weights: np.ndarray, out: np.ndarray, lo: int, hi: int
) -> None:
    total = np.empty(ROW, np.float32)
    for start in range(lo, hi, ROW):
        size = min(ROW, hi - start)
        total[:size] = 0
        m = mean[start : start + size]
        for i in range(units.shape[0]):
            u, d, w = units[i, start : start + size], dots[i], weights[i]
            for jj in range(size):
                total[jj] += _rounded(_rounded(_value(u[jj]) - _rounded(d * _value(m[jj]))) * w)
        o = out[start : start + size]
        for jj in range(size):
            o[jj] = _round(total[jj])


@njit(nogil=True, cache=True)
def _interpolate_range(
    mean: np.ndarray,
    tangent: np.ndarray,
    cos: np.float32,
    sin: np.float32,
    scale: np.float32,
    out: np.ndarray,
    lo: int,
    hi: int,
) -> None:
    m, t, o = mean[lo:hi], tangent[lo:hi], out[lo:hi]
    for j in range(hi - lo):
        o[j] = _round(_rounded(_rounded(_value(m[j]) * cos) + _rounded(_value(t[j]) * sin)) * scale)


class MultislerpSteps:
    """The column-wise steps of Multi-SLERP (merge/methods/spherical.py) for a (models, n) bfloat16 stack on the
    CPU of at most MAX_MODELS_IN_ORDER models, one pass each, with the bits of torch's ops (every product,
    difference and quotient rounds to bfloat16; a sum over the models adds the rounded terms in float32 from +0.0
    in model order and rounds once). The whole-tensor norms and the dot products' sums stay torch's."""

    def units(self, flat: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
        """flat / divisors, one bfloat16 divisor per row."""
        out = torch.empty_like(flat)
        for row, out_row, divisor in zip(_rows(flat), _rows(out), _values(divisors)):
            _parallel(
                lambda lo, hi, row=row, out_row=out_row, d=divisor: _divide_range(row, d, out_row, lo, hi), row.size
            )
        return out

    def weighted_sum(self, units: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i w_i u_i per column."""
        out = torch.empty(units.shape[1], dtype=torch.bfloat16)
        rows, bits, values = _rows(units), _bits(out), _values(weights)
        _parallel(lambda lo, hi: _weighted_column_sum_range(rows, values, bits, lo, hi), bits.size)
        return out

    def normalized_products(
        self, mean: torch.Tensor, norm: torch.Tensor, units: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """μ / ‖μ‖ (a bfloat16 0-d norm) and its products with the rows, u_i ⊙ μ."""
        out, products = torch.empty_like(mean), torch.empty_like(units)
        flat_mean, bits, rows, product_rows = _bits(mean), _bits(out), _rows(units), _rows(products)
        value = np.float32(float(norm))
        _parallel(
            lambda lo, hi: _normalized_products_range(flat_mean, value, rows, bits, product_rows, lo, hi), bits.size
        )
        return out, products

    def tangent(
        self, units: torch.Tensor, dots: torch.Tensor, mean: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Σ_i w_i (u_i − ⟨u_i, μ⟩ μ) per column (`dots` the N bfloat16 ⟨u_i, μ⟩)."""
        out = torch.empty_like(mean)
        rows, flat_mean, bits = _rows(units), _bits(mean), _bits(out)
        dot_values, weight_values = _values(dots), _values(weights)
        _parallel(
            lambda lo, hi: _tangent_sum_range(rows, dot_values, flat_mean, weight_values, bits, lo, hi), bits.size
        )
        return out

    def interpolate(
        self, mean: torch.Tensor, tangent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """(μ cos + τ sin) · scale, with bfloat16 0-d cos, sin and scale."""
        out = torch.empty_like(mean)
        flat_mean, flat_tangent, bits = _bits(mean), _bits(tangent), _bits(out)
        c, s, k = (np.float32(float(x)) for x in (cos, sin, scale))
        _parallel(lambda lo, hi: _interpolate_range(flat_mean, flat_tangent, c, s, k, bits, lo, hi), bits.size)
        return out


def _rows(t: torch.Tensor) -> np.ndarray:
    """A contiguous (rows, n) bfloat16 tensor's bits, as a 2-d array (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16)


def _values(t: torch.Tensor) -> np.ndarray:
    """A small bfloat16 tensor's values as float32 (exact)."""
    return t.reshape(-1).float().numpy().astype(np.float32)
