"""`medmerge demo`: the whole loop offline on tiny models — build, merge, evaluate with lm-eval, report.

Builds a tiny Mistral-shaped base model and two "parents" (the base plus different seeded perturbations) and
synthetic fixture copies of the task datasets (real schemas and file layouts), then runs an ordinary
experiment file: SLERP, TIES and DARE-TIES recipes, lm-eval's `hf` model on medmerge's BioInstructQA and
TruthfulQA-health tasks for base, parents and merges, and `run/leaderboard.md`.
Needs no network; a few minutes at most on 2 CPU cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from medmerge.experiment import run_experiment
from medmerge.fixtures import build_data_mirror
from medmerge.tiny import build_model, build_tokenizer, perturbed_copy

PARENTS = {"parent_a": 1, "parent_b": 2}
TASKS = ["medmerge_bioinstructqa", "medmerge_truthfulqa_health", "medmerge_truthfulqa_health_truthful"]


def demo_recipes(work: Path) -> dict[str, dict]:
    base, a, b = (str(work / "models" / n) for n in ("base", "parent_a", "parent_b"))
    half = {"weight": 0.5, "density": 0.5}
    return {
        "slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "dtype": "float32",
            "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "dtype": "float32",
            "parameters": {"normalize": True},
            "models": [{"model": a, "parameters": half}, {"model": b, "parameters": half}],
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": base,
            "dtype": "float32",
            "parameters": {"int8_mask": True},
            "models": [{"model": a, "parameters": half}, {"model": b, "parameters": half}],
        },
    }


def run_demo(work: Path, progress: bool = True) -> Path:
    """Build the tiny models and fixture data, then run the demo experiment; returns the leaderboard's path."""
    say = print if progress else (lambda *a, **k: None)
    work = work.resolve()
    models = work / "models"
    if not (models / "parent_b" / "config.json").exists():
        say("building a tiny base model and two parents")
        build_tokenizer(models / "tokenizer")
        build_model(models / "base", models / "tokenizer", seed=0)
        for name, seed in PARENTS.items():
            perturbed_copy(models / "base", models / name, 0.3, seed=seed)
    os.environ["MEDMERGE_DATA_DIR"] = str(build_data_mirror(work / "data"))
    recipe_dir = work / "recipes"
    recipe_dir.mkdir(parents=True, exist_ok=True)
    for name, recipe in demo_recipes(work).items():
        (recipe_dir / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    experiment = {
        "work_dir": "run",
        "recipes": [f"recipes/{name}.yaml" for name in demo_recipes(work)],
        "models": ["models/base", *(f"models/{p}" for p in PARENTS)],
        "tasks": TASKS,
        "fewshot_sets": [1],
        "lm_eval": {"model": "hf", "batch_size": 8, "dtype": "float32", "device": "cpu"},
    }
    path = work / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    say(f"running {path} (merges, lm-eval on synthetic fixture copies of the task datasets, leaderboard)")
    leaderboard = run_experiment(path, say=say)
    note = (
        "\nTiny models built on the spot; the parents are seeded perturbations of an untrained base, so scores "
        "sit near chance: this checks the pipeline (merge -> lm-eval -> report), not medicine.\n"
    )
    leaderboard.write_text(leaderboard.read_text() + note)
    return leaderboard
