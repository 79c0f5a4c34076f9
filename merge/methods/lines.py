"""LiNeS — Wang et al., ICLR 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging", arXiv:2410.17146."""

from __future__ import annotations


def lines_scale(alpha: float, beta: float, depth: float | None) -> float:
    """The factor LiNeS puts on a (merged) task vector's tensor, by the depth of its layer:

        τ^(l) ← (α + β · l / (L − 1)) · τ^(l),      l = 0 .. L − 1

    so shallow layers, which hold general features, keep less of the fine-tuning (α) and the deepest layer
    the most (α + β). `depth` is l / (L − 1) (merge.params.layer_position over the output model's layers);
    None for tensors outside the layers (embeddings, final norm, lm_head), which the paper scales by α.

    The paper's settings: one fine-tuned model, α = λ and β = 1 − λ (the last layer keeps the whole residual);
    a multi-task vector of N models, α = (‖Σ_i τ_i‖₁ / ‖τ_merged‖₁) / N — 1/N for task arithmetic, whose merged
    vector is the sum — with β tuned on validation (0.1 .. 1.0)."""
    return alpha if depth is None else alpha + beta * depth
