"""Folding rules on small hand-written results files: reruns, prompt settings, parents from a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medmerge.report.pairwise import compare
from medmerge.report.results import read_runs
from medmerge.report.table import build_leaderboard


def write(root: Path, name: str, model: str, acc: float, date: float, shot_set: int = 1, shots: int = 3) -> Path:
    path = root / name / f"results_2026-01-0{int(date)}T00-00-00.json"
    path.parent.mkdir(parents=True)
    data = {
        "model_name": model,
        "date": date,
        "config": {"model": "hf", "model_args": {"pretrained": model}, "fewshot_seed": 1234},
        "configs": {"task_a": {"metadata": {"fewshot_set": shot_set, "shots": shots}}},
        "results": {"task_a": {"acc,none": acc, "acc_stderr,none": 0.01}},
    }
    path.write_text(json.dumps(data))
    return path


def test_a_rerun_with_the_same_seed_replaces_the_older_one_and_is_noted(tmp_path: Path) -> None:
    old = write(tmp_path, "a", "org/model", 0.40, 1)
    new = write(tmp_path, "b", "org/model", 0.50, 2)
    write(tmp_path, "c", "org/model", 0.70, 3, shot_set=2)
    runs, warnings = read_runs([tmp_path])
    board = build_leaderboard(runs, warnings)
    (row,) = board.rows
    assert sorted(row.cells[board.columns[0]].values) == [0.5, 0.7]  # 0.40 superseded by 0.50 (same shot set)
    assert warnings == [f"{old}: superseded by the newer run {new} (same model, settings and seed)"]


def test_other_prompt_settings_are_separate_rows_with_their_setting_in_the_label(tmp_path: Path) -> None:
    write(tmp_path, "a", "org/model", 0.40, 1, shots=3)
    write(tmp_path, "b", "org/model", 0.60, 2, shots=0)
    write(tmp_path, "c", "org/other", 0.50, 3, shots=0)
    board = build_leaderboard(*read_runs([tmp_path]))
    assert [r.label for r in board.rows] == ["org/model [shots 0]", "org/other", "org/model [shots 3]"]
    assert [r.rank for r in board.rows] == [1, 2, 3]
    assert all(len(r.cells[board.columns[0]].values) == 1 for r in board.rows)


def test_parents_from_the_recipe_when_the_card_names_none(tmp_path: Path) -> None:
    merged = tmp_path / "models" / "merged"
    merged.mkdir(parents=True)
    (merged / "README.md").write_text("# a merge without front matter\n")
    recipe = {"merge_method": "slerp", "base_model": "org/a", "models": [{"model": "org/a"}, {"model": "org/b"}]}
    (merged / "mergekit_config.yml").write_text(yaml.safe_dump(recipe))
    write(tmp_path, "r1", str(merged), 0.8, 1)
    write(tmp_path, "r2", "org/a", 0.6, 2)
    write(tmp_path, "r3", "org/b", 0.7, 3)
    board = build_leaderboard(*read_runs([tmp_path]))
    top = board.rows[0]
    assert top.label == "merged" and top.parents_from == "mergekit_config.yml"
    assert [p.label for p in top.parents] == ["org/a", "org/b"] and top.missing_parents == []
    assert top.beats_all_parents(board.columns[0])
    comparisons, notes = compare(board)
    assert comparisons == [] and notes == []  # no --log_samples: no tests, nothing to complain about


def test_a_fine_tune_card_is_not_a_merge(tmp_path: Path) -> None:
    model = tmp_path / "ft"
    model.mkdir()
    (model / "README.md").write_text("---\nbase_model: org/a\ntags: [medical]\n---\n# a fine-tune\n")
    write(tmp_path, "r1", str(model), 0.8, 1)
    board = build_leaderboard(*read_runs([tmp_path]))
    assert board.rows[0].parent_refs == []


def test_rank_by_an_unknown_column_lists_the_columns(tmp_path: Path) -> None:
    write(tmp_path, "a", "org/model", 0.40, 1)
    with pytest.raises(ValueError, match="columns: task_a acc"):
        build_leaderboard(*read_runs([tmp_path]), rank_by="nope")
    with pytest.raises(ValueError, match=r"'task_a accc' is not a column \(did you mean 'task_a acc'\?\)"):
        build_leaderboard(*read_runs([tmp_path]), rank_by="task_a accc")


def test_std_of_repeated_runs_is_the_papers_population_std_unless_sample_is_asked(tmp_path: Path) -> None:
    import statistics

    for i, acc in enumerate((0.40, 0.50, 0.70), 1):
        write(tmp_path, f"r{i}", "org/model", acc, i, shot_set=i)
    runs, warnings = read_runs([tmp_path])
    population = build_leaderboard(runs, warnings).rows[0].cells
    sample = build_leaderboard(runs, warnings, std="sample").rows[0].cells
    (column,) = population
    assert population[column].err == pytest.approx(statistics.pstdev([0.4, 0.5, 0.7]))  # 0.1247
    assert sample[column].err == pytest.approx(statistics.stdev([0.4, 0.5, 0.7]))  # 0.1528, x1.22 for n = 3
    assert population[column].err_kind == "population std over 3 runs"
    with pytest.raises(ValueError, match="unknown std 'median'"):
        build_leaderboard(runs, warnings, std="median")


def test_a_group_value_that_matches_neither_weighting_gets_no_group_test(tmp_path: Path) -> None:
    """A group's paired test weights its tasks as lm-eval did; a value neither weighting gives is not tested."""
    for name, model, scores, group_value in (("a", "org/a", (1, 1, 0, 0), 0.9), ("b", "org/b", (0, 1, 1, 0), 0.9)):
        path = tmp_path / name / "results_2026-01-01T00-00-00.json"
        path.parent.mkdir(parents=True)
        data = {
            "model_name": model,
            "date": 1.0,
            "config": {"model": "hf", "model_args": {"pretrained": model}},
            "configs": {t: {"metadata": {"fewshot_set": 1}} for t in ("t1", "t2")},
            "results": {"t1": {"acc,none": 0.5}, "t2": {"acc,none": 0.5}, "grp": {"acc,none": group_value}},
            "group_subtasks": {"grp": ["t1", "t2"]},
        }
        path.write_text(json.dumps(data))
        for task in ("t1", "t2"):
            lines = [
                {"doc_id": d, "doc": {"q": d}, "filter": "none", "metrics": ["acc"], "acc": float(s)}
                for d, s in enumerate(scores)
            ]
            (path.parent / f"samples_{task}_2026-01-01T00-00-00.jsonl").write_text(
                "".join(json.dumps(line) + "\n" for line in lines)
            )
    board = build_leaderboard(*read_runs([tmp_path]))
    comparisons, notes = compare(board, iterations=100)
    assert [c.column.task for c in comparisons] == ["t1", "t2"]  # the tasks are tested, the group is not
    assert notes == ["grp acc: group value not reproducible from its tasks, no group-level test"]


