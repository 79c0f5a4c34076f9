"""medmerge's merge engine: mergekit-compatible YAML recipes -> Hugging Face model directories.

Layout (data flows one way): recipe -> plan -> (read, merge, write) per tensor -> model dir.
The math lives in :mod:`merge.methods` (pure functions on tensors); I/O in :mod:`merge.io`.
"""

from typing import Any

__all__ = ["Recipe", "load_recipe"]


def __getattr__(name: str) -> Any:
    # Recipe and load_recipe import torch: only on first use, so importing `merge` (the CLI) stays instant
    if name in ("Recipe", "load_recipe"):
        from merge import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'merge' has no attribute {name!r}")
