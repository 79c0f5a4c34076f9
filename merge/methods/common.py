"""Small numeric conventions shared by the merge functions."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Entries processed at a time. Elementwise chains over 2**20 entries (4 MB of float32 scratch) stay in
# cache, several times faster than whole-tensor passes on large tensors. For slerp the block size also
# fixes the order in which norms and the dot product accumulate: 2**20 is mergekit's, so results agree
# with it to the bit.
BLOCK = 1 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are combined in float32 (float64 stays float64) so rounding happens once."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class MergeError(ValueError):
    """Inputs a method cannot merge, found only once the tensors are read (the runner names the tensor)."""


def blockwise(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, row: int = 1) -> torch.Tensor:
    """`fn` applied to the tensors a block of about BLOCK entries at a time (whole rows of `row` entries, when `fn`
    works per row), written into one output of the first tensor's shape: the values `fn` gives on the whole
    tensors when it is elementwise (or per row), with its intermediates kept in cache (about 2x faster on CPU)."""
    shape = tensors[0].shape
    flat = [t.reshape(-1, row) for t in tensors]
    step = max(1, BLOCK // row)
    out: torch.Tensor | None = None
    for start in range(0, flat[0].shape[0], step):
        block = fn(*(t[start : start + step] for t in flat))
        if out is None:
            out = torch.empty((flat[0].shape[0], row), dtype=block.dtype, device=block.device)
        out[start : start + step] = block
    return (out if out is not None else fn(*flat)).reshape(shape)


def column_blocks(fn: Callable[[slice], torch.Tensor], n: int) -> torch.Tensor:
    """An n-vector assembled from `fn(block)` over consecutive blocks of BLOCK columns: for steps that work per
    column of a (models, n) stack, taking strided views of it rather than copies."""
    parts = [(block, fn(block)) for block in (slice(s, s + BLOCK) for s in range(0, n, BLOCK))]
    if not parts:
        return fn(slice(0, 0))
    out = torch.empty(n, dtype=parts[0][1].dtype, device=parts[0][1].device)
    for block, part in parts:
        out[block] = part
    return out
