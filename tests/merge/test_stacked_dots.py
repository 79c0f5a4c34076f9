"""Stacked dot products give each torch.dot's bits, the check that guards them can fail, and where they do not
apply each product is a torch.dot call."""

from __future__ import annotations

import pytest
import torch

from merge.methods import stacked_dots
from merge.methods.stacked_dots import (
    ONEDNN_FROM,
    dots_with,
    gives_torch_dot_bits,
    midpoint_vectors,
    stacking_applies,
)


def bits(xs: list[torch.Tensor] | torch.Tensor) -> list[int]:
    return [int(x.view(torch.int16)) for x in xs]


@pytest.mark.parametrize("n", [ONEDNN_FROM, 65_541, 2_263_094])
def test_dots_with_give_torch_dot_bits_on_vectors_that_expose_the_order(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    crafted = midpoint_vectors(n, 3, g)
    assert all(float(v.double().sum()) == 1 + 2**-8 for v in crafted)  # midway between two bfloat16 numbers
    ones = torch.ones(n, dtype=torch.bfloat16)
    assert bits(dots_with(crafted)(ones)) == bits([torch.dot(ones, v) for v in crafted])
    heavy = [
        (torch.randn(n, generator=g) * torch.exp2(torch.randint(-12, 4, (n,), generator=g))).bfloat16()
        for _ in range(4)
    ]
    dots = dots_with(heavy[1:])
    for v in (heavy[0], crafted[0], ones):
        assert bits(dots(v)) == bits([torch.dot(v, p) for p in heavy[1:]])


def test_the_check_rejects_another_order_of_additions() -> None:
    def exact(v: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:  # exact sums, rounded once
        return (v.double() @ columns.double()).bfloat16()

    def float32_in_order(v: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        products = v.float()[:, None] * columns.float()
        return products.cumsum(0)[-1].bfloat16()

    for n in (ONEDNN_FROM, 65_541):
        assert not gives_torch_dot_bits(exact, n)
        assert not gives_torch_dot_bits(float32_in_order, n)


def test_stacking_is_only_for_long_bfloat16_cpu_vectors_with_onednn() -> None:
    long = torch.zeros(ONEDNN_FROM, dtype=torch.bfloat16)
    assert not stacking_applies(long[:-1])  # torch.dot does not go to oneDNN: another order
    assert not stacking_applies(long.float())
    with torch.backends.mkldnn.flags(enabled=False):
        assert not stacking_applies(long)


def test_without_stacking_each_product_is_a_torch_dot_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(stacked_dots, "stacking_applies", lambda x: False)
    monkeypatch.setattr(torch, "dot", lambda a, b: calls.append(1) or (a.float() @ b.float()).bfloat16())
    points = [torch.randn(5000).bfloat16() for _ in range(3)]
    assert len(dots_with(points)(points[0])) == 3 and len(calls) == 3
