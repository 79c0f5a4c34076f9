"""`medmerge demo` runs the whole loop offline and writes its report; `medmerge demo --search` searches the demo's
merges from the hand-picked settings and reports the best beside them on test questions."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from medmerge.demo import (
    NOTE,
    PARENTS,
    SEARCH_FITNESS,
    SEARCH_TEST,
    chosen_methods,
    demo_recipes,
    demo_searches,
    estimate_parent_fishers,
    method_recipes,
    run_demo,
    run_methods_demo,
    run_search_demo,
)
from medmerge.experiment import run_experiment
from medmerge.fixtures import build_data_mirror
from medmerge.search.run import JOURNAL
from medmerge_common.errors import UserError


@pytest.fixture(scope="module")
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo directory for the module: the search demo reuses the demo's models, as `--search` after a demo does."""
    return tmp_path_factory.mktemp("demo")


@pytest.mark.slow
def test_demo_builds_merges_evaluates_and_reports(tmp_path, capsys) -> None:
    """The demo's every step, in its quick configuration (little training, two documents per task); what the full
    demo shows is measured by hand (README)."""
    ours = {k: v for k, v in os.environ.items() if k.startswith("MEDMERGE_")}
    report = run_demo(tmp_path, quick=True)
    # the data mirror is set for the demo's own steps only (torch and hf_xet set variables of their own on import)
    assert {k: v for k, v in os.environ.items() if k.startswith("MEDMERGE_")} == ours
    printed = capsys.readouterr().out
    assert "[eval 8/12] parent_medqa, shot set 1  (" in printed and "left)" in printed
    command = printed.split("(here the ties merge):\n  ", 1)[1].splitlines()[0]
    assert command.startswith(f"MEDMERGE_DATA_DIR={tmp_path / 'data'} lm_eval --model hf --model_args pretrained=")
    assert "--metadata '{\"fewshot_set\": 1}'" in command and "--limit 2" in command
    text = report.read_text()
    fusions = ["fusion_weighted", "fusion_late_fusion", "fusion_transformer"]
    for name in ["base", *PARENTS, *demo_recipes(tmp_path), "moe", "moe_router", "ensemble", *fusions]:
        assert f"| {name} | " in text
    # the combiners trained once per member (their outputs cached), then were scored on four-option questions only
    assert printed.count("running on") == 2 and printed.count("questions cached") == 4
    fused = [line for line in text.splitlines() if line.startswith(f"|  | {fusions[0]} |")]
    assert fused and fused[0].count("±") == 2  # medmerge_medmcqa_inst's acc and exact_match, nothing else
    assert all((tmp_path / "run" / "models" / n / "config.json").exists() for n in demo_recipes(tmp_path))
    assert "bioinstructqa" in text and "truthfulqa_health" in text
    assert report == tmp_path / "run" / "report" / "leaderboard.md"
    names = {p.name for p in report.parent.iterdir()}
    assert {"index.html", "leaderboard.csv", "pairwise.csv", "tasks.png", "truthfulqa_mc2.png"} <= names
    assert "[moe 1/1] moe_router: training the routers on router_train.jsonl" in printed
    assert (tmp_path / "run" / "models" / "moe_router" / "router_training.json").is_file()
    assert sum(name.startswith("routers_") for name in names) == 1 and "expert choice per layer" in text
    assert "## Merges against their parents" in text and "## Paired tests on bioinstructqa acc" in text
    assert NOTE in text
    # the note is the experiment file's: running the demo's experiment again keeps it (and redoes nothing)
    assert run_experiment(tmp_path / "experiment.yaml", say=lambda _: None) == report and NOTE in report.read_text()


