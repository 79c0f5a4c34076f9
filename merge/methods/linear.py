"""Linear (weighted-average) merging — Wortsman et al. 2022, "Model soups", arXiv:2203.05482."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge.methods.common import BLOCK, accumulation_dtype


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
    flat = [t.reshape(-1) for t in tensors]
    out = torch.empty_like(flat[0])
    for start in range(0, out.numel(), BLOCK):
        block = slice(start, start + BLOCK)
        total = torch.zeros_like(flat[0][block], dtype=acc)
        for tensor, weight in zip(flat, w):
            total.addcmul_(tensor[block], weight)
        if normalize:
            total.div_(w.sum())
        out[block] = total
    return out.reshape(first.shape)
