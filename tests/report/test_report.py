"""`medmerge report` on what real lm-eval runs of tiny built models write (results + --log_samples files)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from medmerge import fixtures
from medmerge.experiment import LmEvalSettings, evaluate, scoped_environment
from medmerge.report import build_report
from merge.run import run_merge

TASKS = [
    "medmerge_bioinstructqa",
    "medmerge_truthfulqa_health",
    "medmerge_truthfulqa_health_truthful",
    "medmerge_truthfulqa_health_mcq",
    "medmerge_truthfulqa_health_mcq_truthful",
]


@pytest.fixture(scope="module")
def outputs(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """lm-eval output directories: base twice (shot sets 1 and 2), ft1 and a TIES merge of ft1 + ft2 over base
    once each, `other` on TruthfulQA only. ft2 is never evaluated (a parent the report must call missing)."""
    root = tmp_path_factory.mktemp("lm_eval_outputs")
    data = fixtures.build_data_mirror(root / "data")
    recipe = root / "ties.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "ties",
                "base_model": str(tiny["base"]),
                "dtype": "float32",
                "models": [
                    {"model": str(tiny["ft1"]), "parameters": {"weight": 1.0, "density": 0.3}},
                    {"model": str(tiny["ft2"]), "parameters": {"weight": 1.0, "density": 0.3}},
                ],
            }
        )
    )
    run_merge(recipe, root / "models" / "merged")
    settings = LmEvalSettings(device="cpu", dtype="float32", limit=6, batch_size=16)
    dirs = {}
    with scoped_environment(MEDMERGE_DATA_DIR=str(data)):
        for name, pretrained, shot_set, tasks in [
            ("base1", tiny["base"], 1, TASKS),
            ("base2", tiny["base"], 2, TASKS),
            ("ft1", tiny["ft1"], 1, TASKS),
            ("merged", root / "models" / "merged", 1, TASKS),
            ("other", tiny["other"], 1, TASKS[1:2]),
        ]:
            dirs[name] = root / "results" / name
            evaluate(str(pretrained), tasks, shot_set, settings, dirs[name])
    dirs["root"] = root / "results"
    dirs["merged_model"] = root / "models" / "merged"
    return dirs


@pytest.fixture(scope="module")
def report(outputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    build_report([outputs["root"]], out, title="tiny models", bootstrap=2000)
    return out


def _results(directory: Path) -> dict:
    return json.loads(next(directory.rglob("results_*.json")).read_text())


def _csv(report: Path, name: str = "leaderboard.csv") -> list[dict[str, str]]:
    with (report / name).open() as f:
        return list(csv.DictReader(f))


def _rows(report: Path) -> dict[str, dict[str, str]]:
    return {row["model"]: row for row in _csv(report)}


def test_writes_every_part(report: Path) -> None:
    names = {p.name for p in report.iterdir()}
    assert {"leaderboard.md", "leaderboard.csv", "pairwise.csv", "index.html", "tasks.png"} <= names
    assert {
        "truthfulqa_mc1.png",
        "truthfulqa_mc2.png",
        "truthfulqa_mcq_acc.png",
        "truthfulqa_mcq_exact_match.png",
    } <= names
    assert all((report / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))


def test_repeated_runs_fold_into_mean_and_std_and_single_runs_show_stderr(
    outputs: dict[str, Path], report: Path
) -> None:
    rows = _rows(report)
    values = [_results(outputs[n])["results"]["medmerge_bioinstructqa"]["acc,none"] for n in ("base1", "base2")]
    base = rows["base"]
    assert base["runs"] == "2" and base["bioinstructqa acc runs"] == "2"
    assert float(base["bioinstructqa acc"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
    # BioMistral's ± is statistics.pstdev over the shot sets, the default; --std sample gives stdev
    assert float(base["bioinstructqa acc err"]) == pytest.approx(statistics.pstdev(values), abs=1e-12)
    assert "population std (÷n, BioMistral's statistics.pstdev)" in (report / "leaderboard.md").read_text()
    ft1 = _results(outputs["ft1"])["results"]["medmerge_mmlu_anatomy"]
    assert float(rows["ft1"]["mmlu_anatomy acc"]) == ft1["acc,none"]
    assert float(rows["ft1"]["mmlu_anatomy acc err"]) == pytest.approx(ft1["acc_stderr,none"])
    mc2 = _results(outputs["ft1"])["results"]["medmerge_truthfulqa_health"]["mc2,none"]
    assert float(rows["ft1"]["truthfulqa_health mc2"]) == pytest.approx(mc2)


def test_a_model_without_some_tasks_gets_empty_cells_and_no_rank(report: Path) -> None:
    other = _rows(report)["other"]
    assert other["bioinstructqa acc"] == "" and other["rank"] == ""
    assert other["truthfulqa_health mc1"] != ""
    md = (report / "leaderboard.md").read_text()
    assert "|  | other | 1 |  |" in md  # unranked, BioInstructQA cells empty


def test_ranks_follow_the_bioinstructqa_average(report: Path) -> None:
    rows = [r for r in _csv(report) if r["rank"]]
    scores = [float(r["bioinstructqa acc"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for row in rows:
        assert int(row["rank"]) == 1 + sum(s > float(row["bioinstructqa acc"]) for s in scores)


def test_merge_parents_come_from_its_model_card_and_deltas_are_differences(tiny, report: Path) -> None:
    rows = _rows(report)
    merged = rows["merged"]
    # the card's base_model list: the base, then the two fine-tunes
    assert merged["parents"].split(";") == [str(tiny["base"]), str(tiny["ft1"]), str(tiny["ft2"])]
    md = (report / "leaderboard.md").read_text()
    parents_section = md.split("## Merges against their parents")[1].split("##")[0]
    assert "| merged | base |" in parents_section and "| merged | ft1 |" in parents_section
    assert "ft2 (not evaluated here)" in parents_section
    # with a parent missing, "beats all its parents" can never be claimed
    assert merged["beats_all_parents"] == "0"
    delta = float(merged["bioinstructqa acc"]) - float(rows["base"]["bioinstructqa acc"])
    line = next(x for x in parents_section.splitlines() if x.startswith("| merged | base |"))
    assert line.split(" | ")[2].rstrip("*†") == f"{delta:+.3f}"


def _samples(directory: Path, task: str) -> dict[int, float]:
    path = next(directory.rglob(f"samples_{task}_*.jsonl"))
    return {s["doc_id"]: s["acc"] for s in map(json.loads, path.read_text().splitlines())}


def test_mcnemar_p_values_recomputed_by_hand_from_the_sample_logs(outputs: dict[str, Path], report: Path) -> None:
    from scipy.stats import binomtest

    pairwise = _csv(report, "pairwise.csv")
    checked = 0
    for task in ["medmerge_mmlu_anatomy", "medmerge_medqa_4options", "medmerge_pubmedqa", "medmerge_medmcqa"]:
        a, b = _samples(outputs["ft1"], task), _samples(outputs["merged"], task)
        n01 = sum(a[d] == 1 and b[d] == 0 for d in a)
        n10 = sum(a[d] == 0 and b[d] == 1 for d in a)
        expected = binomtest(n01, n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
        row = next(r for r in pairwise if r["task"] == task and {r["model_a"], r["model_b"]} == {"ft1", "merged"})
        assert row["test"] == "McNemar exact" and int(row["docs"]) == len(a) == 6
        assert float(row["p"]) == pytest.approx(expected, rel=1e-9)
        sign = 1 if row["model_a"] == "ft1" else -1
        assert float(row["delta_a_minus_b"]) == pytest.approx(sign * (n01 - n10) / len(a))
        checked += 1
    assert checked == 4


def test_folded_runs_continuous_scores_and_groups_use_the_paired_bootstrap(report: Path) -> None:
    pairwise = _csv(report, "pairwise.csv")

    def test_of(task: str, metric: str, a: str, b: str) -> str:
        return next(
            r["test"]
            for r in pairwise
            if r["task"] == task and r["metric"] == metric and {r["model_a"], r["model_b"]} == {a, b}
        )

    assert test_of("medmerge_mmlu_anatomy", "acc,none", "base", "ft1").startswith("paired bootstrap")  # base: 2 runs
    assert test_of("medmerge_truthfulqa_health_health", "mc2,none", "ft1", "merged").startswith("paired bootstrap")
    assert test_of("medmerge_truthfulqa_health_health", "mc1,none", "ft1", "merged") == "McNemar exact"
    group = test_of("medmerge_bioinstructqa", "acc,none", "ft1", "merged")
    # the fixture's ten tasks have one size, so its group values cannot tell the two weightings apart: said so
    assert group == (
        "paired bootstrap (2000 resamples, 10 tasks equally weighted: the runs' group values fit either weighting, "
        "so the mean of tasks is used)"
    )
    # Holm never lowers a p-value
    assert all(float(r["p_holm"]) >= float(r["p"]) - 1e-15 for r in pairwise)


def test_tolerant_reading_names_what_it_skips(outputs: dict[str, Path], tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    shutil.copytree(outputs["root"], inputs)
    (inputs / "notes.json").write_text("{not json")
    (inputs / "config.json").write_text(json.dumps({"hidden_size": 64}))
    broken = inputs / "broken" / "results_2026-01-01T00-00-00.json"
    broken.parent.mkdir()
    broken.write_text(json.dumps({"results": {"x": {"acc,none": "N/A"}}, "config": {"model": "hf"}}))
    result = subprocess.run(
        [sys.executable, "-m", "medmerge.cli", "report", str(inputs), "-o", str(tmp_path / "r"), "--bootstrap", "200"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in ("notes.json", "config.json", "results_2026-01-01T00-00-00.json"):
        assert f"{name}: skipped, not an lm-eval results file" in result.stderr
    md = (tmp_path / "r" / "leaderboard.md").read_text()
    assert "notes.json: skipped" in md and "| merged |" in md


def test_bad_inputs_are_one_line_exit_2_and_leave_nothing(tmp_path: Path, report: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "medmerge.cli", "report", *args], capture_output=True, text=True, timeout=120
        )

    out = tmp_path / "r"
    result = run(str(tmp_path / "missing"), "-o", str(out))
    assert result.returncode == 2
    assert result.stderr == f"medmerge: error: {tmp_path / 'missing'}: no such file or directory\n"
    (tmp_path / "empty").mkdir()
    result = run(str(tmp_path / "empty"), "-o", str(out))
    assert result.returncode == 2 and "no lm-eval results files" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    result = run(str(report), "-o", str(tmp_path))  # a directory with other things in it is never replaced
    assert result.returncode == 2 and "is not a medmerge report" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".r.partial*"))


def test_rank_by_another_column_and_rerun_replaces_the_report(outputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r"
    build_report([outputs["root"]], out, bootstrap=100)
    build_report([outputs["root"]], out, rank_by="truthfulqa_health mc2", bootstrap=100)
    md = (out / "leaderboard.md").read_text()
    assert "Ranked by **truthfulqa_health mc2**" in md
    rows = [r for r in _csv(out) if r["rank"]]
    assert len(rows) == 4  # other has TruthfulQA, so it is ranked now


def _browser():
    """Headless Debian chromium through its chromedriver, or None where they are not installed. CI installs
    them and sets MEDMERGE_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("MEDMERGE_REQUIRE_BROWSER") == "1":
            pytest.fail("MEDMERGE_REQUIRE_BROWSER=1 but chromium/chromedriver are not installed")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # The closed network refuses Chromium's background connections; these flags keep it from trying.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_html_renders_offline_in_headless_chromium_with_images_and_sorting(report: Path) -> None:
    html = (report / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # no CDN, no remote image: opens offline
    browser = _browser()
    try:
        browser.get((report / "index.html").as_uri())
        models = browser.execute_script(
            "return Array.from(document.querySelectorAll('#leaderboard tbody tr')).map(r => r.dataset.model)"
        )
        assert sorted(models) == ["base", "ft1", "merged", "other"]
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(images) == 5 and all(done and w > 300 and h > 200 for done, w, h in images)
        headers = browser.execute_script(
            "return Array.from(document.querySelectorAll('#leaderboard thead th')).map(h => h.textContent)"
        )
        assert headers[:4] == ["rank", "model", "runs", "bioinstructqa acc"]
        model_header = browser.find_element("css selector", "#leaderboard thead th:nth-child(2)")
        order = "return Array.from(document.querySelectorAll('#leaderboard tbody tr')).map(r => r.dataset.model)"
        model_header.click()
        assert browser.execute_script(order) == ["other", "merged", "ft1", "base"]
        model_header.click()
        assert browser.execute_script(order) == ["base", "ft1", "merged", "other"]
        score_header = browser.find_element("css selector", "#leaderboard thead th:nth-child(4)")
        score_header.click()  # descending by the BioInstructQA average; the model without it goes last
        values = browser.execute_script(
            "return Array.from(document.querySelectorAll('#leaderboard tbody tr')).map(r => r.cells[3].dataset.value)"
        )
        assert values[-1] == "" and [float(v) for v in values[:-1]] == sorted(map(float, values[:-1]), reverse=True)
        matrices = browser.execute_script("return document.querySelectorAll('table.matrix').length")
        assert matrices >= 10
        browser.save_screenshot(str(report / "screenshot.png"))
    finally:
        browser.quit()
