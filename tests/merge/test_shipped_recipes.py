"""Every recipe shipped in recipes/ passes schema and parameter validation (no download needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from merge.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.dtype == "bfloat16" and len(recipe.model_refs()) == 2


def test_recipes_exist() -> None:
    assert len(RECIPES) >= 3
