"""`medmerge demo` runs the whole loop offline and writes its report."""

from __future__ import annotations

import os

import pytest

from medmerge.demo import NOTE, PARENTS, demo_recipes, run_demo
from medmerge.experiment import run_experiment


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
