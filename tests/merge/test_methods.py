"""Known-answer and property tests of the pure merge functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merge.methods import METHODS, REQUIRED, MergeCall
from merge.methods.arcee_fusion import arcee_fusion
from merge.methods.common import BLOCK, MergeError
from merge.methods.fused_bf16 import bernoulli_keep
from merge.methods.linear import linear
from merge.methods.model_stock import model_stock
from merge.methods.nearswap import nearswap
from merge.methods.passthrough import passthrough
from merge.methods.ram import ram
from merge.methods.sce import sce
from merge.methods.slerp import slerp
from merge.methods.spherical import karcher_mean, multislerp, nuslerp, nuslerp_t
from merge.methods.task_vectors import (
    _magnitude_counts,
    _row_ranks,
    consensus_mask,
    exact_sum,
    infinity_bits,
    magnitude_prune,
    merge_task_vectors,
    outlier_prune,
    random_prune,
    rank_random_prune,
    rescale_l1,
)


def merged(
    method: str,
    base: torch.Tensor,
    others: list[torch.Tensor],
    weights: list[float],
    densities: list[float] | None = None,
    seed: int | None = None,
    **shared: object,
) -> torch.Tensor:
    """A task-vector method through its declaration, as the runner calls it (declared defaults, base first)."""
    spec = METHODS[method]
    defaults = {p.name: p.default for p in spec.params if not p.per_model}
    own = {p.name: p.default for p in spec.params if p.per_model and p.default not in (REQUIRED, None)}
    per_model = [own | {"weight": w, "density": d} for w, d in zip(weights, densities or [1.0] * len(weights))]
    rng = None if seed is None else np.random.default_rng(seed)
    return spec.apply(MergeCall([base, *others], 0, defaults | shared, [{}, *per_model], rng))


def test_linear_hand_computed() -> None:
    a, b = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 0.0, 4.0])
    assert torch.equal(linear([a, b], [1.0, 3.0]), torch.tensor([2.5, 0.5, 2.0]))  # (a + 3b) / 4
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=False), torch.tensor([10.0, 2.0, 8.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_weights_one_zero_returns_first_model_exactly(dtype: torch.dtype) -> None:
    a, b = torch.randn(64, 32).to(dtype), torch.randn(64, 32).to(dtype)
    out = linear([a, b], [1.0, 0.0])
    assert out.dtype == dtype and torch.equal(out, a)


def test_slerp_endpoints_are_exact() -> None:
    v0, v1 = torch.randn(300, 7).bfloat16(), torch.randn(300, 7).bfloat16()
    assert torch.equal(slerp(0.0, v0, v1), v0)
    assert torch.equal(slerp(1.0, v0, v1), v1)


def test_slerp_orthogonal_unit_vectors_hand_computed() -> None:
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = slerp(0.5, v0, v1)
    assert torch.allclose(half, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-7)
    third = slerp(1 / 3, v0, v1)  # angle 30 degrees from v0
    assert torch.allclose(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)


def test_slerp_keeps_norm_on_the_arc_where_lerp_shrinks() -> None:
    v0, v1 = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    assert torch.linalg.vector_norm(slerp(0.5, v0, v1)).item() == pytest.approx(2.0, abs=1e-6)


def test_slerp_colinear_falls_back_to_lerp() -> None:
    v0 = torch.tensor([1.0, 2.0, 3.0])
    v1 = 2 * v0  # same direction: sin(omega) = 0
    assert torch.allclose(slerp(0.25, v0, v1), 0.75 * v0 + 0.25 * v1)
    assert torch.allclose(slerp(0.25, v0, -v0), 0.75 * v0 - 0.25 * v0)  # antipodal too


def test_slerp_spans_several_blocks() -> None:
    v0, v1 = torch.randn(BLOCK * 2 + 5), torch.randn(BLOCK * 2 + 5)
    cos = torch.dot(v0.double(), v1.double()) / (v0.double().norm() * v1.double().norm())
    omega = math.acos(cos.item())
    expected = (math.sin(0.7 * omega) * v0.double() + math.sin(0.3 * omega) * v1.double()) / math.sin(omega)
    assert torch.allclose(slerp(0.3, v0, v1).double(), expected, atol=1e-5)


def test_task_arithmetic_hand_computed() -> None:
    base = torch.tensor([1.0, 1.0])
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])  # deltas [1,-1] and [0,2]
    assert torch.equal(merged("task_arithmetic", base, [a, b], [0.5, 1.0]), torch.tensor([1.5, 2.5]))
    assert torch.allclose(
        merged("task_arithmetic", base, [a, b], [0.5, 1.0], normalize=True, **{"lambda": 3.0}),
        base + 3.0 * torch.tensor([0.5, 1.5]) / 1.5,
    )


def test_ties_hand_computed() -> None:
    base = torch.zeros(4)
    d1 = torch.tensor([3.0, -2.0, 0.5, 1.0])  # density 0.5 keeps 3 and -2
    d2 = torch.tensor([1.0, 4.0, -0.1, -3.0])  # keeps 4 and -3
    out = merged("ties", base, [d1, d2], [1.0, 1.0], [0.5, 0.5])
    # trimmed: [3,-2,0,0], [0,4,0,-3]; elected signs: +, + (4-2), 0->+ , -; disjoint means:
    assert torch.equal(out, torch.tensor([3.0, 4.0, 0.0, -3.0]))
    weighted = merged("ties", base, [d1, d2], [1.0, 0.25], [0.5, 0.5], normalize=False)
    # weighted deltas [3,-2,0,0], [0,1,0,-.75]: signs +, - (1-2<0), +, -
    assert torch.equal(weighted, torch.tensor([3.0, -2.0, 0.0, -0.75]))


def test_ties_one_model_density_one_equals_task_arithmetic() -> None:
    base, x = torch.randn(50, 20), torch.randn(50, 20)
    for w in (1.0, 0.4):
        assert torch.equal(
            merged("ties", base, [x], [w], [1.0], normalize=False), merged("task_arithmetic", base, [x], [w])
        )


def test_magnitude_prune_keeps_k_largest_ties_by_index() -> None:
    delta = torch.tensor([1.0, -3.0, 2.0, -2.0, 2.0, 0.5])
    # k = 3: -3 plus the first two of the three entries tied at |2|
    assert torch.equal(magnitude_prune(delta, 0.5), torch.tensor([0.0, -3.0, 2.0, -2.0, 0.0, 0.0]))
    assert torch.equal(magnitude_prune(delta, 1.0), delta)
    assert int((magnitude_prune(delta, 0.01) != 0).sum()) == 1  # at least one entry survives


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_magnitude_prune_matches_a_stable_sort(dtype: torch.dtype) -> None:
    delta = (torch.randn(40_000) * 0.01).to(dtype)
    for density in (0.1, 0.5, 0.9):
        k = int(density * delta.numel())
        order = torch.sort(delta.abs().double(), descending=True, stable=True).indices[:k]
        expected = torch.zeros_like(delta)
        expected[order] = delta[order]
        assert torch.equal(magnitude_prune(delta, density), expected)


def mask(seed: int, delta: torch.Tensor, density: float) -> torch.Tensor:
    """The mask a DARE method draws for its first model from a generator seeded `seed`."""
    key = int(np.random.default_rng(seed).integers(2**64, size=1, dtype=np.uint64)[0])
    return bernoulli_keep(key, delta.numel(), density)


def test_bernoulli_keep_is_keyed_counter_based_and_keeps_density() -> None:
    a, b, other = bernoulli_keep(7, 300_000, 0.2), bernoulli_keep(7, 300_000, 0.2), bernoulli_keep(8, 300_000, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert a.float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert torch.equal(bernoulli_keep(7, 1000, 0.2), a[:1000])  # entry j's draw depends on (key, j) only
    assert bool(bernoulli_keep(7, 1000, 1.0).all()) and not bool(bernoulli_keep(7, 1000, 1e-12).any())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(bernoulli_keep(7, 300_000, 0.2), a)  # one range instead of one per thread
    finally:
        torch.set_num_threads(threads)


def test_random_prune_is_seeded_rescales_l1_and_keeps_about_density() -> None:
    delta = torch.randn(200, 100)
    a = rescale_l1(delta, random_prune(delta, mask(5, delta, 0.3)))
    b = rescale_l1(delta, random_prune(delta, mask(5, delta, 0.3)))
    assert torch.equal(a, b)
    assert (a != 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert a.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    raw = random_prune(delta, mask(5, delta, 0.3))
    assert torch.equal(raw != 0, a != 0) and torch.equal(raw[raw != 0], delta[raw != 0])


def test_l1_sums_are_exact_for_16_bit_floats() -> None:
    t = (torch.randn(3 * BLOCK // 2) * 0.01).bfloat16()
    assert exact_sum(_magnitude_counts(t), t.dtype) == math.fsum(t.double().abs().tolist())


def test_random_prune_rescale_matches_the_exact_l1_ratio() -> None:
    delta = (torch.randn(3 * BLOCK // 2) * 0.01).bfloat16()
    keep = torch.rand(delta.numel()) < 0.4
    before = math.fsum(delta.double().abs().tolist())
    after = math.fsum(delta[keep].double().abs().tolist())
    expected = ((delta * keep).float() * (before / after)).bfloat16()
    assert torch.equal(rescale_l1(delta, random_prune(delta, keep)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_rescale_by_density_is_the_papers_one_over_p(dtype: torch.dtype) -> None:
    delta = (torch.randn(3 * BLOCK // 2) * 0.01).to(dtype)
    base = torch.zeros_like(delta)
    keep = mask(4, delta, 0.4)  # the method draws the same mask from the same generator
    papers = merged("dare_linear", base, [delta], [1.0], [0.4], seed=4, rescale_by_density=True)
    assert torch.equal(papers, ((delta * keep).float() * (1 / 0.4)).to(dtype))  # τ̂ = m ⊙ τ / p, rounded once
    l1 = merged("dare_linear", base, [delta], [1.0], [0.4], seed=4)
    assert torch.equal(papers != 0, l1 != 0) and not torch.equal(papers, l1)  # same entries, other scale
    raw = merged("dare_linear", base, [delta], [1.0], [0.4], seed=4, rescale=False, rescale_by_density=True)
    assert torch.equal(raw, delta * keep)


def test_dare_rescale_by_density_reaches_the_method_from_a_recipe(tiny, write_recipe, tmp_path) -> None:
    from merge.run import run_merge
    from tests.conftest import load_weights

    def merged(**extra: object) -> dict[str, torch.Tensor]:
        recipe = {
            "merge_method": "dare_linear",
            "base_model": str(tiny["base"]),
            "parameters": extra,
            "models": [
                {"model": str(tiny["base"])},
                {"model": str(tiny["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}},
            ],
        }
        out = tmp_path / f"out{len(extra)}"
        run_merge(write_recipe(recipe, f"r{len(extra)}.yaml"), out, seed=3)
        return load_weights(out)

    base, ft1 = load_weights(tiny["base"]), load_weights(tiny["ft1"])
    name = "model.layers.0.mlp.up_proj.weight"
    papers, default = merged(rescale_by_density=True), merged()
    kept = papers[name] != base[name]
    expected = base[name] + (ft1[name] - base[name]) * kept / 0.5  # θ_base + τ ⊙ m / p on the kept entries
    assert torch.allclose(papers[name], expected, atol=1e-6) and not torch.equal(papers[name], default[name])


def test_random_prune_independent_of_thread_count() -> None:
    delta = torch.randn(1000, 300).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rescale_l1(delta, random_prune(delta, mask(9, delta, 0.5)))
        torch.set_num_threads(max(2, threads))
        many = rescale_l1(delta, random_prune(delta, mask(9, delta, 0.5)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_dare_density_one_is_deterministic_and_equals_no_pruning() -> None:
    base, x, y = torch.randn(30, 30), torch.randn(30, 30), torch.randn(30, 30)
    ones = [1.0, 1.0]
    assert torch.equal(
        merged("dare_linear", base, [x, y], [0.5, 0.5], ones, seed=0),
        merged("task_arithmetic", base, [x, y], [0.5, 0.5]),
    )
    assert torch.equal(
        merged("dare_ties", base, [x, y], ones, ones, seed=0, normalize=True), merged("ties", base, [x, y], ones, ones)
    )
    for method in ("della", "della_linear", "breadcrumbs", "breadcrumbs_ties"):  # density 1: nothing is dropped
        consensus = "ties" if method in ("della", "breadcrumbs_ties") else "task_arithmetic"
        normalize = method == "della"
        assert torch.equal(
            merged(method, base, [x, y], ones, ones, seed=0, normalize=normalize, rescale=False),
            merged(consensus, base, [x, y], ones, ones, normalize=normalize),
        ), method


def test_sign_consensus_zero_votes_are_positive_and_zero_divisor_is_one() -> None:
    base = torch.zeros(2)
    out = merge_task_vectors(
        base, [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], [1.0, 1.0], sign_consensus=True, normalize=True
    )
    assert torch.equal(out, torch.tensor([1.0, 0.0]))  # tie -> '+' wins; all-zero column stays 0


def test_passthrough() -> None:
    x = torch.randn(3, 3)
    assert passthrough(x) is x
    assert torch.equal(passthrough(x, 2.0), 2 * x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dare_same_bytes_on_gpu_and_cpu() -> None:
    base, x = torch.randn(512, 256).bfloat16(), torch.randn(512, 256).bfloat16()
    cpu = merged("dare_ties", base, [x], [0.5], [0.5], seed=3)
    gpu = merged("dare_ties", base.cuda(), [x.cuda()], [0.5], [0.5], seed=3).cpu()
    assert torch.equal(cpu, gpu)


def test_breadcrumbs_drops_the_outliers_and_the_smallest() -> None:
    delta = torch.tensor([0.1, -5.0, 2.0, -3.0, 0.5, 1.0, 4.0, -0.2, 0.3, 6.0])
    # n 10, k = 5 kept, ⌊0.1·10⌋ = 1 outlier (6) dropped, then the 4 smallest (0.1, -0.2, 0.3, 0.5)
    expected = torch.tensor([0.0, -5.0, 2.0, -3.0, 0.0, 1.0, 4.0, 0.0, 0.0, 0.0])
    assert torch.equal(outlier_prune(delta, 0.5, 0.1), expected)
    # density + gamma > 1: fewer outliers go, so k = 9 entries still survive (only 6 is dropped)
    assert torch.equal(outlier_prune(delta, 0.95, 0.1), delta * (delta != 6.0))
    assert torch.equal(outlier_prune(delta, 1.0, 0.1), delta)  # density 1 keeps everything, outliers too
    tied = torch.tensor([1.0, -1.0, 1.0, 2.0])  # ties rank by index: k 2, no outlier -> the last two in order
    assert torch.equal(outlier_prune(tied, 0.5, 0.0), torch.tensor([0.0, 0.0, 1.0, 2.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_breadcrumbs_16_bit_band_equals_the_stable_sort(dtype: torch.dtype) -> None:
    """16-bit deltas rank by a histogram of their bit patterns; the mask is the stable sort's, ties at both edges
    (few distinct values), blocks (2.5M entries), signed zeros and Inf/NaN included."""

    def by_sort(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
        n, flat = delta.numel(), delta.reshape(-1)
        k = int(density * n)
        bottom = max(0, n - k - int(gamma * n))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(flat.abs().float(), stable=True).indices[bottom : bottom + k]] = True
        return flat * keep

    rng = np.random.default_rng(0)
    for case in range(60):
        n = int(rng.choice([1, 3, 10, 5000, 70_000, 2_500_000]))
        levels = int(rng.choice([2, 5, 100_000]))
        delta = torch.from_numpy(rng.integers(-levels, levels, n).astype(np.float32) * 1e-3).to(dtype)
        if case % 4 == 0 and n > 7:
            delta[2], delta[4], delta[5], delta[6] = float("inf"), float("nan"), -float("inf"), -0.0
            if case % 8 == 0:  # a NaN of another payload: the sort ranks all NaNs equal, so the sort is used
                delta.view(torch.int16)[7] = infinity_bits(dtype) + 5
        density, gamma = float(rng.choice([0.01, 0.5, 0.95])), float(rng.choice([0.0, 0.01, 0.3]))
        got, want = outlier_prune(delta, density, gamma), by_sort(delta, density, gamma)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (n, levels, density, gamma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_della_ranks_equal_the_stable_sort(dtype: torch.dtype) -> None:
    """DELLA's ranks within a row (a radix sort of 16-bit patterns, or the inverse of a stable sort) are the
    stable sort's: ties by index, signed zeros equal, every NaN equal and last, whatever its payload."""
    rng = np.random.default_rng(1)
    for case in range(40):
        rows, m = int(rng.choice([1, 3, 70])), int(rng.choice([1, 2, 300, 5000]))
        levels = int(rng.choice([2, 5, 100_000]))
        x = torch.from_numpy(rng.integers(-levels, levels, (rows, m)).astype(np.float32) * 1e-3).to(dtype)
        if case % 3 == 0 and x.numel() > 8:
            flat = x.view(-1)
            flat[1], flat[3], flat[4], flat[7] = float("inf"), float("nan"), -float("nan"), -0.0
            if dtype != torch.float32:
                flat.view(torch.int16)[5] = infinity_bits(dtype) + 5
        expected = torch.sort(x.abs().float(), dim=1, stable=True).indices.argsort(dim=1)
        assert torch.equal(_row_ranks(x.abs()), expected), (rows, m, levels)


