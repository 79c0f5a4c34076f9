"""medmerge's merge engine: mergekit-compatible YAML recipes -> Hugging Face model directories.

Layout (data flows one way): recipe -> plan -> (read, merge, write) per tensor -> model dir.
The math lives in :mod:`merge.methods` (pure functions on tensors); I/O in :mod:`merge.io`.
"""

from merge.errors import RecipeError
from merge.recipe import Recipe, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
