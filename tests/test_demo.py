"""`medmerge demo` runs the whole loop offline and writes its report."""

from __future__ import annotations

import os

import pytest

from medmerge.demo import PARENTS, demo_recipes, run_demo


@pytest.mark.slow
def test_demo_builds_merges_evaluates_and_reports(tmp_path) -> None:
    environment = dict(os.environ)
    report = run_demo(tmp_path, progress=False)
    assert dict(os.environ) == environment  # the data mirror is set for the demo's own steps only
    text = report.read_text()
    for name in ["base", *PARENTS, *demo_recipes(tmp_path)]:
        assert f"| {name} | " in text
    assert all((tmp_path / "run" / "models" / n / "config.json").exists() for n in demo_recipes(tmp_path))
    assert "bioinstructqa" in text and "truthfulqa_health" in text
    assert report == tmp_path / "run" / "report" / "leaderboard.md"
    names = {p.name for p in report.parent.iterdir()}
    assert {"index.html", "leaderboard.csv", "pairwise.csv", "tasks.png", "truthfulqa_mc2.png"} <= names
    assert "## Merges against their parents" in text and "## Paired tests on bioinstructqa acc" in text
