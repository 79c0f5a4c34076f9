"""Passthrough: copy a tensor unchanged (or scaled) — the building block of layer stacking ("frankenmerges")."""

from __future__ import annotations

import torch


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """θ = θ_source, or θ = s · θ_source when a `scale` s is given."""
    return tensor if scale is None else tensor * scale