@pytest.mark.slow
def test_search_demo_starts_from_the_hand_picked_settings_and_reports_them_on_test(tmp_path, capsys) -> None:
    """`medmerge demo --search` in the quick configuration (three trials per search, two documents per task)."""
    summary_path = run_search_demo(tmp_path, quick=True)
    printed = capsys.readouterr().out
    assert "building a tiny base model" not in printed  # the demo's models, reused
    assert summary_path == tmp_path / "search" / "summary.md"
    summary = summary_path.read_text()
    for name, space in demo_searches(tmp_path, quick=True).items():
        out = tmp_path / "search" / name
        trials = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()[1:]]
        assert len(trials) == 3 and space["search"]["fitness"] == [{"task": SEARCH_FITNESS, "metric": "acc"}]
        assert all(value == 0.5 for value in trials[0]["point"].values())  # BioMistral's settings come first
        start = trials[0]["fitness"]
        best = max(t["fitness"] for t in trials)
        board = (out / "final" / "report" / "leaderboard.md").read_text()
        ranked = re.findall(r"^\| \d+ \| (\w+) \| \d+ \| ([\d.]+) ±", board, flags=re.M)  # rank, model, runs, acc
        test = dict(ranked)
        test.setdefault("start", test["best"])  # the start point was the best: one row
        assert (
            f"| {name} | {start:.3f} | {best:.3f} | {best - start:+.3f} | {test['start']} | {test['best']} | "
            in summary
        ), (summary, test)
        assert SEARCH_TEST.removeprefix("medmerge_") in board
        arms = ["best", *PARENTS] + (["start"] if best > start else [])
        assert all(f"| {arm} | " in board for arm in arms), board
        assert yaml.safe_load((out / "start.yaml").read_text())["merge_method"] == name


def test_every_method_has_a_comparison_recipe_that_plans(tmp_path) -> None:
    """`--methods all`'s recipes: one per method but passthrough, each a valid merge of the demo's models (planned
    with a dry run, nothing read)."""
    from medmerge.tiny import build_model, build_tokenizer
    from merge.methods import METHODS
    from merge.run import run_merge

    models = tmp_path / "models"
    if not (models / "base").exists():  # the demo test built them when it ran first; else the untrained three
        build_tokenizer(models / "tokenizer", extra_text=["Answer: A B C D"] * 20)
        for name in ("base", *PARENTS):
            build_model(models / name, models / "tokenizer", seed=len(name))
    recipes = method_recipes(tmp_path)
    assert set(recipes) == set(METHODS) - {"passthrough"}
    build_data_mirror(tmp_path / "data")
    estimate_parent_fishers(tmp_path, say=lambda _: None)  # the fisher method's inputs
    assert recipes["slerp"]["base_model"].endswith("parent_mmlu") and recipes["slerp"]["parameters"] == {"t": 0.5}
    assert recipes["ties"]["base_model"].endswith("base") and "parameters" not in recipes["ties"]  # density 1
    for name, recipe in recipes.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert run_merge(path, tmp_path / "never" / name, dry_run=True).plan.jobs, name
    assert chosen_methods("all") == list(recipes)
    assert chosen_methods("slerp, ties") == ["slerp", "ties"]
    with pytest.raises(UserError, match=r"no merge method 'tie' to compare \(did you mean 'ties'\?\)"):
        chosen_methods("slerp,tie")


@pytest.mark.slow
def test_methods_demo_tabulates_each_method_against_both_parents(tmp_path, capsys) -> None:
    """`medmerge demo --methods slerp,consensus_ties,nearswap` in the quick configuration (two documents per
    task): the table's rows, their means, order, tests and merge times."""
    recipes = method_recipes(tmp_path, ["slerp", "consensus_ties", "nearswap"])
    summary = run_methods_demo(tmp_path, list(recipes), quick=True).read_text()
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (.*) \|$", summary, flags=re.M)
    assert {row[0] for row in rows} == set(recipes) | {"base", *PARENTS}
    for name, mmlu, medqa, mean, rest in rows:
        assert float(mean) == pytest.approx((float(mmlu) + float(medqa)) / 2, abs=1e-3)
        if name in recipes:  # Δ (p) against each parent, and the merge's seconds from the experiment
            test = r"[+-][\d.]+ \(p [\d.e-]+\)[*†]?"
            assert re.fullmatch(rf"{test} \| {test} \| [\d.]+", rest), rest
    means = [float(row[3]) for row in rows]
    assert means == sorted(means, reverse=True)
    board = (tmp_path / "methods" / "report" / "leaderboard.md").read_text()
    assert all(f"| {name} | " in board for name in recipes)
