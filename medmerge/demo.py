"""`medmerge demo`: the whole loop offline on tiny models — build, merge, evaluate with lm-eval, report.

Builds a tiny Mistral-shaped base model and two "parents" (the base plus different seeded perturbations),
merges them with SLERP, TIES and DARE-TIES through ordinary recipe files, evaluates base, parents and merges
with lm-eval's `hf` model on a small multiple-choice fixture task, and writes `report.md`.
Needs no network; a few minutes at most on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from medmerge.tiny import build_model, build_tokenizer, perturbed_copy
from merge.run import run_merge

PARENTS = {"parent_a": 1, "parent_b": 2}


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


def fixture_task(work: Path, n: int = 24) -> Path:
    """A small multiple-choice task in BioMistral's prompt format, as an lm-eval task directory."""
    rng = random.Random(0)
    organs = ["heart", "liver", "kidney", "lung", "pancreas", "brain", "skin", "bone"]
    rows = []
    for i in range(n):
        options = rng.sample(organs, 4)
        gold = rng.randrange(4)
        rows.append({"question": f"Which organ is described in case {i}?", "options": options, "gold": gold})
    task_dir = work / "task"
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "demo_organs.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "medmerge_demo_organs",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(task_dir / "test.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "The following are multiple choice questions (with answers) about medical knowledge. \n "
                "**Question:** {{question}} \n (A) {{options[0]}} \n (B) {{options[1]}} \n (C) {{options[2]}}"
                " \n (D) {{options[3]}} \n **Answer:**(",
                "doc_to_choice": ["A", "B", "C", "D"],
                "doc_to_target": "gold",
                "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            },
            sort_keys=False,
        )
    )
    return task_dir


def run_demo(work: Path, progress: bool = True) -> Path:
    """Build, merge, evaluate, report; returns the report's path."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    say = print if progress else (lambda *a, **k: None)
    models = work / "models"
    if not (models / "parent_b" / "config.json").exists():
        say("[1/4] building a tiny base model and two parents")
        build_tokenizer(models / "tokenizer")
        build_model(models / "base", models / "tokenizer", seed=0)
        for name, seed in PARENTS.items():
            perturbed_copy(models / "base", models / name, 0.3, seed=seed)
    say("[2/4] merging: " + ", ".join(demo_recipes(work)))
    recipe_dir = work / "recipes"
    recipe_dir.mkdir(parents=True, exist_ok=True)
    for name, recipe in demo_recipes(work).items():
        path = recipe_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run_merge(path, models / f"merged_{name}", overwrite=True, seed=0)
    say("[3/4] evaluating with lm-eval")
    task_dir = fixture_task(work)
    manager = TaskManager(include_path=str(task_dir))
    scores = {}
    for name in ["base", *PARENTS, *(f"merged_{n}" for n in demo_recipes(work))]:
        result = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={models / name},dtype=float32",
            tasks=["medmerge_demo_organs"],
            task_manager=manager,
            batch_size=8,
            device="cpu",
            verbosity="ERROR",
        )
        metrics = result["results"]["medmerge_demo_organs"]
        scores[name] = (metrics["acc,none"], metrics["acc_stderr,none"])
        say(f"      {name:20} acc {scores[name][0]:.3f}")
    say("[4/4] writing the report")
    lines = [
        "# medmerge demo",
        "",
        "Tiny models built on the spot; accuracy on a 24-question fixture task.",
        "",
        "| model | acc | stderr |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {acc:.3f} | {err:.3f} |" for name, (acc, err) in scores.items()]
    report = work / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
