"""The fused bfloat16 pipeline gives the torch pipeline's bits: every sparsification it takes, every rescale,
sign consensus on and off, normalize, lambda, negative and zero weights, signed zeros, ties at the TIES
threshold and at both edges of Breadcrumbs' band, NaN/Inf inputs (NaN compared as NaN: torch's own vectorised
and scalar conversions write different NaN bits), and any thread count. Also SCE's fused erase against its torch
steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge.methods import METHODS, REQUIRED, MergeCall, fused_bf16
from merge.methods.fused_bf16 import applies, bernoulli_keep, fused_task_vectors
from merge.methods.sce import sce
from merge.methods.task_vectors import magnitude_prune, merge_task_vectors, outlier_prune, random_prune, rescale_l1


def torch_pipeline(base, others, weights, mode, densities, gammas, keys, rescale, consensus, normalize, lambda_):
    def prune(delta: torch.Tensor, i: int) -> torch.Tensor:
        if mode == "magnitude":
            pruned = magnitude_prune(delta, densities[i])
        elif mode == "outliers":
            pruned = outlier_prune(delta, densities[i], gammas[i])
        else:
            keep = None if densities[i] >= 1 else bernoulli_keep(keys[i], delta.numel(), densities[i])
            pruned = random_prune(delta, keep)
            if rescale == "density" and pruned is not delta:
                return pruned.mul_(1 / densities[i])
        return rescale_l1(delta, pruned) if rescale == "l1" and pruned is not delta else pruned

    return merge_task_vectors(
        base,
        others,
        weights,
        prune=prune if mode else None,
        sign_consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    integer = {2: torch.int16, 4: torch.int32}[a.element_size()]
    differ = (a.view(integer) != b.view(integer)) & ~(a.isnan() & b.isnan())
    return not bool(differ.any())


def case(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    n = int(rng.choice([1, 7, 100, 5000, 70_000, 200_001]))
    scale = float(rng.choice([1e-3, 1.0, 1e30]))
    base = (torch.randn(n, generator=g) * scale).bfloat16()
    if seed % 3 == 0:  # zeros and negative zeros in the base
        base[: n // 3] = 0.0
        base[: n // 10] = -0.0
    others = []
    for _ in range(int(rng.integers(1, 5))):
        x = base + (torch.randn(n, generator=g) * scale * float(rng.choice([1e-3, 0.1, 1.0]))).bfloat16()
        if seed % 5 == 0:  # exact copies: many zero deltas, so many ties at the trim threshold
            x[: n // 2] = base[: n // 2]
        if seed % 17 == 0 and n > 10:
            x[3], x[5] = float("nan"), float("inf")
        others.append(x)
    k = len(others)
    mode = rng.choice([None, "magnitude", "random", "outliers"])
    settings = dict(
        weights=[float(rng.choice([0.5, 1.0, 0.3, -0.7, 0.0, 2.0])) for _ in range(k)],
        mode=mode,
        densities=[float(rng.choice([0.1, 0.5, 0.53, 0.9, 1.0])) for _ in range(k)],
        gammas=[float(rng.choice([0.0, 0.01, 0.1, 0.3])) for _ in range(k)],
        keys=[int(x) for x in rng.integers(0, 2**63, k)],
        rescale=rng.choice([None, "l1", *(["density"] if mode == "random" else [])]),
        consensus=bool(rng.integers(2)),
        normalize=bool(rng.integers(2)),
        lambda_=float(rng.choice([1.0, 0.3, 1.5, -1.0])),
    )
    if settings["normalize"] and not settings["consensus"] and sum(settings["weights"]) == 0:
        settings["normalize"] = False
    return dict(base=base, others=others, **settings)


def fused(c: dict) -> torch.Tensor:
    mode = c["mode"]
    return fused_task_vectors(
        c["base"],
        c["others"],
        c["weights"],
        magnitude_densities=c["densities"] if mode in ("magnitude", "outliers") else None,
        band_gammas=c["gammas"] if mode == "outliers" else None,
        random_keys=c["keys"] if mode == "random" else None,
        random_densities=c["densities"] if mode == "random" else None,
        rescale=c["rescale"],
        sign_consensus=c["consensus"],
        normalize=c["normalize"],
        lambda_=c["lambda_"],
    )


@pytest.mark.parametrize("seeds", [range(0, 40), range(40, 80), range(80, 120)])
def test_fused_equals_the_torch_pipeline_bit_for_bit(seeds: range) -> None:
    for seed in seeds:
        c = case(seed)
        expected = torch_pipeline(**c)
        assert same_bits(fused(c), expected), {k: v for k, v in c.items() if k not in ("base", "others")}


def test_fused_does_not_depend_on_the_thread_count() -> None:
    base = torch.randn(300_001).bfloat16()
    others = [base + (torch.randn(300_001) * 0.01).bfloat16() for _ in range(3)]
    c = dict(
        base=base, others=others, weights=[0.5, 0.3, 1.0], densities=[0.5, 0.5, 0.2], keys=[1, 2, 3], gammas=[0.1] * 3
    )
    c.update(mode="magnitude", rescale="l1", consensus=True, normalize=True, lambda_=1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(c)
        torch.set_num_threads(max(2, threads))
        many = fused(c)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.view(torch.int16), many.view(torch.int16))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic", "breadcrumbs_ties"])
def test_methods_give_the_same_bits_on_both_paths(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base = torch.randn(64, 300).bfloat16()
    others = [base + (0.01 * torch.randn(64, 300)).bfloat16() for _ in range(2)]
    spec = METHODS[method]
    shared = {p.name: p.default for p in spec.params if not p.per_model}
    defaults = {p.name: p.default for p in spec.params if p.per_model and p.default is not REQUIRED}
    per_model = [defaults | {"weight": 0.6, "density": 0.5}, defaults | {"weight": 0.4, "density": 0.7}]

    def apply() -> torch.Tensor:
        call = MergeCall([base, *others], 0, dict(shared), [{}, *per_model], np.random.default_rng(3))
        return spec.apply(call)

    assert applies(base, others) and not applies(base.float(), [x.float() for x in others])
    fused_result = apply()
    monkeypatch.setattr(fused_bf16, "applies", lambda *_: False)  # the torch pipeline, same declaration
    torch_result = apply()
    assert torch.equal(fused_result.view(torch.int16), torch_result.view(torch.int16))
    assert not torch.equal(fused_result, base)


def sce_case(seed: int) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Inputs for SCE: small noise, exact copies (zero deltas and signed zeros), deltas that cancel, and every
    bfloat16 bit pattern (Inf, NaN, subnormals), for 1 to MAX_MODELS_IN_ORDER models and three select_topk."""
    g = torch.Generator().manual_seed(seed)
    count = [1, 2, 3, 5, fused_bf16.MAX_MODELS_IN_ORDER][seed % 5]
    shape = [(7,), (100, 33), (70_001,), (300, 1000)][seed % 4]
    kind = seed % 4
    if kind == 3:
        patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        base = patterns[torch.randint(0, 1 << 16, shape, generator=g)]
        return base, [patterns[torch.randint(0, 1 << 16, shape, generator=g)] for _ in range(count)], 1.0
    base = torch.randn(shape, generator=g)
    base.view(-1)[::7] = -0.0
    delta = 0.01 * torch.randn(shape, generator=g)
    if kind == 0:
        others = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(count)]
    elif kind == 1:
        others = [base.clone() for _ in range(count)]
        for x in others:
            x.view(-1)[::2] += 0.1 * torch.randn(x.view(-1)[::2].shape, generator=g)
    else:
        others = [base + (delta if i % 2 else -delta) for i in range(count)]
    return base.bfloat16(), [x.bfloat16() for x in others], [1.0, 0.5, 0.1][seed % 3]


