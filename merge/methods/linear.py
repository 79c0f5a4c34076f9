"""Linear (weighted-average) merging — Wortsman et al. 2022, "Model soups", arXiv:2203.05482."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are combined in float32 (float64 stays float64) so rounding happens once."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average of same-shaped tensors.

        θ = Σ_i w_i θ_i / Σ_i w_i      (normalize=True, the default)
        θ = Σ_i w_i θ_i                (normalize=False)

    Accumulates in float32 and rounds once to the inputs' dtype (the order of operations is mergekit's,
    so outputs match it bit for bit).
    """
    first = tensors[0]
    acc = accumulation_dtype(first.dtype)
    w = torch.tensor(list(weights), dtype=acc, device=first.device)
    out = torch.zeros_like(first, dtype=acc)
    for tensor, weight in zip(tensors, w):
        out.addcmul_(tensor, weight)
    if normalize:
        out.div_(w.sum())
    return out.to(first.dtype)