def test_della_keeps_density_on_average_and_large_entries_more_often() -> None:
    delta = torch.randn(400, 500)
    uniform = torch.from_numpy(np.random.default_rng(0).random(delta.numel(), dtype=np.float32))
    kept = rank_random_prune(delta, 0.5, 0.2, uniform) != 0
    assert kept.float().mean().item() == pytest.approx(0.5, abs=0.01)
    order = delta.abs().argsort(dim=1)
    low, high = kept.gather(1, order[:, :50]).float().mean(), kept.gather(1, order[:, -50:]).float().mean()
    assert low.item() == pytest.approx(0.3 + 0.4 * 24.5 / 499, abs=0.02)  # p = (ρ − ε) + 2ε·r/(m − 1)
    assert high.item() == pytest.approx(0.7 - 0.4 * 24.5 / 499, abs=0.02)
    assert torch.equal(rank_random_prune(delta, 0.5, 0.2, uniform), delta * kept)  # the same draws, the same mask
    one = torch.tensor([[2.0], [3.0]])  # rows of one entry keep with p = density
    assert torch.equal(rank_random_prune(one, 0.5, 0.2, torch.tensor([0.49, 0.51])), torch.tensor([[2.0], [0.0]]))


def test_della_method_is_seeded_and_rescales_to_the_l1_norm() -> None:
    base, x = torch.zeros(300, 200), torch.randn(300, 200)
    a = merged("della_linear", base, [x], [1.0], [0.4], seed=1, epsilon=0.1)
    assert torch.equal(a, merged("della_linear", base, [x], [1.0], [0.4], seed=1, epsilon=0.1))
    assert not torch.equal(a, merged("della_linear", base, [x], [1.0], [0.4], seed=2, epsilon=0.1))
    assert (a != 0).float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert a.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-4)


