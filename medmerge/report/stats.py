"""Paired significance tests between two models scored on the same documents. Pure functions on arrays."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar test on paired 0/1 outcomes (McNemar 1947; exact form = binomial sign test).

    With n01 = #{a=1, b=0} and n10 = #{a=0, b=1}, n = n01 + n10, under H0 each discordant doc favours either
    model with probability 1/2:

        p = min(1, 2 * sum_{k=0}^{min(n01, n10)} C(n, k) / 2^n)

    Concordant docs carry no information; n = 0 gives p = 1.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError("paired outcomes must have the same length")
    if not np.isin(x, (0.0, 1.0)).all() or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("McNemar's test needs 0/1 outcomes")
    n01 = int(((x == 1) & (y == 0)).sum())
    n10 = int(((x == 0) & (y == 1)).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(n01, n10) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integer ratio, then one rounding


def paired_bootstrap(
    strata: Sequence[tuple[Sequence[float], Sequence[float]]],
    weights: Sequence[float] | None = None,
    iterations: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired bootstrap test of delta = sum_s w_s (mean(a_s) - mean(b_s)) (Efron & Tibshirani 1993, ch. 16).

    Each stratum s (a task of a group; a single task is one stratum) holds per-document scores of the two models on
    the same documents. Documents are resampled with replacement within each stratum, B = `iterations` times,
    keeping each document's pair together; d*_b is delta on resample b. The null distribution is the bootstrap
    distribution shifted to mean zero, so the two-sided p-value is

        p = (1 + #{b : |d*_b - delta| >= |delta|}) / (B + 1)

    Weights default to 1/S (the unweighted mean of tasks, as BioInstructQA's average). Returns (delta, p).
    """
    diffs = [np.asarray(a, dtype=float) - np.asarray(b, dtype=float) for a, b in strata]
    if not diffs or any(d.size == 0 for d in diffs):
        raise ValueError("every stratum needs at least one paired document")
    w = np.full(len(diffs), 1 / len(diffs)) if weights is None else np.asarray(weights, dtype=float)
    delta = float(sum(wi * d.mean() for wi, d in zip(w, diffs, strict=True)))
    rng = np.random.Generator(np.random.PCG64(seed))
    resampled = np.zeros(iterations)
    chunk = max(1, 2_000_000 // max(d.size for d in diffs))  # bounded memory: chunk x docs indices at a time
    for wi, d in zip(w, diffs, strict=True):
        for start in range(0, iterations, chunk):
            stop = min(iterations, start + chunk)
            picks = rng.integers(0, d.size, size=(stop - start, d.size))
            resampled[start:stop] += wi * d[picks].mean(axis=1)
    # Differences of exactly equal resamples must count as "as extreme": compare with a float tolerance.
    extreme = np.abs(resampled - delta) >= abs(delta) - 1e-12
    return delta, float((1 + extreme.sum()) / (iterations + 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979): p_(i) * (m - i + 1), made monotone, capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, p_values[i] * (len(p_values) - rank)))
        adjusted[i] = running
    return adjusted
