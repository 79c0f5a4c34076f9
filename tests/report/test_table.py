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
