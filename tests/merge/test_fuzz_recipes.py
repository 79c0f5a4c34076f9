"""A seeded mutator over valid recipes: whatever a user (or a fuzzer) writes, `medmerge merge` exits 0 with a
finite model or exits 2 with one line per problem — never a traceback, a NaN output or a leftover directory.

A longer run (benchmarks/RESULTS.md): `MEDMERGE_FUZZ_COUNT=20000 MEDMERGE_FUZZ_SEED=N python -m pytest
tests/merge/test_fuzz_recipes.py`.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from pathlib import Path

import torch
import yaml

from medmerge.cli import main
from tests.conftest import load_weights, value_paths

COUNT = int(os.environ.get("MEDMERGE_FUZZ_COUNT", "1000"))  # mutated recipes per run of the suite
SEED = int(os.environ.get("MEDMERGE_FUZZ_SEED", "20261123"))

ODD_VALUES: list[object] = [
    float("nan"), float("inf"), -float("inf"), 1e39, -1e39, 1e-320, 1e30, 1e20, -1, 0, 0.1, 0.5, 0.9, 1, 1.5, 2,
    10**400, 3e38, 1e-38, False,
    "x", "", "0.3", ".nan", None, True, [], {}, [0.1, 0.9], [float("nan"), 1], [{"filter": "mlp", "value": 0.3}],
    [{"filter": 3, "value": 1}], {"value": 0.2}, {"filter": "x"}, [[1, 2]], "org/missing-model", "../..", [0, 2],
    [3, 1], [-1, 2], [0, 99], "slerp", "ties", "della", "model_stock", "union", "bfloat16", "float16", "int8",
    "chatml",
]  # fmt: skip
ODD_NUMBERS = [float("nan"), float("inf"), 1e39, 1e30, 1e20, 3e38, 1e-38, 1e-320, -1, 0, 0.1, 0.5, 0.9, 1, 1.5, 2]
TEXT_EDITS = [
    "&a ", "*a", "*b", "!!python/object/apply:os.system ['true']", "!custom ", ": ", "- ", "\t", "{", "[", "'",
    "<<: *a", "? ", "%YAML 1.1\n", "---\n", "...", "#", "\\", "\x00", "é",
]  # fmt: skip


def seed_recipes(tiny: dict[str, Path]) -> list[dict]:
    base, ft1, ft2 = (str(tiny[k]) for k in ("base", "ft1", "ft2"))
    task_vector = [{"model": base}, {"model": ft1, "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": ft2, "parameters": {"weight": 0.5, "density": 0.7}}]  # fmt: skip
    plain = [{"model": base}, {"model": ft1}, {"model": ft2}]
    return [
        {"merge_method": "linear", "models": [{"model": ft1, "parameters": {"weight": 0.3}},
                                              {"model": ft2, "parameters": {"weight": 0.7}}], "dtype": "float32"},
        {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": ft1}],
         "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]}},
        {"merge_method": "ties", "base_model": base, "models": task_vector, "dtype": "bfloat16",
         "parameters": {"normalize": True}},
        {"merge_method": "dare_ties", "base_model": base, "models": task_vector, "parameters": {"lambda": 1.0}},
        {"merge_method": "task_arithmetic", "base_model": base, "models": task_vector, "out_dtype": "float16"},
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": ft1, "layer_range": [0, 2]}]},
                                                   {"sources": [{"model": ft2, "layer_range": [1, 4]}]}]},
        {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.3},
         "slices": [{"sources": [{"model": base, "layer_range": [0, 4]}, {"model": ft1, "layer_range": [0, 4]}]}]},
        {"merge_method": "della", "base_model": base, "models": task_vector, "parameters": {"epsilon": 0.1}},
        {"merge_method": "breadcrumbs_ties", "base_model": base, "models": task_vector, "parameters": {"gamma": 0.05}},
        {"merge_method": "model_stock", "base_model": base,
         "models": [{"model": base}, {"model": ft1}, {"model": ft2}]},
        {"merge_method": "nearswap", "base_model": base, "models": [{"model": base}, {"model": ft2}],
         "parameters": {"t": 0.01}},
        {"merge_method": "nuslerp", "base_model": base, "models": [{"model": ft1, "parameters": {"weight": 0.4}},
         {"model": ft2, "parameters": {"weight": 0.6}}], "parameters": {"nuslerp_flatten": False}},
        {"merge_method": "multislerp", "models": [{"model": ft1, "parameters": {"weight": 0.4}},
         {"model": ft2, "parameters": {"weight": 0.6}}, {"model": base, "parameters": {"weight": 0.2}}]},
        {"merge_method": "karcher", "models": [{"model": ft1}, {"model": ft2}], "parameters": {"max_iter": 5}},
        {"merge_method": "sce", "base_model": base, "models": plain, "parameters": {"select_topk": 0.5}},
        {"merge_method": "ramplus_tl", "base_model": base, "models": plain, "parameters": {"r": 0.3}},
        {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": base}, {"model": ft1}]},
    ]  # fmt: skip


def _parent(recipe: dict, path: tuple) -> object:
    for key in path[:-1]:
        recipe = recipe[key]
    return recipe


def mutate(recipes: list[dict], rng: random.Random) -> str:
    """One mutated recipe as YAML text: 1-3 structural edits, then sometimes a text edit."""
    recipe = copy.deepcopy(rng.choice(recipes))
    for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 3)):
        paths = [p for p in value_paths(recipe) if p]
        if not paths:  # everything deleted already
            break
        path = rng.choice(paths)
        parent = _parent(recipe, path)
        numbers = [q for q in paths if isinstance(_parent(recipe, q)[q[-1]], (int, float))]
        kind = rng.random()
        if kind < 0.1 and numbers:  # a nearby value: merges that run, with parameters no seed has
            number = rng.choice(numbers)
            _parent(recipe, number)[number[-1]] *= rng.choice([0.5, 0.9, 1.1])
        elif kind < 0.35 and numbers:  # the numbers are where NaN outputs come from
            number = rng.choice(numbers)
            _parent(recipe, number)[number[-1]] = rng.choice(ODD_NUMBERS)
        elif kind < 0.55:
            parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif kind < 0.7:
            del parent[path[-1]]
        elif kind < 0.8 and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))  # a model or source listed twice
        elif kind < 0.9 and isinstance(parent, dict):
            parent[rng.choice(["wieght", "densty", "t", "weight", "parameters", "model", "layer_range"])] = (
                copy.deepcopy(rng.choice(ODD_VALUES))
            )
        else:
            recipe["merge_method"] = rng.choice(["linear", "slerp", "ties", "dare_linear", "passthrough", "della"])
    text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    if rng.random() < 0.25:
        at = rng.randrange(len(text))
        edit = rng.choice(TEXT_EDITS)
        text = text[:at] + edit + text[at + (rng.random() < 0.5) :]
    if rng.random() < 0.05:  # a duplicated line: duplicate keys
        lines = text.splitlines(keepends=True)
        at = rng.randrange(len(lines))
        text = "".join(lines[: at + 1] + lines[at:])
    return text


def check_one(text: str, work: Path, capsys) -> int:
    recipe = work / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8", errors="surrogatepass")
    out = work / "out"
    code = main(["merge", str(recipe), str(out), "--quiet"])  # an exception escaping main fails the test
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code in (0, 2), (text, err)
    assert all(line.startswith(("medmerge: error: ", "medmerge: warning: ")) for line in lines), (text, err)
    assert [p for p in work.iterdir() if p.name.startswith(".")] == [], text
    if code == 2:
        assert any(line.startswith("medmerge: error: ") for line in lines) and not out.exists(), (text, err)
    else:
        weights = load_weights(out)
        assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), text
        shutil.rmtree(out)
    return code


def test_a_thousand_mutated_recipes_exit_0_or_2_cleanly(tiny, tmp_path: Path, capsys) -> None:
    rng = random.Random(SEED)
    recipes = seed_recipes(tiny)
    for recipe in recipes:  # the seeds themselves merge
        assert check_one(yaml.safe_dump(recipe, sort_keys=False), tmp_path, capsys) == 0
    codes = [check_one(mutate(recipes, rng), tmp_path, capsys) for _ in range(COUNT)]
    # the mutator must exercise both outcomes, or the test proves little
    assert codes.count(0) >= COUNT // 10 and codes.count(2) >= COUNT // 2, (codes.count(0), codes.count(2))