def test_sce_erase_gives_the_torch_path_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    for seed in range(40):
        base, others, select_topk = sce_case(seed)
        fused_result = sce(base, others, select_topk)
        with monkeypatch.context() as patch:
            patch.setattr(fused_bf16, "MAX_MODELS_IN_ORDER", 0)  # the torch erase
            torch_result = sce(base, others, select_topk)
        assert same_bits(fused_result, torch_result), (seed, len(others), tuple(base.shape), select_topk)


def karcher_inputs(seed: int, n: int) -> list[torch.Tensor]:
    """bfloat16 vectors for the Karcher steps: normal and huge scales, every bit pattern (Inf, NaN, subnormals,
    signed zeros) in a block, exact zeros."""
    g = torch.Generator().manual_seed(seed)
    scale = [1e-3, 1.0, 1e30][seed % 3]
    xs = [(torch.randn(n, generator=g) * scale).bfloat16() for _ in range(4)]
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for x in xs:
        x[: n // 5] = patterns[torch.randint(0, 1 << 16, (n // 5,), generator=g)]
        x[n // 5 : n // 4] = 0.0
        x[n // 4 : n // 3 : 2] = -0.0
    return xs


@pytest.mark.parametrize("n", [1, 4096, 70_001])
def test_karcher_steps_give_the_torch_ops_bits(n: int) -> None:
    from merge.methods.spherical import _TorchSteps

    def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(value, dtype=dtype)

    for seed in range(12):
        mean, *points = karcher_inputs(seed, n)
        fused_steps, torch_steps = fused_bf16.KarcherSteps(mean), _TorchSteps(torch.float32)
        for x in points:
            assert same_bits(fused_steps.norm(x).view(1), torch_steps.norm(x).view(1))
        weights = [[1 / 3, 0.5, -0.2], [0.25, 1e-3, 7.0], [1.0, 1.0, 1.0]][seed % 3]
        for name, args in [
            ("divide", (points[0], scalar([0.987654321, 3e-5, 1e30, 0.0][seed % 4], torch.float32))),
            ("weighted_sum", (points, weights)),
            ("gradient_of", (mean, [])),
            (
                "gradient_of",
                (
                    mean,
                    [
                        (scalar(c, torch.bfloat16), scalar(w, torch.bfloat16), u)
                        for c, w, u in zip([0.999, -0.5, 1.0], [0.3342, -2.5, 1e-3], points)
                    ],
                ),
            ),
            ("step", (mean, points[1], scalar([0.0123, 2.5, 7.0, 1e-6][seed % 4], torch.float32))),
        ]:
            fused_result, torch_result = getattr(fused_steps, name)(*args), getattr(torch_steps, name)(*args)
            if name == "divide":
                fused_result, torch_result = (fused_result,), (torch_result,)
            for f, t in zip(fused_result, torch_result):
                assert f.dtype == t.dtype and f.shape == t.shape
                assert same_bits(f, t), (seed, name)


def test_karcher_mean_gives_the_bits_of_mergekits_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole Karcher mean with the fused steps and stacked dot products against torch ops and one torch.dot
    per product, the way mergekit computes it."""
    from merge.methods import spherical

    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        shape = [(300, 234), (70_001,)][seed % 2]
        base = torch.randn(shape, generator=g) * 0.02
        tensors = [(base + torch.randn(shape, generator=g) * [0.002, 0.02][seed % 2]).bfloat16() for _ in range(3)]
        if seed == 3:
            tensors[1].zero_()  # left out: no direction
        max_iter, tol = [(10, 1e-5), (3, 1e-5), (20, 1e-9), (10, 1e-2)][seed % 4]
        fast = spherical.karcher_mean(tensors, max_iter, tol)
        with monkeypatch.context() as patch:
            patch.setattr(spherical, "_karcher_steps", lambda tensors, work: spherical._TorchSteps(work))
            patch.setattr(
                spherical, "dots_with", lambda points: lambda v: [torch.dot(v.flatten(), p.flatten()) for p in points]
            )
            reference = spherical.karcher_mean(tensors, max_iter, tol)
        assert same_bits(fast, reference), seed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ordered_counts_count_every_bit_pattern_by_value_order(dtype: torch.dtype) -> None:
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    x = torch.cat(
        [patterns, patterns[torch.randint(0, 1 << 16, (300_001,), generator=torch.Generator().manual_seed(1))]]
    )
    counts = fused_bf16.ordered_counts(x.view(dtype))
    bits = x.to(torch.int32) & 0xFFFF
    keys = torch.where(bits < 0x8000, bits | 0x8000, 0xFFFF - bits)
    assert torch.equal(counts, torch.bincount(keys, minlength=1 << 16))
    finite = x.view(dtype)[~x.view(dtype).isnan()].double()
    ordered = torch.repeat_interleave(torch.arange(1 << 16), counts)  # keys, smallest value first
    values = torch.where(ordered >= 0x8000, ordered & 0x7FFF, 0xFFFF - ordered).to(torch.int16).view(dtype).double()
    values = values[~values.isnan()]
    assert torch.equal(values, torch.sort(finite).values)  # -0.0 before +0.0: equal as values


def test_multislerp_steps_give_the_torch_path_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Multi-SLERP with the fused steps against its torch steps: 2 to MAX_MODELS_IN_ORDER models, about a base or
    not, normalised weights or not, and inputs with every bit pattern (Inf, NaN, subnormals, signed zeros)."""
    from merge.methods import spherical

    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        count = [2, 3, 5, fused_bf16.MAX_MODELS_IN_ORDER][seed % 4]
        shape = [(70_001,), (300, 234)][seed % 2]
        base = torch.randn(shape, generator=g) * 0.02
        tensors = [(base + torch.randn(shape, generator=g) * 0.01).bfloat16() for _ in range(count)]
        if seed % 3 == 2:
            tensors[0] = karcher_inputs(seed, tensors[0].numel())[0].view(shape)
        weights = [float(w) for w in torch.rand(count, generator=g) + 0.1]
        about = base.bfloat16() if seed % 2 else None
        fast = spherical.multislerp(tensors, weights, about, normalize_weights=seed % 5 != 0)
        assert isinstance(spherical._multislerp_steps(torch.stack(tensors).view(count, -1)), fused_bf16.MultislerpSteps)
        with monkeypatch.context() as patch:
            patch.setattr(spherical, "_multislerp_steps", lambda flat: spherical._MultislerpTorchSteps())
            reference = spherical.multislerp(tensors, weights, about, normalize_weights=seed % 5 != 0)
        assert same_bits(fast, reference), seed
