"""The paired tests on cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medmerge.report.stats import holm, mcnemar_exact, paired_bootstrap


def test_mcnemar_exact_by_hand() -> None:
    # 1 doc only a gets right, 9 only b gets right, 5 both, 3 neither: n = 10 discordant, k = min(1, 9) = 1
    # p = 2 * (C(10,0) + C(10,1)) / 2^10 = 2 * 11 / 1024
    a = [1] * 1 + [0] * 9 + [1] * 5 + [0] * 3
    b = [0] * 1 + [1] * 9 + [1] * 5 + [0] * 3
    assert mcnemar_exact(a, b) == 22 / 1024
    assert mcnemar_exact(b, a) == 22 / 1024  # two-sided: symmetric
    assert mcnemar_exact([1, 0], [0, 1]) == 1.0  # 2 * (1 + 2) / 4 = 1.5, capped at 1
    assert mcnemar_exact([1, 1, 0], [1, 1, 0]) == 1.0  # no discordant docs carry no evidence
    # 6 to 0: p = 2 / 2^6
    assert mcnemar_exact([1] * 6, [0] * 6) == 2 / 64


def test_mcnemar_matches_an_exact_binomial_test_on_thousands_of_docs() -> None:
    from scipy.stats import binomtest

    rng = np.random.default_rng(0)
    a = (rng.random(4183) < 0.55).astype(float)
    b = (rng.random(4183) < 0.52).astype(float)
    n01, n10 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    assert mcnemar_exact(a, b) == pytest.approx(binomtest(n01, n01 + n10, 0.5).pvalue, rel=1e-9)


def test_mcnemar_rejects_non_binary_or_unpaired_scores() -> None:
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0.5, 1], [1, 0])
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact([1, 0, 1], [1, 0])


def test_bootstrap_identical_models_give_p_one_and_a_constant_shift_the_smallest_p() -> None:
    scores = [0.2, 0.9, 0.4, 0.7]
    assert paired_bootstrap([(scores, scores)], iterations=500) == (0.0, 1.0)
    # every resample of a constant difference is the difference itself: never as extreme as 0 -> p = 1/(B+1)
    delta, p = paired_bootstrap([([s + 0.1 for s in scores], scores)], iterations=499)
    assert delta == pytest.approx(0.1) and p == 1 / 500


def test_bootstrap_delta_is_the_weighted_mean_of_task_differences() -> None:
    strata = [([1, 1, 0, 0], [0, 0, 0, 0]), ([1, 0], [1, 1])]  # task means differ by +0.5 and -0.5
    assert paired_bootstrap(strata, iterations=10)[0] == pytest.approx(0.0)  # unweighted mean of tasks
    assert paired_bootstrap(strata, weights=[4 / 6, 2 / 6], iterations=10)[0] == pytest.approx(0.5 * 4 / 6 - 0.5 / 3)


def test_bootstrap_p_agrees_with_the_normal_approximation_on_a_large_sample() -> None:
    rng = np.random.default_rng(1)
    b = rng.random(2000)
    a = b + rng.normal(0.01, 0.25, 2000)
    d = a - b
    z = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    normal_p = math.erfc(abs(z) / math.sqrt(2))
    _, p = paired_bootstrap([(a, b)], iterations=20_000, seed=3)
    assert 0.001 < normal_p < 0.2  # a case in the interesting range, not a trivial one
    assert p == pytest.approx(normal_p, abs=0.01)


def test_bootstrap_is_reproducible_by_seed() -> None:
    strata = [([1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 1])]
    assert paired_bootstrap(strata, seed=5, iterations=300) == paired_bootstrap(strata, seed=5, iterations=300)


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04 -> 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.06, 0.04*1) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []
