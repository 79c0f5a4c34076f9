"""`medmerge demo`: the whole loop offline on tiny models — build, merge, evaluate with lm-eval, report.

Builds a tiny Mistral-shaped base model and two "parents" fine-tuned for a few CPU seconds on different corpora
(one on the MMLU fixture questions, one on MedQA/MedMCQA/PubMedQA), and
synthetic fixture copies of the task datasets (real schemas and file layouts), then runs an ordinary
experiment file: SLERP, TIES and DARE-TIES recipes, the two parents as a 2-expert mixture of experts (router rows from
prompts, then routers trained on the fixture train splits), their fixed-weight output ensemble and three trained
combiners of their outputs (weighted, late fusion, transformer), lm-eval on medmerge's BioInstructQA,
TruthfulQA-health and MedMCQA [INST] tasks for base, parents, merges and ensembles, and the report in `run/report/`
(leaderboard.md, index.html, figures, paired significance tests).
Needs no network; a few minutes at most on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import yaml

from medmerge.experiment import LmEvalSettings, lm_eval_command, run_experiment, scoped_environment
from medmerge.fixtures import build_data_mirror
from medmerge.tiny import build_model, build_tokenizer, finetune_on_answers
from medmerge_tasks.corpora import BIOINSTRUCTQA_CORPORA
from medmerge_tasks.sources import bioinstructqa_docs, truthfulqa_docs

# Each parent learns the answers of its own corpora and TruthfulQA categories (the synthetic fixture questions),
# so the report shows each parent strong on its side and the merges in between.
PARENTS = {
    "parent_mmlu": [c for c in BIOINSTRUCTQA_CORPORA if c.startswith("MMLU_")],
    "parent_medqa": ["MedQA", "MedQA-5_options", "MedMCQA", "PubMedQA"],
}
TRUTHFULQA_PARENTS = {"parent_mmlu": ["Health", "Nutrition"], "parent_medqa": ["Psychology", "Science"]}
TASKS = [
    "medmerge_bioinstructqa",
    "medmerge_truthfulqa_health",
    "medmerge_truthfulqa_health_truthful",
    "medmerge_medmcqa_inst",
]
FUSION_TASKS = ["medmerge_medmcqa_inst"]  # four options, as the combiners were trained on (the study's format)


def demo_moe(work: Path) -> dict:
    """The two specialists as a 2-expert Mixtral over the base's attention, router rows from prompts of each
    specialty (gate_mode hidden: the base runs them)."""
    models = work / "models"
    return {
        "base_model": str(models / "base"),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [
            {
                "source_model": str(models / "parent_mmlu"),
                "positive_prompts": ["anatomy, medical genetics, clinical knowledge, college biology and medicine"],
            },
            {
                "source_model": str(models / "parent_medqa"),
                "positive_prompts": ["A patient presents to the clinic. Which is the most likely diagnosis?"],
            },
        ],
    }


def router_training_split(out: Path) -> Path:
    """The demo's router-training questions: the four-option fixture questions of every corpus's train/dev split
    (never a test split), in MedMCQA's schema, as `train_router: {data: FILE}` reads them."""
    from medmerge_tasks.corpora import CORPORA
    from medmerge_tasks.sources import corpus_questions

    rows = []
    for name in CORPORA:
        for q in corpus_questions(name, "fewshot"):
            if len(q.options) == 4:
                rows.append(CORPORA["medmcqa"].write(dataclasses.replace(q, id=f"{name}-{len(rows)}"), "train"))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def demo_fusion(work: Path, epochs: int) -> dict:
    """The two specialists as the members of trained combiners, on the same fixture questions as the routers."""
    return {
        "members": [{"pretrained": str(work / "models" / p), "dtype": "float32"} for p in PARENTS],
        "data": str(work / "router_train.jsonl"),
        "validation_fraction": 0.25,
        "epochs": epochs,
        "patience": 20,
        "seeds": [0, 1],
    }


def demo_recipes(work: Path) -> dict[str, dict]:
    base, a, b = (str(work / "models" / n) for n in ("base", *PARENTS))
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


NOTE = (
    "Tiny models built on the spot: parent_mmlu was trained on the answers of the MMLU fixture questions, then of "
    "TruthfulQA's Health and Nutrition questions, parent_medqa on MedQA, MedMCQA and PubMedQA, then TruthfulQA's "
    "Psychology and Science (synthetic questions, under a minute of CPU training each), so the table shows two "
    "specialists and what merging them does. dare_ties answering much like the base is DARE at work, not a defect: "
    "dropping half of each parent's change at random and doubling the rest assumes many small, redundant changes (a "
    "7B fine-tune); these parents moved their 0.2M weights by about as much as the weights' own size, so the rescaled "
    "remainder is mostly noise (mergekit's dare_ties does the same on these parents). moe is the two parents as "
    "the experts of a 2-expert Mixtral over the base's attention (router rows from one prompt each), moe_router the "
    "same with its routers trained on the fixtures' train splits (MedMCQA [INST] prompt; its figure shows the "
    "per-layer routing). Both answer much like the base: each parent's MLPs learned beside its own fine-tuned "
    "attention, and a router choosing between them cannot restore that; the MoE studies' experts share the base's "
    "attention. ensemble averages the two parents' probabilities (fixed weights 0.5/0.5); fusion_weighted, "
    "fusion_late_fusion and fusion_transformer are combiners trained on the parents' outputs for the same fixture "
    "questions (MedMCQA [INST] prompt, four options), so they are scored on medmerge_medmcqa_inst only. It checks "
    "the pipeline, not medicine."
)


def build_demo_inputs(work: Path, quick: bool, say: Callable[..., None]) -> Path:
    """The fixture data mirror (work/data, returned) and the tiny base and parents (work/models), built once."""
    steps = (20, 5) if quick else (150, 30)
    models = work / "models"
    data = build_data_mirror(work / "data")
    if not all((models / p / "config.json").exists() for p in PARENTS):
        say("building a tiny base model, then two parents fine-tuned for a few CPU seconds on different corpora")
        build_tokenizer(models / "tokenizer", extra_text=["Answer: A B C D"] * 20)  # " B" one token, as in Mistral's
        build_model(models / "base", models / "tokenizer", seed=0)
        for name, corpora in PARENTS.items():
            with scoped_environment(MEDMERGE_DATA_DIR=str(data)):
                letters = [(d["prompts"][3], d["gold_letter"]) for c in corpora for d in bioinstructqa_docs(c)]
                answers = [
                    (d["prompts"][1], d["choices"][0])  # MC1's best answer comes first in TruthfulQA's data
                    for category in TRUTHFULQA_PARENTS[name]
                    for d in truthfulqa_docs(category, "truthfulqa_plain")
                ]
            # two stages: mixed into one, the longer TruthfulQA answers drown the one-letter BioInstructQA ones
            finetune_on_answers(models / "base", models / name, letters, steps=steps[0], seed=len(name))
            finetune_on_answers(models / name, models / name, answers, steps=steps[1], lr=1e-3, seed=len(name))
    return data


def run_demo(work: Path, progress: bool = True, verbose: bool = False, quick: bool = False) -> Path:
    """Build the tiny models and fixture data, then run the demo experiment; returns the report's leaderboard.md.

    `quick` (the test suite's configuration) runs every step with less training and two documents per task, so
    the parents barely learn: it checks the pipeline, not what the demo shows."""
    say = print if progress else (lambda *a, **k: None)
    work = work.resolve()
    data = build_demo_inputs(work, quick, say)
    recipe_dir = work / "recipes"
    recipe_dir.mkdir(parents=True, exist_ok=True)
    for name, recipe in demo_recipes(work).items():
        (recipe_dir / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (recipe_dir / "moe.yaml").write_text(yaml.safe_dump(demo_moe(work), sort_keys=False))
    (recipe_dir / "fusion.yaml").write_text(yaml.safe_dump(demo_fusion(work, 10 if quick else 100), sort_keys=False))
    with scoped_environment(MEDMERGE_DATA_DIR=str(data)):
        router_training_split(work / "router_train.jsonl")
    train_router = {"data": "router_train.jsonl", "validation_fraction": 0.25, "lr": 1e-2, "batch_size": 8}
    experiment = {
        "work_dir": "run",
        "recipes": [f"recipes/{name}.yaml" for name in demo_recipes(work)],
        "moes": [{"config": "recipes/moe.yaml", "train_router": train_router | {"epochs": 1 if quick else 4}}],
        "models": ["models/base", *(f"models/{p}" for p in PARENTS)],
        "ensembles": [{"name": "ensemble", "members": list(PARENTS), "weights": [0.5, 0.5], "combine": "prob"}],
        "fusions": [
            {
                "config": "recipes/fusion.yaml",
                "combiners": ["weighted", "late_fusion", "transformer"],
                "tasks": FUSION_TASKS,
            }
        ],
        "tasks": TASKS,
        "data_dir": "data",
        "note": NOTE,
        "fewshot_sets": [1],
        "lm_eval": {"model": "hf", "batch_size": 8, "dtype": "float32", "device": "cpu", "limit": 2 if quick else None},
    }
    path = work / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    say(f"running {path} (merges, lm-eval on synthetic fixture copies of the task datasets, report)")
    leaderboard = run_experiment(path, say=say, verbose=verbose)
    say(
        "to evaluate one of its rows by hand with plain lm-eval (here the ties merge):\n  "
        + lm_eval_command(
            str(work / "run" / "models" / "ties"),
            TASKS,
            1,
            LmEvalSettings(**experiment["lm_eval"]),
            work / "by-hand",
            str(data),
        )
    )
    return leaderboard


# --- `medmerge demo --search` ------------------------------------------------------------------------------

SEARCH_FITNESS = "medmerge_bioinstructqa_validation"  # held-out questions of the eight original corpora
SEARCH_TEST = "medmerge_bioinstructqa_original"  # the same corpora's test questions, in the same prompt


def demo_searches(work: Path, quick: bool) -> dict[str, dict]:
    """SLERP's t (attention and MLP) and TIES's weight and density per parent, each starting from the hand-picked
    settings BioMistral's merges use (t 0.5; weight 0.5, density 0.5), CMA-ES with a small budget."""
    t = {"range": [0.0, 1.0], "start": 0.5}
    weight_or_density = {"range": [0.1, 1.0], "start": 0.5}  # above 0: a weight 0 for both parents is no merge
    settings = {
        "fitness": [{"task": SEARCH_FITNESS, "metric": "acc"}],
        "optimizer": "cma",
        "seed": 0,
        "test_tasks": [SEARCH_TEST],
        "data_dir": str(work / "data"),
        "lm_eval": {"model": "hf", "batch_size": 8, "dtype": "float32", "device": "cpu", "limit": 2 if quick else None},
    }
    recipes = demo_recipes(work)  # the demo's recipes, their hand-picked values replaced by searched ones
    searched_t = {"t": [{"filter": "self_attn", "value": t}, {"filter": "mlp", "value": t}, {"value": 0.5}]}
    searched_ties = {"weight": weight_or_density, "density": weight_or_density}
    return {
        # the start point, then three CMA-ES generations of 6 (4 + 3 ln 2 for two dimensions)
        "slerp": recipes["slerp"] | {"parameters": searched_t, "search": settings | {"trials": 3 if quick else 19}},
        # the start point, then three CMA-ES generations of 8 (4 + 3 ln 4 for four dimensions)
        "ties": recipes["ties"]
        | {
            "models": [m | {"parameters": searched_ties} for m in recipes["ties"]["models"]],
            "search": settings | {"trials": 3 if quick else 25},
        },
    }


def run_search_demo(work: Path, progress: bool = True, quick: bool = False) -> Path:
    """Search the demo's SLERP and TIES parameters on held-out fixture questions from BioMistral's hand-picked
    settings, then evaluate the best and the hand-picked recipe beside the parents on the test questions; returns
    work/search/summary.md (the two searches side by side, and where their reports are)."""
    from medmerge.search.run import run_search

    say = print if progress else (lambda *a, **k: None)
    work = work.resolve()
    build_demo_inputs(work, quick, say)
    out = work / "search"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, space in demo_searches(work, quick).items():
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(space, sort_keys=False))
        say(f"searching {path} ({space['search']['trials']} trials: fitness {SEARCH_FITNESS} acc)")
        found = run_search(path, out / name, say=say)
        assert found.start is not None and found.report is not None  # every demo search has both
        test = _test_acc(found.report)
        point = ", ".join(f"{k} {v:.3f}" for k, v in found.best.point.items())
        rows.append(
            f"| {name} | {found.start.fitness:.3f} | {found.best.fitness:.3f} | "
            f"{found.best.fitness - found.start.fitness:+.3f} | {test.get('start', test['best']):.3f} | "
            f"{test['best']:.3f} | {point} | {found.report.relative_to(out)} |"
        )
    summary = out / "summary.md"
    summary.write_text(
        "# `medmerge demo --search`\n\n"
        f"acc on {SEARCH_FITNESS} (validation: the held-out questions searched on) and on {SEARCH_TEST} (test: "
        "questions the search never saw; each report puts the best recipe (`best`) beside the hand-picked one "
        "(`start`) and the parents, with paired tests). Tiny models and 32 / 40 synthetic questions: it checks the "
        "pipeline, not medicine, and a gain this size on validation is within noise on test.\n\n"
        "| search | start, validation | best, validation | gain | start, test | best, test | best point | report |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    say(summary.read_text())
    return summary


def _test_acc(leaderboard: Path) -> dict[str, float]:
    """Each row's acc on SEARCH_TEST, from the final report's leaderboard.csv."""
    import csv

    with (leaderboard.parent / "leaderboard.csv").open(newline="") as file:
        column = f"{SEARCH_TEST.removeprefix('medmerge_')} acc"
        return {row["model"]: float(row[column]) for row in csv.DictReader(file)}


# --- `medmerge demo --methods all` ---------------------------------------------------------------------------

# each parent's specialty: the BioInstructQA tasks of the corpora it was trained on
SPECIALTIES = {parent: [BIOINSTRUCTQA_CORPORA[corpus][0] for corpus in corpora] for parent, corpora in PARENTS.items()}


def comparable_methods() -> list[str]:
    """Every merge method but passthrough, which copies one model."""
    from merge.methods import METHODS

    return [name for name in METHODS if name != "passthrough"]


def chosen_methods(spec: str) -> list[str]:
    """`all`, or a comma-separated list of method names (unknown ones refused, with a suggestion)."""
    from medmerge_common.errors import UserError, did_you_mean

    known = comparable_methods()
    if spec == "all":
        return known
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in known:
            raise UserError(f"--methods: no merge method '{name}' to compare{did_you_mean(name, known)}")
    if not names:
        raise UserError("--methods: give 'all' or method names separated by commas")
    return names


def method_recipes(work: Path, methods: list[str] | None = None) -> dict[str, dict]:
    """The demo's two parents merged by each method (default: every one but passthrough), at its declared defaults
    (0.5 where a method requires a value: weight, t). Methods of a base and one other model (slerp, nearswap,
    arcee_fusion) go from parent_mmlu to parent_medqa, as the demo's slerp does; methods relative to a base get
    the demo's base model; the others merge the two parents alone."""
    from merge.methods import METHODS, REQUIRED

    base, a, b = (str(work / "models" / n) for n in ("base", *PARENTS))
    recipes = {}
    for name in methods or comparable_methods():
        method = METHODS[name]
        required = {p.name: 0.5 for p in method.params if p.default is REQUIRED and not p.tensor_file}
        shared = {k: v for k, v in required.items() if not method.param(k).per_model}
        own = {k: v for k, v in required.items() if method.param(k).per_model}
        recipe: dict = {"merge_method": name, "dtype": "float32"}
        if method.max_models == 1:
            recipe["base_model"], models = a, [b]
        else:
            models = [a, b]
            if method.needs_base:
                recipe["base_model"] = base
        if shared:
            recipe["parameters"] = shared
        recipe["models"] = []
        for model in models:
            files = {p.name: str(fisher_dir(work, Path(model).name)) for p in method.params if p.tensor_file}
            recipe["models"].append({"model": model} | ({"parameters": own | files} if own or files else {}))
        recipes[name] = recipe
    return recipes


def fisher_dir(work: Path, parent: str) -> Path:
    return work / "methods" / "fishers" / parent


def estimate_parent_fishers(work: Path, say: Callable[..., None]) -> None:
    """The parents' diagonal Fishers for the `fisher` method (`medmerge fisher`, the paper's sampled estimator), on
    the fixtures' train questions with their answers (router_train.jsonl: never a test question); kept once made."""
    from medmerge.fisher import estimate_fisher

    data = work / "router_train.jsonl"
    with scoped_environment(MEDMERGE_DATA_DIR=str(work / "data")):
        router_training_split(data)
    for parent in PARENTS:
        if not (fisher_dir(work, parent) / "fisher.json").is_file():
            estimate_fisher(str(work / "models" / parent), str(data), fisher_dir(work, parent), say=lambda _: None)
            say(f"estimated {parent}'s Fisher on {data.name} ({fisher_dir(work, parent)})")


def run_methods_demo(work: Path, methods: list[str] | None = None, progress: bool = True, quick: bool = False) -> Path:
    """Merge the demo's parents with each method (default: all), evaluate each on BioInstructQA (both
    specialties) beside the parents and the base, and write work/methods/summary.md: one row per method with each
    specialty's acc, their mean, the paired tests against both parents and the merge time; returns its path."""
    say = print if progress else (lambda *a, **k: None)
    work = work.resolve()
    build_demo_inputs(work, quick, say)
    out = work / "methods"
    recipe_dir = out / "recipes"
    recipe_dir.mkdir(parents=True, exist_ok=True)
    recipes = method_recipes(work, methods)
    if "fisher" in recipes:
        estimate_parent_fishers(work, say)
    for stale in recipe_dir.glob("*.yaml"):  # an earlier run's choice of methods
        stale.unlink()
    for name, recipe in recipes.items():
        (recipe_dir / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    experiment = {
        "work_dir": ".",
        "recipes": [f"recipes/{name}.yaml" for name in recipes],
        "models": [str(work / "models" / n) for n in ("base", *PARENTS)],
        "tasks": ["medmerge_bioinstructqa"],
        "data_dir": str(work / "data"),
        "fewshot_sets": [1],
        "note": "Every merge method on the demo's two parents at its defaults: see summary.md beside this report.",
        "lm_eval": {"model": "hf", "batch_size": 8, "dtype": "float32", "device": "cpu", "limit": 2 if quick else None},
    }
    (out / "experiment.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    say(f"merging the two parents with {len(recipes)} methods and evaluating each ({out / 'experiment.yaml'})")
    leaderboard = run_experiment(out / "experiment.yaml", say=say)
    summary = out / "summary.md"
    summary.write_text(_methods_summary(recipes, leaderboard, out))
    say(summary.read_text())
    return summary


def _methods_summary(recipes: dict[str, dict], leaderboard: Path, out: Path) -> str:
    import csv

    from medmerge.experiment import MERGE_SECONDS_FILE

    with (leaderboard.parent / "leaderboard.csv").open(newline="") as file:
        rows = {row["model"]: row for row in csv.DictReader(file)}
    with (leaderboard.parent / "pairwise.csv").open(newline="") as file:
        tests = {
            (row["model_a"], row["model_b"]): (float(row["delta_a_minus_b"]), float(row["p"]))
            for row in csv.DictReader(file)
            if row["task"] == "medmerge_bioinstructqa" and row["metric"] == "acc,none"
        }

    def specialty(model: str, parent: str) -> float:
        return sum(float(rows[model][f"{task} acc"]) for task in SPECIALTIES[parent]) / len(SPECIALTIES[parent])

    def against(model: str, parent: str) -> str:
        delta, p = (
            tests[(model, parent)]
            if (model, parent) in tests
            else (-tests[(parent, model)][0], tests[(parent, model)][1])
        )
        delta = round(delta, 3) + 0.0  # no "-0.000"
        mark = ("*" if delta > 0 else "†") if p < 0.05 and abs(delta) >= 0.001 else ""
        return f"{delta:+.3f} (p {p:.2g}){mark}"

    mmlu, medqa = PARENTS
    lines = [
        "# `medmerge demo --methods all`",
        "",
        "Every merge method on the demo's two parents, at its declared defaults (0.5 where a value is required: "
        f"weight, t); BioInstructQA acc, shot set 1. `{mmlu}` side: the mean acc of its six MMLU tasks; `{medqa}` "
        "side: of MedQA (4 and 5 options), MedMCQA and PubMedQA. Against each parent: Δ and p of the paired test "
        "on the whole group (bioinstructqa acc; * better, † worse at p < 0.05). Merge: wall time of the merge. "
        "Rows that tie are methods that coincide at these defaults (density 1 drops nothing, so DARE, "
        "Breadcrumbs and DELLA's linear forms are task arithmetic, which with weights 0.5 is the average, as is "
        "RAM on two models). Tiny models and synthetic questions (six per corpus): it checks the pipeline and "
        "shows how the methods differ, not which is best for medicine.",
        "",
        f"| method | {mmlu} side | {medqa} side | mean | vs {mmlu} | vs {medqa} | merge s |",
        "|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(rows, key=lambda m: -(specialty(m, mmlu) + specialty(m, medqa)))
    for model in ranked:
        a, b = specialty(model, mmlu), specialty(model, medqa)
        if model in recipes:
            seconds = float((out / "models" / model / MERGE_SECONDS_FILE).read_text())
            tail = f"{against(model, mmlu)} | {against(model, medqa)} | {seconds:.2f}"
        else:
            tail = "— | — | —"  # a parent or the base
        lines.append(f"| {model} | {a:.3f} | {b:.3f} | {(a + b) / 2:.3f} | {tail} |")
    return "\n".join(lines) + "\n"
