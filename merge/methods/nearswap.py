"""NearSwap — alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (model card)."""

from __future__ import annotations

import torch

from merge.methods.common import blockwise


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Take the other model's value where the two models are already close, keep the base's where they differ:

        w = clamp(t / max(|θ_base − θ_other|, 1e-6), 0, 1)
        θ = w · θ_other + (1 − w) · θ_base

    An entry within t of the other model's becomes it (w = 1); one far away moves by about t. t = 0 is the
    base. Elementwise, in the merge dtype (a block at a time)."""

    def swap(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
        return weight * other + (1 - weight) * base

    return blockwise(swap, base, other)
