"""Arcee Fusion — Arcee AI 2025 (mergekit 0.1.5's `arcee_fusion`; https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from merge.methods.common import blockwise


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Take the other model's change only where it matters most, by an outlier rule on an importance score:

        s = |θ − θ_base| ⊙ KL(p ‖ q),  p = softmax(θ) + 1e-8,  q = softmax(θ_base) + 1e-8  (softmax and KL along
            the last dimension, one KL per row, broadcast over it)
        s* = Q2(s) + 1.5 · (Q3(s) − Q1(s))    (Qk: the ⌊(k/4)(n − 1)⌋-th smallest of the n scores, from 0)
        θ_fused = θ_base + (θ − θ_base) ⊙ [s ≥ s*]

    The scores and quantiles are in the merge dtype; the final sum is in float32, as in mergekit. mergekit
    estimates the quartiles from 1,000,000 entries drawn at random when a tensor has more; here they are exact
    (and deterministic) at every size, so such tensors may differ where a score lies between the two estimates.
    Scores are computed a block of rows at a time, the fusion a block of entries at a time."""
    if base.numel() == 0:
        return base.clone()
    rows = base.shape[-1] if base.dim() else 1

    def importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:  # per row
        p = F.softmax(other, dim=-1) + 1e-8
        q = F.softmax(base, dim=-1) + 1e-8
        return (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)

    score = blockwise(importance, base, other, row=rows)
    q1, q2, q3 = _lower_quartiles(score)
    threshold = q2 + 1.5 * (q3 - q1)

    def fuse(base: torch.Tensor, other: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        return base + (other - base) * (score >= threshold).float()

    return blockwise(fuse, base, other, score)


def _lower_quartiles(values: torch.Tensor) -> list[torch.Tensor]:
    """The ⌊(n−1)/4⌋-th, ⌊(n−1)/2⌋-th and ⌊3(n−1)/4⌋-th smallest entries (0-based), in `values`' dtype."""
    flat = values.reshape(-1)
    last = flat.numel() - 1
    ranks = (last // 4, last // 2, 3 * last // 4)
    if flat.element_size() == 2:
        return _ranked_16_bit(flat, ranks)
    return [torch.kthvalue(flat, r + 1).values for r in ranks]


def _ranked_16_bit(flat: torch.Tensor, ranks: tuple[int, ...]) -> list[torch.Tensor]:
    """Order statistics of a 16-bit float tensor from one histogram of its bit patterns (no sort, no float32
    copy). Mapping each pattern to a key that orders like its value — positive: sign bit set; negative: all bits
    flipped — makes the r-th smallest the first key whose cumulative count exceeds r."""
    if flat.device.type == "cpu":
        from merge.methods.fused_bf16 import ordered_counts  # numba: one pass, no int32 copies (82 -> 11 ms per 11.5M)

        below = ordered_counts(flat).cumsum(0)
    else:
        bits = flat.view(torch.int16).to(torch.int32) & 0xFFFF
        keys = torch.where(bits < 0x8000, bits | 0x8000, 0xFFFF - bits)
        below = torch.bincount(keys, minlength=1 << 16).cumsum(0)
    found = [int(torch.searchsorted(below, r, right=True)) for r in ranks]
    patterns = torch.tensor([k & 0x7FFF if k >= 0x8000 else 0xFFFF - k for k in found], dtype=torch.int32)
    return list(patterns.to(torch.int16).view(flat.dtype).to(flat.device).unbind())
