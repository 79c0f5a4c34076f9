"""Merging into loaded tensors (`merge.inplace`): the bits of the same recipe merged to disk, trial after trial,
with and without the inputs cached; only what changed is recomputed."""

from __future__ import annotations

import pytest
import torch

from merge.inplace import InPlaceMerge
from merge.recipe import Recipe
from merge.run import run_merge
from tests.conftest import load_weights


def task_vectors(tiny, method: str, weight: float, density: float) -> Recipe:
    params = {"weight": weight, "density": density}
    return Recipe.model_validate(
        {
            "merge_method": method,
            "base_model": str(tiny["base"]),
            "dtype": "bfloat16",
            "models": [
                {"model": str(tiny["ft1"]), "parameters": params},
                {"model": str(tiny["ft2"]), "parameters": params | {"weight": 0.5}},
            ],
        }
    )


@pytest.mark.parametrize("cache_inputs", [False, True])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_trials_in_place_equal_merges_on_disk(tiny, tmp_path, method, cache_inputs):
    points = [(0.3, 0.5), (0.9, 0.7), (0.3, 0.5), (0.6, 0.2)]
    first = task_vectors(tiny, method, *points[0])
    run_merge(first, tmp_path / "carrier")
    target = {name: t.clone() for name, t in load_weights(tmp_path / "carrier").items()}
    merger = InPlaceMerge(first, target, cache_inputs=cache_inputs, seed=3)
    merger.assume(first)
    for i, point in enumerate(points[1:]):
        recipe = task_vectors(tiny, method, *point)
        assert merger.merge(recipe) > 0
        assert merger.merge(recipe) == 0  # the same point again: nothing to recompute
        run_merge(recipe, tmp_path / f"disk{i}", seed=3)
        for name, tensor in load_weights(tmp_path / f"disk{i}").items():
            assert torch.equal(target[name], tensor), (point, name)
    merger.close()


def test_only_the_tensors_a_change_touches_are_recomputed(tiny, tmp_path):
    def slerp(t_attention: float) -> Recipe:
        return Recipe.model_validate(
            {
                "merge_method": "slerp",
                "base_model": str(tiny["ft1"]),
                "models": [{"model": str(tiny["ft1"])}, {"model": str(tiny["ft2"])}],
                "parameters": {"t": [{"filter": "self_attn", "value": t_attention}, {"value": 0.5}]},
            }
        )

    run_merge(slerp(0.2), tmp_path / "carrier")
    target = load_weights(tmp_path / "carrier")
    merger = InPlaceMerge(slerp(0.2), target)
    assert merger.merge(slerp(0.2)) == len(target)  # nothing assumed: everything merged once
    assert merger.merge(slerp(0.8)) == sum("self_attn" in name for name in target)
    with pytest.raises(ValueError, match="same output tensors"):
        one_layer = {"sources": [{"model": str(tiny["ft1"]), "layer_range": [0, 1]}]}
        merger.merge(Recipe.model_validate({"merge_method": "passthrough", "slices": [one_layer]}))
    merger.close()
