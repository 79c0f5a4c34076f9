"""Small numeric conventions shared by the merge functions."""

from __future__ import annotations

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