def test_shots_come_from_lm_evals_n_shot_and_from_the_older_metadata_alike(tmp_path: Path) -> None:
    """Fixed-shot tasks set num_fewshot (lm-eval's n-shot); results written before carry metadata.shots."""
    write(tmp_path, "old", "org/model", 0.40, 1, shots=0)
    path = write(tmp_path, "new", "org/model", 0.60, 2, shot_set=2, shots=0)
    data = json.loads(path.read_text())
    data["configs"]["task_a"]["metadata"].pop("shots")
    data["n-shot"] = {"task_a": 0}
    path.write_text(json.dumps(data))
    board = build_leaderboard(*read_runs([tmp_path]))
    (row,) = board.rows  # one row: both runs are 0-shot, shot sets 1 and 2
    assert row.label == "org/model" and len(row.cells[board.columns[0]].values) == 2


def test_truthfulqa_panels_group_each_pairing_as_the_study_did() -> None:
    from medmerge.report.plots import pairings
    from medmerge.report.table import Row

    bio, v1, v2, lone = (Row(model=m, variant=(), runs=[], label=m) for m in ("bio", "v1", "v2", "lone"))
    merges = [Row(model=m, variant=(), runs=[], label=m) for m in ("ties1", "slerp1", "ties2")]
    merges[0].parents, merges[1].parents, merges[2].parents = [bio, v1], [v1, bio], [bio, v2]
    panels = pairings([bio, v1, v2, *merges, lone])
    assert [(title, [r.label for r in members]) for title, members in panels] == [
        ("bio × v1", ["bio", "v1", "ties1", "slerp1"]),
        ("bio × v2", ["bio", "v2", "ties2"]),
        ("other models", ["lone"]),
    ]
    assert [t for t, _ in pairings([bio, lone])] == ["models"]
