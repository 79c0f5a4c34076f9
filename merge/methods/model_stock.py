"""Model Stock — Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge.methods.common import BLOCK


def model_stock(base: torch.Tensor, others: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Interpolate between the average of N ≥ 2 fine-tuned models and the pre-trained base by the angle between
    their task vectors τ_i = θ_i − θ_base (the paper's eq. 6, with cos θ the mean pairwise cosine):

        cos θ = mean_{i<j} ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖)       (clamped to [−1, 1]; norms floored at 1e-6)
        t = N cos θ / (1 + (N − 1) cos θ)
        θ = t · (1/N) Σ_i θ_i + (1 − t) · θ_base

    One angle per tensor, or per row (`filter_wise`; a 1-D tensor is one row). Where 1 + (N − 1) cos θ
    vanishes (opposed updates) t is 0: the base is kept rather than an unbounded extrapolation."""
    shape = base.shape
    if filter_wise:
        rows = base.reshape(1, -1) if base.dim() < 2 else base
        ws = [w.reshape(rows.shape) for w in others]
    else:
        rows, ws = base.reshape(-1), [w.reshape(-1) for w in others]
    offsets = [w - rows for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1, denominator))
    if filter_wise:
        return (t * (sum(ws) / n) + (1 - t) * rows).reshape(shape)
    # t · (Σ θ_i / N) + (1 − t) · θ_base a block at a time, in place in the output: the same roundings as the
    # expression above (Python's sum starts from 0, and -0.0 + 0 is +0.0), four fewer passes and allocations
    out, rest = torch.empty_like(rows), 1 - t
    for start in range(0, rows.numel(), BLOCK):
        block = slice(start, start + BLOCK)
        mean = torch.add(ws[0][block], 0, out=out[block])
        for w in ws[1:]:
            mean.add_(w[block])
        mean.div_(n).mul_(t).add_(rest * rows[block])
    return out.reshape(shape)