def test_nearswap_hand_computed() -> None:
    base, other = torch.zeros(3), torch.tensor([0.05, 1.0, -2.0])
    # |diff| 0.05, 1, 2 -> w = min(1, 0.1/|diff|) = 1, 0.1, 0.05
    assert torch.allclose(nearswap(0.1, base, other), torch.tensor([0.05, 0.1, -0.1]))
    assert torch.equal(nearswap(0.0, base, other), base)


def test_model_stock_angle_hand_computed() -> None:
    base = torch.tensor([1.0, 1.0])
    same = model_stock(base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([1.0, 0.0])])
    assert torch.equal(same, base + torch.tensor([1.0, 0.0]))  # cos 1 -> t 1: the average
    orthogonal = model_stock(base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])])
    assert torch.equal(orthogonal, base)  # cos 0 -> t 0: the base
    cos = 1 / math.sqrt(2)  # τ = [1, 0] and [1, 1]
    t = 2 * cos / (1 + cos)
    mixed = model_stock(base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([1.0, 1.0])])
    assert torch.allclose(mixed, base + t * torch.tensor([1.0, 0.5]))
    rows = model_stock(
        torch.zeros(2, 2),
        [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])],
        filter_wise=True,
    )
    assert torch.equal(rows, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # row 0 agrees (t 1), row 1 is orthogonal


def test_every_method_names_its_paper_and_random_methods_take_a_generator() -> None:
    assert all(m.paper for m in METHODS.values() if m.name != "passthrough")
    assert {m.name for m in METHODS.values() if m.random} == {"dare_linear", "dare_ties", "della", "della_linear"}


def test_nuslerp_whole_tensor_is_slerp_and_rows_get_their_own_angle() -> None:
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert torch.allclose(nuslerp(0.3, a, b), slerp(0.3, a, b))
    rows = nuslerp(0.5, a, b, flatten=False)
    h = math.sqrt(0.5)  # row 0: 90 degrees apart, midway = (h, h); row 1: colinear, lerp = 1.5
    assert torch.allclose(rows, torch.tensor([[h, h], [1.5, 0.0]]))
    columns = nuslerp(0.5, a.T, b.T, flatten=False, columns=True)
    assert torch.allclose(columns, rows.T)  # a column of x is a row of x.T
    assert nuslerp_t([0.7, 0.3]) == pytest.approx(0.3) and nuslerp_t([1.0, -1.0]) == 0.5


def test_nuslerp_about_a_base_interpolates_the_task_vectors() -> None:
    base = torch.tensor([5.0, 5.0])
    out = merged("nuslerp", base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])], [1.0, 1.0])
    h = math.sqrt(0.5)
    assert torch.allclose(out, base + torch.tensor([h, h]))


