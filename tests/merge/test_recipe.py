"""Recipe validation: every mistake is one line naming file, line and field; nothing is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmerge_common.errors import UserError
from merge.methods import METHODS
from merge.recipe import load_recipe

BASE = "org/base"


def problems(path: Path) -> list[str]:
    with pytest.raises(UserError) as info:
        load_recipe(path)
    return [str(p) for p in info.value.problems]


def test_valid_biomistral_style_recipe_parses(write_recipe) -> None:
    path = write_recipe("""\
slices:
  - sources:
      - model: mistralai/Mistral-7B-Instruct-v0.1
        layer_range: [0, 32]
      - model: BioMistral/BioMistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: mistralai/Mistral-7B-Instruct-v0.1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""")
    recipe = load_recipe(path)
    assert recipe.model_refs() == ["mistralai/Mistral-7B-Instruct-v0.1", "BioMistral/BioMistral-7B"]


def test_unknown_key_has_line_and_suggestion(write_recipe) -> None:
    path = write_recipe("merge_method: linear\nmodels:\n  - model: a/b\n    paramters:\n      weight: 1\n")
    [line] = problems(path)
    assert line == f"{path}:4: models[0].paramters: unknown key 'paramters' (did you mean 'parameters'?)"


def test_unknown_method_suggests(write_recipe) -> None:
    path = write_recipe("merge_method: slurp\nbase_model: a/b\nmodels:\n  - model: a/b\n  - model: c/d\n")
    [line] = problems(path)
    assert line.startswith(f"{path}:1: merge_method: unknown merge method 'slurp' (did you mean 'slerp'?)")


def test_every_mergekit_method_is_known() -> None:
    mergekit_0_1_5 = {
        *("linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties"),
        *("dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl"),
        *("model_stock", "nearswap", "arcee_fusion", "passthrough"),
    }
    assert mergekit_0_1_5 <= set(METHODS)


def test_input_counts_are_said_besides_the_base(write_recipe) -> None:
    path = write_recipe("merge_method: nuslerp\nbase_model: a/b\nparameters: {weight: 1}\nmodels:\n  - model: c/d\n")
    assert problems(path) == [f"{path}:4: models: nuslerp takes exactly 2 model(s) besides the base, got 1"]
    path = write_recipe("merge_method: passthrough\nmodels:\n  - model: a/b\n  - model: c/d\n")
    assert problems(path) == [f"{path}:2: models: passthrough takes exactly 1 model(s), got 2"]


def test_parameter_typo_and_density_range_and_missing_weight_all_reported(write_recipe) -> None:
    path = write_recipe(f"""\
merge_method: ties
base_model: {BASE}
models:
  - model: {BASE}
  - model: org/ft
    parameters:
      density: 0
      wieght: 0.5
""")
    lines = problems(path)
    assert f"{path}:7: models[1].parameters.density: density must be in (0, 1], got 0" in lines
    assert any(
        line.startswith(
            f"{path}:8: models[1].parameters.wieght: 'ties' has no parameter 'wieght' (did you mean 'weight'?)"
        )
        for line in lines
    )
    assert f"{path}:5: models[1]: ties needs parameter 'weight' for model 'org/ft'" in lines


def test_slerp_with_three_models(write_recipe) -> None:
    path = write_recipe(f"""\
merge_method: slerp
base_model: {BASE}
parameters: {{t: 0.5}}
models:
  - model: {BASE}
  - model: org/a
  - model: org/b
""")
    assert problems(path) == [f"{path}:4: models: slerp takes exactly 1 model(s) besides the base, got 2"]


def test_invalid_yaml_names_the_line(write_recipe) -> None:
    path = write_recipe("merge_method: linear\nmodels:\n  - model: a/b\n   bad: [\n")
    [line] = problems(path)
    assert line.startswith(f"{path}:4: invalid YAML")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("merge_method: linear\n", "give either 'models' or 'slices'"),
        ("merge_method: linear\nmodels: []\nslices: []\n", "give either 'models' or 'slices'"),
        ("merge_method: ties\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n", "ties needs a base_model"),
        (
            "merge_method: linear\nmodels:\n  - model: ./not here\n    parameters: {weight: 1}\n",
            "is neither an existing directory nor a hub id",
        ),
        (
            "merge_method: linear\ndtype: bf15\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n",
            "unknown dtype 'bf15'",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: yes please}\n",
            "expected a number, got 'yes please'",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: a/b\n        layer_range: [4, 2]\n",
            "layer_range must be [start, end)",
        ),
        (
            "merge_method: linear\nparameters: {normalize: maybe}\n"
            "models:\n  - model: a/b\n    parameters: {weight: 1}\n",
            "expected true or false",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1, normalize: true}\n",
            "'normalize' applies to the whole merge",
        ),
        (
            "merge_method: linear\ntokenizer_source: a/c\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n",
            "recipe.yaml:2: tokenizer_source: 'a/c' is not 'union', 'base' or one of the recipe's models",
        ),
        (
            "merge_method: linear\nlines: {alpha: 0.5, beta: 0.5}\n"
            "models:\n  - model: a/b\n    parameters: {weight: 1}\n",
            "recipe.yaml:2: lines: lines scales a task-vector method's merged task vector; linear has none",
        ),
        (
            "merge_method: lines\nbase_model: a/c\nlines: {alpha: 0.5, beta: 0.5}\n"
            "models:\n  - model: a/b\n    parameters: {weight: 1}\n",
            "recipe.yaml:3: lines: lines scales its layers itself: set alpha and beta under 'parameters'",
        ),
        (
            "merge_method: ties\nbase_model: a/c\nlines: {alpha: .nan, beta: 0.5}\n"
            "models:\n  - model: a/b\n    parameters: {weight: 1}\n",
            "recipe.yaml:3: lines.alpha:",
        ),
        ("- just\n- a list\n", "expected a mapping"),
        ("", "the file is empty"),
    ],
)
def test_more_mistakes(write_recipe, text: str, expected: str) -> None:
    lines = problems(write_recipe(text))
    assert any(expected in line for line in lines), lines
    assert all("\n" not in line for line in lines)


def test_missing_file() -> None:
    assert problems(Path("/no/such/recipe.yaml")) == ["/no/such/recipe.yaml: file not found"]
