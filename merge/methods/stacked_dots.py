"""Several dot products with one vector, each with the bits of its own `torch.dot`, in one call where this torch
build allows it (the Karcher mean's ⟨μ, u_i⟩ for every model, ten times per tensor).

On a CPU whose torch runs bfloat16 matmuls through oneDNN (x86 with AVX-512), `torch.dot` of two bfloat16 vectors
of more than 16³ entries is a 1×K by K×1 oneDNN matmul, and most of its time goes to repacking the K×1 operand:
26 ms for 11.5M entries on the 2-core benchmark VM, where the same sum without oneDNN takes 1.5 ms. A 1×K by K×N
matmul repacks once for N columns and adds each column up in the same order as the single dot — the same bits,
three products in 29 ms instead of 79. Whether that holds is a fact about the torch build and the machine, not a
documented guarantee, so it is checked in each process for each vector length before it is used (0.1 s at 2M
entries, 0.7 s at 11.5M), on vectors made for it: their exact products lie midway between two bfloat16 numbers,
so any difference in the order of the float32 additions shows in the rounding (a sequential float32 sum or an
N×K-by-K×1 product differs from `torch.dot` on a third to a half of them). Where the check fails, oneDNN is
off, or the tensors are float32, on a GPU or small, each product is a `torch.dot` call as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import torch

ONEDNN_FROM = 16**3 + 1  # torch.dot hands bfloat16 vectors to oneDNN from this length on (aten's size check)
STACK_UP_TO = 1 << 25  # entries per vector; above, the stacked copy would raise the peak memory more than it saves
PROBES = 6  # crafted vectors per length: 12 products, each differing with a chance of 1/3 to 1/2 under another order


def dots_with(points: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A function v ↦ [⟨v, p⟩ for p in points] whose every entry has the bits of `torch.dot(v.flatten(),
    p.flatten())`. The points are fixed (stacked once, when that applies); v changes from call to call."""
    flat = [p.reshape(-1) for p in points]
    if len(flat) > 1 and stacking_applies(flat[0]):
        columns = torch.stack(flat, 1)  # K×N, row-major: the layout of torch.dot's K×1 operand
        return lambda v: list(stacked_dots(v, columns))
    return lambda v: [torch.dot(v.reshape(-1), p) for p in flat]


def stacked_dots(v: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """⟨v, columns[:, j]⟩ for every j, as one 1×K by K×N matmul."""
    return (v.reshape(1, -1) @ columns)[0]


def stacking_applies(x: torch.Tensor) -> bool:
    """Whether dot products with vectors like `x` may be stacked into one matmul (see the module docstring)."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and ONEDNN_FROM <= x.numel() <= STACK_UP_TO
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and _stacking_is_torch_dot(x.numel(), torch.get_num_threads())
    )


@cache
def _stacking_is_torch_dot(length: int, threads: int) -> bool:
    # oneDNN picks its blocking by the problem's size (another stacked form agrees with torch.dot up to about 2M
    # entries and not beyond), so the check runs at every length it is used for
    return gives_torch_dot_bits(stacked_dots, length)


def gives_torch_dot_bits(stacked: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int) -> bool:
    """Whether `stacked(v, columns)` equals [torch.dot(v, c) for c in columns.T] bit for bit on bfloat16 vectors
    of length n built to expose the order of float32 additions: each sums to 1 + 2⁻⁸, the midpoint between the
    bfloat16 numbers 1 and 1 + 2⁻⁷, as a dot product with a vector of ones. Both operand sides are tried."""
    generator = torch.Generator().manual_seed(n)
    ones = torch.ones(n, dtype=torch.bfloat16)
    crafted = midpoint_vectors(n, PROBES, generator)
    cases = [(ones, crafted[i : i + 3]) for i in range(0, PROBES, 3)]
    want = [torch.stack([torch.dot(v, c) for c in columns]) for v, columns in cases]
    got = [stacked(v, torch.stack(columns, 1)) for v, columns in cases]
    ones_columns = torch.stack([ones] * 3, 1)
    want += [torch.dot(c, ones).expand(3) for c in crafted]
    got += [stacked(c, ones_columns) for c in crafted]
    return all(torch.equal(g.view(torch.int16), w.view(torch.int16)) for g, w in zip(got, want))


def midpoint_vectors(n: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`count` vectors of n bfloat16 numbers, each summing exactly to 1 + 2⁻⁸: one 1.0 at a random place among
    small numbers of either sign spread over sixteen binades below 2⁻⁸ (so float32 additions after the 1.0 round),
    a few set last so that the exact sum is the target. The vectors are shifts of one random draw."""
    bits = torch.randint(-(2**15), 2**15, (n,), generator=generator, dtype=torch.int16)
    exponents = ((bits >> 7) & 0xF) + (127 - 24)  # 2⁻²⁴ … 2⁻⁹
    pool = ((bits & ~0x7F80) | (exponents << 7)).view(torch.bfloat16)  # keeps the sign and the 7 mantissa bits
    pool_sum = pool.to(torch.float64).sum().item()  # exact, as are the sums below: they need under 53 bits
    vectors = []
    for _ in range(count):
        x = pool.roll(int(torch.randint(0, n, (1,), generator=generator)))
        places = list(dict.fromkeys(torch.randint(0, n, (32,), generator=generator).tolist()))[:9]
        total = pool_sum - x[places].to(torch.float64).sum().item() + 1.0
        x[places[0]] = 1.0
        x[places[1:]] = 0.0
        for i in places[1:]:  # each step leaves under 2⁻⁸ of the remainder
            x[i] = 1.0 + 2.0**-8 - total
            total += x[i].item()
        vectors.append(x)
    return vectors
