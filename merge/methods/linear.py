"""Linear (weighted-average) merging — Wortsman et al. 2022, "Model soups", arXiv:2203.05482."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge.methods.common import accumulation_dtype, blockwise


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average of same-shaped tensors.

        θ = Σ_i w_i θ_i / Σ_i w_i      (normalize=True, the default)
        θ = Σ_i w_i θ_i                (normalize=False)

    Accumulates in float32 and rounds once to the inputs' dtype (the order of operations is mergekit's,
    so outputs match it bit for bit), over blocks of BLOCK entries so the float32 scratch stays in cache.
    """
    first = tensors[0]
    acc = accumulation_dtype(first.dtype)
    w = torch.tensor(list(weights), dtype=acc, device=first.device)

    def combine(*blocks: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(blocks[0], dtype=acc)
        for tensor, weight in zip(blocks, w):
            total.addcmul_(tensor, weight)
        if normalize:
            total.div_(w.sum())
        return total.to(first.dtype)

    return blockwise(combine, *tensors)