def test_multislerp_hand_computed_and_its_degenerate_cases() -> None:
    e1, e2 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    # units e1, e2; mean direction (1,1)/√2; tangent parts cancel -> exactly the mean direction, norm 2
    assert torch.allclose(multislerp([e1, e2], [1.0, 1.0]), torch.tensor([math.sqrt(2), math.sqrt(2)]))
    assert torch.equal(multislerp([e1], [1.0]), e1)
    # opposed with equal weights: no mean direction; two inputs fall back to the weighted sum, three refuse
    assert torch.allclose(multislerp([e1, -e1], [1.0, 1.0]), torch.zeros(2))
    with pytest.raises(MergeError, match="weighted mean of the models' directions is zero"):
        multislerp([e1, -e1, torch.zeros(2)], [1.0, 1.0, 0.0])


def test_karcher_mean_of_two_is_their_slerp_midpoint_and_of_three_the_symmetric_point() -> None:
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    h = math.sqrt(0.5)
    assert torch.allclose(karcher_mean([a, b]), 2.0 * torch.tensor([h, h, 0.0]), atol=1e-6)  # mean norm 2
    three = karcher_mean([torch.eye(3)[i] for i in range(3)], max_iter=50, tol=1e-9)
    assert torch.allclose(three, torch.full((3,), 1 / math.sqrt(3)), atol=1e-6)
    assert torch.equal(karcher_mean([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    assert torch.allclose(karcher_mean([a, torch.zeros(3)]), 0.5 * a)  # a zero input has no direction: a's, norm halved


def test_sce_weights_by_energy_and_erases_minority_signs() -> None:
    base = torch.zeros(4)
    x1, x2 = torch.tensor([2.0, 2.0, -1.0, 0.0]), torch.tensor([1.0, -1.0, -1.0, 0.0])
    # energies mean(τ²) = 9/4 and 3/4 -> η = 0.75, 0.25; sign sums 3, 1, -2, 0 (0 counts as +)
    # entry 1: x2's -1 is erased -> 2; entry 2: both agree -> -1; entry 3: no votes -> 0
    assert torch.allclose(sce(base, [x1, x2]), torch.tensor([(0.75 * 2 + 0.25 * 1) / 1.0, 2.0, -1.0, 0.0]))
    # variances 0.25, 2.25, 0, 0: select_topk 0.5 of the 2 nonzero -> k = 1, only entry 1 survives
    assert torch.allclose(sce(base, [x1, x2], select_topk=0.5), torch.tensor([0.0, 2.0, 0.0, 0.0]))


def test_ram_takes_unique_changes_whole_and_averages_shared_ones() -> None:
    base = torch.zeros(4)
    x1, x2 = torch.tensor([1.0, 2.0, 0.0, 1e-6]), torch.tensor([0.0, 4.0, 3.0, 0.0])
    assert torch.equal(ram(base, [x1, x2]), torch.tensor([1.0, 3.0, 3.0, 0.0]))
    # RAM+: model 1 shares 1 entry, owns 1 -> ρ 1 -> λ 1 + 0.5·min(1, 0.4) = 1.2; model 2 the same
    plus = ram(base, [x1, x2], plus=(0.5, 0.4))
    assert torch.allclose(plus, torch.tensor([1.2, 3.0, 3.6, 0.0]))
    assert plus.dtype == torch.float32


def test_arcee_fusion_keeps_only_the_outlying_changes() -> None:
    base = torch.zeros(1, 9)
    other = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 5.0]])
    fused = arcee_fusion(base, other)
    # one row: one KL factor; scores ∝ |Δ|, quartiles 0.1, 0.1, 0.1 -> threshold 0.1·KL, every entry reaches it
    assert torch.allclose(fused, other)
    other2 = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 5.0]])
    fused2 = arcee_fusion(base, other2)  # Q1 0.3, Q2 0.5, Q3 0.7 -> threshold 1.1 (× KL): only 5.0 passes
    assert torch.allclose(fused2, torch.tensor([[0.0] * 8 + [5.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_arcee_fusion_quartiles_are_the_sorted_entries_at_floor_ranks(dtype: torch.dtype) -> None:
    from merge.methods.arcee_fusion import _lower_quartiles

    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 9, 10_001):
        x = (torch.randn(n, generator=generator) * 3).to(dtype)
        x[: n // 7] = 0.0  # ties, and a negative zero
        x[n // 2] = -0.0
        ranks = ((n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4)
        expected = [torch.sort(x.double()).values[r].item() for r in ranks]
        got = _lower_quartiles(x)
        assert [q.item() for q in got] == expected and all(q.dtype == dtype for q in got)


# --- consensus merging (TALL masks), Wang et al. 2024 ------------------------------------------------------


def test_tall_masks_and_their_consensus_hand_computed() -> None:
    t1, t2 = torch.tensor([1.0, 0.1, 0.0, 2.0]), torch.tensor([1.0, 0.0, 0.5, -2.0])
    # m_1 = |τ_1| ≥ 0.4|τ_2| = [T, T, F, T];  m_2 = |τ_2| ≥ 0.4|τ_1| = [T, F, T, T];  counts [2, 1, 1, 2]
    assert consensus_mask([t1, t2], [0.4, 0.4], 2).tolist() == [True, False, False, True]
    assert consensus_mask([t1, t2], [0.4, 0.4], 1).all()
    # λ_1 = 2: m_1 = |τ_1| ≥ 2|τ_2| = [F, T, F, F]; counts [1, 1, 1, 1]
    assert consensus_mask([t1, t2], [2.0, 0.4], 2).tolist() == [False] * 4
    assert consensus_mask([t1, t2], [2.0, 0.4], 1).tolist() == [True] * 4
    base = torch.zeros(4)
    # consensus_ta, k = 2: task arithmetic's τ_1 + τ_2 = [2, 0.1, 0.5, 0] where both masks hold
    assert merged("consensus_ta", base, [t1, t2], [1.0, 1.0]).tolist() == [2.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_consensus_that_keeps_everything_is_the_plain_merge_bit_for_bit(dtype: torch.dtype) -> None:
    """k = 0, or λ = 0 (every TALL mask holds every entry) with k up to the number of models, masks nothing:
    consensus_ta is task arithmetic and consensus_ties is TIES, to the bit (bfloat16 TIES runs fused)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(96, 33, generator=g).to(dtype)
    others = [base + 0.1 * torch.randn(96, 33, generator=g).to(dtype) for _ in range(3)]
    weights, densities = [0.5, 1.0, 0.7], [0.5, 0.3, 0.8]
    for plain, consensus in (("task_arithmetic", "consensus_ta"), ("ties", "consensus_ties")):
        expected = merged(plain, base, others, weights, densities)
        assert torch.equal(merged(consensus, base, others, weights, densities, k=0), expected)
        spec = METHODS[consensus]
        zero = [{"weight": w, "density": d, "tall_lambda": 0.0} for w, d in zip(weights, densities)]
        defaults = {p.name: p.default for p in spec.params if not p.per_model}
        everything = spec.apply(MergeCall([base, *others], 0, defaults | {"k": 3}, [{}, *zero]))
        assert torch.equal(everything, expected)
        assert not torch.equal(merged(consensus, base, others, weights, densities), expected)  # k = 2 drops some


def test_consensus_masks_where_few_models_agree_and_refuses_an_impossible_k() -> None:
    base = torch.zeros(2000)
    g = torch.Generator().manual_seed(1)
    others = [torch.randn(2000, generator=g) for _ in range(3)]
    deltas = others  # base 0
    mask = consensus_mask(deltas, [0.4] * 3, 2)
    out = merged("consensus_ta", base, others, [1.0] * 3)
    total = sum(deltas)
    assert torch.equal(out, torch.where(mask, total, torch.zeros(()))) and 0 < int(mask.sum()) < 2000
    check = METHODS["consensus_ta"].check
    per_model = [{}, *[{"weight": 1.0, "tall_lambda": 0.4}] * 2]  # the base first, as the plan passes them
    assert check({"k": 2, "normalize": False}, per_model) is None
    assert "k = 3 exceeds the 2 models" in check({"k": 3, "normalize": False}, per_model)


# --- LiNeS, Wang et al. 2025 ------------------------------------------------------------------------------------


def test_lines_scale_runs_from_alpha_at_the_shallowest_layer_to_alpha_plus_beta_at_the_deepest() -> None:
    from merge.methods.lines import lines_scale

    assert [lines_scale(0.5, 0.3, d) for d in (None, 0.0, 0.5, 1.0)] == [0.5, 0.5, 0.65, 0.8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lines_with_beta_zero_is_a_uniform_scale_of_task_arithmetic(dtype: torch.dtype) -> None:
    """The paper's property: β = 0 scales every layer alike, i.e. task arithmetic with λ = α, to the bit."""
    g = torch.Generator().manual_seed(4)
    base, *others = (torch.randn(300, generator=g).to(dtype) for _ in range(3))
    spec = METHODS["lines"]
    shared = {p.name: p.default for p in spec.params if not p.per_model} | {"alpha": 0.7, "beta": 0.0}
    per_model = [{}, *[{"weight": 1.0, "density": 1.0}] * 2]
    expected = merged("task_arithmetic", base, others, [1.0, 1.0], **{"lambda": 0.7})
    for depth in (None, 0.0, 0.4, 1.0):
        assert torch.equal(spec.apply(MergeCall([base, *others], 0, shared, per_model, depth=depth)), expected)


def test_lines_defaults_are_one_over_n_and_the_deepest_layer_keeps_the_sum() -> None:
    base, x, y = torch.zeros(4), torch.tensor([1.0, 2.0, 0.0, -4.0]), torch.tensor([3.0, 0.0, 1.0, 0.0])
    spec = METHODS["lines"]
    shared = {p.name: p.default for p in spec.params if not p.per_model}
    per_model = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    at = {d: spec.apply(MergeCall([base, x, y], 0, shared, per_model, depth=d)).tolist() for d in (None, 0.5, 1.0)}
    assert at[None] == [2.0, 1.0, 0.5, -2.0]  # α = 1/2: the average of the task vectors
    assert at[0.5] == [3.0, 1.5, 0.75, -3.0]  # α + β/2 = 3/4
    assert at[1.0] == [4.0, 2.0, 1.0, -4.0]  # α + β = 1: their sum


def test_lines_by_layer_from_a_recipe_as_a_method_and_as_a_post_step(tiny, write_recipe, tmp_path) -> None:
    """The `lines` method, `lines:` after task_arithmetic, and task_arithmetic with the λ gradient [α, α+β] (whose
    first value the embeddings, final norm and lm_head take) are one merge, to the bit; layer l of the 4 gets
    α + β·l/3 of the task vectors' sum."""
    from merge.run import run_merge
    from tests.conftest import load_weights

    models = [{"model": str(tiny[m]), "parameters": {"weight": 1.0}} for m in ("ft1", "ft2")]

    def merge(name: str, **recipe: object) -> dict[str, torch.Tensor]:
        recipe = {"base_model": str(tiny["base"]), "models": models, **recipe}
        run_merge(write_recipe(recipe, f"{name}.yaml"), tmp_path / name)
        return load_weights(tmp_path / name)

    method = merge("method", merge_method="lines", parameters={"alpha": 0.25, "beta": 0.5})
    post = merge("post", merge_method="task_arithmetic", lines={"alpha": 0.25, "beta": 0.5})
    gradient = merge("gradient", merge_method="task_arithmetic", parameters={"lambda": [0.25, 0.75]})
    base, ft1, ft2 = (load_weights(tiny[m]) for m in ("base", "ft1", "ft2"))
    for name in base:
        assert torch.equal(method[name], post[name]) and torch.equal(method[name], gradient[name]), name
    for layer in range(4):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        scale = 0.25 + 0.5 * layer / 3
        expected = base[name] + scale * ((ft1[name] - base[name]) + (ft2[name] - base[name]))
        assert torch.allclose(method[name], expected, atol=1e-6), layer
    name = "model.embed_tokens.weight"
    expected = base[name] + 0.25 * ((ft1[name] - base[name]) + (ft2[name] - base[name]))
    assert torch.allclose(method[name], expected, atol=1e-6)
    card = (tmp_path / "post" / "README.md").read_text()
    assert "LiNeS" in card and "0.25 + 0.5·l/(L−1)" in card


# --- PCB-Merging, Du et al. 2024 ---------------------------------------------------------------------------------


def _pcb_oracle(base: torch.Tensor, others: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """PCB written out entry by entry in float64 from the paper's steps, with sorted lists for the ranks."""
    n, d = len(others), base.numel()
    tau = [[float(x.reshape(-1)[j] - base.reshape(-1)[j]) for j in range(d)] for x in others]
    total = [sum(t[j] for t in tau) for j in range(d)]

    def norm(row: list[float]) -> list[float]:
        low, high = min(row), max(row)
        return [0.0 if high == low else (v - low) / (high - low) for v in row]

    scores, clamped = [], []
    for t in tau:
        ranked = sorted(abs(v) for v in t)
        low, high = ranked[int(d * 1e-4)], ranked[max(int(d * (1 - 1e-4)) - 1, 0)]
        a = [min(max(abs(v), low), high) for v in t]
        clamped.append([math.copysign(x, v) if v else 0.0 for x, v in zip(a, t)])
        beta = [math.exp(n * s * s) * math.tanh(v * tot) for s, v, tot in zip(norm(a), t, total)]
        threshold = sorted(beta)[min(int(d * (1 - ratio)), d - 1)]
        scores.append(norm([max(b, threshold) for b in beta]))
    merged = [
        sum(s[j] * c[j] for s, c in zip(scores, clamped)) / max(sum(s[j] for s in scores), 1e-12) for j in range(d)
    ]
    return base.double() + torch.tensor(merged, dtype=torch.float64).reshape(base.shape)


def test_pcb_matches_the_papers_steps_written_out() -> None:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(6, 7, generator=g, dtype=torch.float64)
    others = [base + torch.randn(6, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    for ratio in (0.1, 0.3, 1.0):
        assert torch.allclose(merged("pcb", base, others, [1.0] * 3, pcb_ratio=ratio), _pcb_oracle(base, others, ratio))


def test_pcb_keeps_the_top_ratio_drops_opposed_entries_and_averages_within_the_models() -> None:
    from merge.methods.pcb import pcb

    g = torch.Generator().manual_seed(12)
    base = torch.zeros(5000)
    agree = torch.rand(5000, generator=g) + 0.5
    x, y = agree.clone(), agree * 0.5
    y[:100] = -3.0  # here x opposes y and their sum: tanh(τ_x · Σ τ) < 0, x's lowest balance scores
    out = pcb(base, [x], 0.2)
    assert int((out != 0).sum()) <= 1000  # one model: only its top 20% survive, taken whole
    both = pcb(base, [x, y], 0.1)
    assert torch.allclose(both[:100], y[:100])  # x's opposed entries are dropped; y's, large, are kept whole
    kept = both != 0
    low, high = torch.minimum(x, y), torch.maximum(x, y)
    assert bool(((both[kept] >= low[kept] - 1e-6) & (both[kept] <= high[kept] + 1e-6))[100:].all())
    assert torch.equal(pcb(base, [x, y], 0.1, lambda_=0.0), base)


# --- WIDEN, Yu et al. 2024 ---------------------------------------------------------------------------------------


def _widen_oracle(base: torch.Tensor, others: list[torch.Tensor], t: float, s: float) -> torch.Tensor:
    """WIDEN written out column by column in float64 with Python lists: disentangle, rank, score, merge."""
    n, (rows, cols) = len(others), base.shape

    def column(w: torch.Tensor, j: int) -> list[float]:
        return [float(w[i, j]) for i in range(rows)]

    def scores(significance: list[list[float]]) -> list[list[float]]:
        out = [[0.0] * cols for _ in range(n)]
        for j in range(cols):
            exps = [math.exp(significance[m][j]) for m in range(n)]
            for m in range(n):
                mean = sum(significance[m]) / cols
                out[m][j] = s if significance[m][j] > mean * t else exps[m] / sum(exps)
        return out

    def ranked(values: list[float]) -> list[float]:
        order = sorted(range(cols), key=lambda j: (values[j], j))
        ranks = [0.0] * cols
        for position, j in enumerate(order):
            ranks[j] = position / cols
        return ranks

    magnitude_ranks, direction_ranks = [], []
    for x in others:
        dm, dd = [], []
        for j in range(cols):
            a, b = column(x, j), column(base, j)
            na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
            dm.append(abs(na - nb))
            dd.append(1 - sum(u * v for u, v in zip(a, b)) / (na * nb))
        magnitude_ranks.append(ranked(dm))
        direction_ranks.append(ranked(dd))
    sm, sd = scores(magnitude_ranks), scores(direction_ranks)
    out = base.clone().double()
    for m, x in enumerate(others):
        for j in range(cols):
            out[:, j] += 0.5 * (sm[m][j] + sd[m][j]) * (x[:, j] - base[:, j]).double()
    return out


def test_widen_matches_its_steps_written_out() -> None:
    g = torch.Generator().manual_seed(21)
    base = torch.randn(5, 9, generator=g, dtype=torch.float64)
    others = [base + 0.3 * torch.randn(5, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    for t, s in ((1.0, 1.0), (1.5, 0.7), (1e9, 1.0)):
        out = merged("widen", base, others, [1.0] * 3, above_average_value_ratio=t, score_calibration_value=s)
        assert torch.allclose(out, _widen_oracle(base, others, t, s)), (t, s)


def test_widen_of_one_model_is_that_model_and_token_embeddings_are_scored_by_token() -> None:
    from merge.methods.widen import widen

    g = torch.Generator().manual_seed(22)
    base = torch.randn(6, 4, generator=g)
    x = base + torch.randn(6, 4, generator=g)
    assert torch.allclose(widen(base, [x]), x)  # every score is s = 1 or a softmax over one model = 1
    assert torch.allclose(widen(base[0], [x[0]]), x[0])  # so for a vector
    y = base + torch.randn(6, 4, generator=g)
    rows = widen(base, [x, y], token_rows=True)
    assert torch.allclose(rows, widen(base.T, [x.T, y.T]).T)  # a token embedding's tokens are its rows
    spec = METHODS["widen"]
    shared = {p.name: p.default for p in spec.params}
    for name, expected in (("model.embed_tokens.weight", rows), ("model.layers.0.mlp.up_proj.weight", None)):
        out = spec.apply(MergeCall([base, x, y], 0, shared, [{}, {}, {}], name=name))
        assert torch.equal(out, expected if expected is not None else widen(base, [x, y]))
    with pytest.raises(MergeError, match="not 3-dimensional"):
        widen(base.reshape(2, 3, 4), [x.reshape(2, 3, 4)])


def test_widen_vectors_take_the_larger_change_whole() -> None:
    """A norm weight: where a model's |τ| is above its mean it counts whole (s = 1); elsewhere the models share
    by a softmax of |τ|."""
    from merge.methods.widen import widen

    base = torch.zeros(4)
    x, y = torch.tensor([2.0, 0.0, 0.1, 0.0]), torch.tensor([0.0, 0.1, 0.0, 0.0])
    out = widen(base, [x, y])
    share = torch.softmax(torch.tensor([0.1, 0.0]), dim=0)  # entry 2: x's 0.1 is below x's mean |τ| (0.525)
    assert torch.allclose(out, torch.tensor([2.0, 0.1, 0.1 * float(share[0]), 0.0]))
