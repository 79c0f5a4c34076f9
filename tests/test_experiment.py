"""`medmerge run`: resumable experiments keyed by what determines each step."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import medmerge.experiment as experiment_module
from medmerge.experiment import run_experiment


@pytest.fixture
def experiment(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[str, int]] = []

    def fake_evaluate(pretrained, tasks, shot_set, settings, output_dir, verbose=False, **arm):
        """Writes what lm-eval's tracker writes, trimmed to the keys the report reads."""
        calls.append((pretrained, shot_set))
        results = {
            "model_name": pretrained,
            "date": 1.0e9 + len(calls),
            "config": {"model": "hf", "model_args": {"pretrained": pretrained}},
            "configs": {"medmerge_mmlu_anatomy": {"metadata": {"fewshot_set": shot_set, "shots": 3}}},
            "results": {
                "medmerge_mmlu_anatomy": {"acc,none": 0.25 * shot_set, "acc_stderr,none": 0.1},
                "medmerge_truthfulqa_health": {"mc2,none": 0.5, "mc2_stderr,none": 0.05},
            },
        }
        out = output_dir / pretrained.strip("/").replace("/", "__")
        out.mkdir(parents=True)
        (out / "results_2026-01-01T00-00-00.000000.json").write_text(json.dumps(results))

    monkeypatch.setattr(experiment_module, "evaluate", fake_evaluate)
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(tiny["base"]),
                "models": [{"model": str(tiny["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}}],
            }
        )
    )
    path = tmp_path / "experiment.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "work_dir": "work",
                "recipes": ["ties.yaml"],
                "models": [str(tiny["base"])],
                "tasks": ["medmerge_mmlu_anatomy"],
                "fewshot_sets": [1, 2],
                "lm_eval": {"device": "cpu"},
            }
        )
    )
    return path, recipe, calls


def test_run_merges_evaluates_and_reports_mean_std(experiment) -> None:
    path, _, calls = experiment
    leaderboard = run_experiment(path, say=lambda _: None)
    assert len(calls) == 4  # (merged ties, base) x shot sets 1, 2
    text = leaderboard.read_text()
    assert leaderboard == path.parent / "work" / "report" / "leaderboard.md"
    # mean and population std (BioMistral's pstdev) over the two shot sets, 0.25 and 0.5; the merge's parents come
    # from its model card
    assert "| ties | 2 | 0.375 ± 0.125 | 0.500 ± 0.000 |" in text
    assert "| ties | base | +0.000 | +0.000 |" in text
    assert "Shot sets [1, 2]; experiment file" in text  # the default note
    work = path.parent / "work"
    assert (work / "models" / "ties" / "model.safetensors").exists()
    saved = json.loads(next((work / "results" / "ties" / "shotset2").rglob("results_*.json")).read_text())
    assert saved["results"]["medmerge_mmlu_anatomy"]["acc,none"] == 0.5
    assert (work / "report" / "index.html").is_file()


def test_second_run_reuses_everything_and_a_changed_recipe_is_redone(experiment) -> None:
    path, recipe, calls = experiment
    run_experiment(path, say=lambda _: None)
    merged = path.parent / "work" / "models" / "ties" / "model.safetensors"
    first_mtime = merged.stat().st_mtime_ns
    messages: list[str] = []
    spec = yaml.safe_load(path.read_text()) | {"note": "What the reader looks at."}
    path.write_text(yaml.safe_dump(spec))  # a note is the report's: it redoes no merge or evaluation
    leaderboard = run_experiment(path, say=messages.append)
    assert len(calls) == 4 and merged.stat().st_mtime_ns == first_mtime
    assert sum("up to date" in m for m in messages) == 5
    assert "\nWhat the reader looks at.\n" in leaderboard.read_text()
    data = yaml.safe_load(recipe.read_text())
    data["models"][0]["parameters"]["density"] = 0.7
    recipe.write_text(yaml.safe_dump(data))
    messages.clear()
    run_experiment(path, say=messages.append)
    assert merged.stat().st_mtime_ns != first_mtime
    assert len(calls) == 6  # only the merged model is evaluated again
    evals = [m for m in messages if m.startswith("[eval") and "up to date" not in m]
    # the first evaluation of a sitting has no pace yet; the next one estimates from it
    assert re.search(r"\(0:\d\d elapsed\)$", evals[0]), evals
    assert re.search(r"\(0:\d\d elapsed, about 0:\d\d left\)$", evals[1]), evals


def test_bad_experiment_file_is_one_line_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text("work_dir: w\ntasks: [medmerge_mmlu_anatomy]\nrecipes:\n  - missing.yaml\n")
    result = subprocess.run(
        [sys.executable, "-m", "medmerge.cli", "run", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"medmerge: error: {path}:4: recipes[0]: recipe file missing.yaml not found"
    path.write_text("work_dir: w\ntasks: [medmerge_mmlu_anatomy]\nlm_eval:\n  batchsize: 8\n")
    result = subprocess.run(
        [sys.executable, "-m", "medmerge.cli", "run", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "lm_eval.batchsize: unknown key 'batchsize' (did you mean 'batch_size'?)" in result.stderr


def test_bad_moe_ensemble_and_fusion_arms_name_their_line_and_field(tmp_path: Path) -> None:
    from medmerge.experiment import load_experiment
    from medmerge_common.errors import UserError

    path = tmp_path / "experiment.yaml"
    (tmp_path / "moe.yaml").write_text(
        "base_model: org/b\ngate_mode: random\nexperts:\n  - source_model: org/x\n  - source_model: org/y\n"
    )
    cases = {
        "moes:\n  - config: missing.yaml\n": f"{path}:4: moes[0].config: MoE config file missing.yaml not found",
        "moes:\n  - config: moe.yaml\n    train_router: {epoch: 3}\n": (
            f"{path}:5: moes[0].train_router.epoch: unknown key 'epoch' (did you mean 'epochs'?)"
        ),
        "moes:\n  - config: moe.yaml\n    train_router: {router: noisy}\n": f"{path}:5: moes[0].train_router.router",
        "moes:\n  - config: moe.yaml\nmodels: [m/moe]\n": "'moe' names two arms (moes[0] and models[0])",
        "ensembles:\n  - name: e\n    members: [a, b]\n    weights: [1]\n": (
            f"{path}:6: ensembles[0].weights: 2 members but 1 weights"
        ),
        "ensembles:\n  - {name: e, members: [a]}\n": f"{path}:4: ensembles[0].members",
        "fusions:\n  - config: none.yaml\n": f"{path}:4: fusions[0].config: fusion config file none.yaml not found",
        "fusions:\n  - config: fusion.yaml\n    combiners: [late]\n": f"{path}:5: fusions[0].combiners[0]",
        "fusions:\n  - config: bad_fusion.yaml\n": f"{tmp_path / 'bad_fusion.yaml'}:2: members[0].pretrain",
        "fusions:\n  - config: fusion.yaml\nensembles: [{name: fusion_late_fusion, members: [a, b]}]\n": (
            "'fusion_late_fusion' names two arms (ensembles[0] and fusions[0])"
        ),
    }
    (tmp_path / "fusion.yaml").write_text("members: [{pretrained: a}, {pretrained: b}]\n")
    (tmp_path / "bad_fusion.yaml").write_text("members:\n  - pretrain: a\n  - pretrained: b\n")
    (tmp_path / "m" / "moe").mkdir(parents=True)
    for text, expected in cases.items():
        path.write_text("work_dir: w\ntasks: [medmerge_mmlu_anatomy]\n" + text)
        with pytest.raises(UserError) as caught:
            load_experiment(path)
        assert expected in str(caught.value), (text, str(caught.value))


def test_two_arms_with_one_name_are_refused(tiny, tmp_path: Path) -> None:
    from medmerge.experiment import load_experiment
    from medmerge_common.errors import UserError

    recipe = "merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: 1}}\n"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ties.yaml").write_text(recipe.format(m=tiny["ft1"]))
    path = tmp_path / "experiment.yaml"
    path.write_text("work_dir: w\ntasks: [medmerge_mmlu_anatomy]\nrecipes:\n  - a/ties.yaml\n  - b/ties.yaml\n")
    with pytest.raises(UserError) as caught:
        load_experiment(path)
    assert str(caught.value) == (
        f"{path}:5: recipes[1]: 'ties' names two arms (recipes[0] and recipes[1]): their merges and results would "
        "share one directory; rename one of them"
    )
    shutil.copytree(tiny["ft1"], tmp_path / "models" / "ties")
    path.write_text("work_dir: w\ntasks: [t]\nrecipes: [a/ties.yaml]\nmodels: [models/ties]\n")
    with pytest.raises(UserError, match="'ties' names two arms \\(recipes\\[0\\] and models\\[0\\]\\)"):
        load_experiment(path)


EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_shipped_experiments_validate(path: Path) -> None:
    from medmerge.experiment import load_experiment

    experiment, base = load_experiment(path)
    assert experiment.recipes and experiment.models
    assert all((base / r).is_file() for r in experiment.recipes)


def test_both_seed_studies_ship() -> None:
    assert [p.name for p in EXPERIMENTS] == ["biomistral-bioinstructqa-3shot.yaml", "biomistral-truthfulqa-health.yaml"]


def test_model_args_reach_lm_eval_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A value holding a comma or '=' (a peft path, a revision list) would be split by a joined string."""
    import lm_eval

    seen: dict = {}

    def fake_simple_evaluate(**kwargs):
        seen.update(kwargs)
        raise StopIteration  # enough: the arguments are what this test is about

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    settings = experiment_module.LmEvalSettings(model_args={"peft": "a,b=c", "trust_remote_code": True})
    with pytest.raises(StopIteration):
        experiment_module.evaluate("org/model", ["medmerge_pubmedqa"], 1, settings, tmp_path / "out")
    assert seen["model_args"] == {
        "pretrained": "org/model",
        "dtype": "bfloat16",
        "peft": "a,b=c",
        "trust_remote_code": True,
    }


def test_data_dir_is_set_for_the_evaluations_only(experiment, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    path, _, calls = experiment
    monkeypatch.delenv("MEDMERGE_DATA_DIR", raising=False)
    seen = []
    recorded = experiment_module.evaluate

    def evaluate(*args, **kwargs):
        seen.append(os.environ.get("MEDMERGE_DATA_DIR"))
        recorded(*args, **kwargs)

    monkeypatch.setattr(experiment_module, "evaluate", evaluate)
    spec = yaml.safe_load(path.read_text()) | {"data_dir": "mirror"}
    path.write_text(yaml.safe_dump(spec))
    run_experiment(path, say=lambda _: None)
    assert seen == [str(path.parent / "mirror")] * 4 and len(calls) == 4
    assert "MEDMERGE_DATA_DIR" not in os.environ


def test_time_left_reads_as_a_clock() -> None:
    now = experiment_module.time.monotonic()
    assert experiment_module.time_left(now - 90, 0, 3) == "1:30 elapsed"
    assert experiment_module.time_left(now - 90, 1, 2) == "1:30 elapsed, about 3:00 left"
    assert experiment_module.time_left(now - 3700, 1, 1) == "1:01:40 elapsed, about 1:01:40 left"


def test_lm_eval_command_is_what_evaluate_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The printed command, parsed by lm-eval's own command line, asks for what `evaluate` passes to lm-eval."""
    import shlex

    import lm_eval
    from lm_eval._cli.harness import HarnessCLI

    seen: dict = {}

    def fake_simple_evaluate(**kwargs):
        seen.update(kwargs)
        raise StopIteration

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    settings = experiment_module.LmEvalSettings(dtype="float32", device="cpu", batch_size=4, limit=3)
    tasks = ["medmerge_bioinstructqa", "medmerge_truthfulqa_health"]
    with pytest.raises(StopIteration):
        experiment_module.evaluate("/models/my merge", tasks, 2, settings, tmp_path / "out")
    command = experiment_module.lm_eval_command("/models/my merge", tasks, 2, settings, tmp_path / "o", "/data dir")
    words = shlex.split(command)
    assert words[0] == "MEDMERGE_DATA_DIR=/data dir" and words[1] == "lm_eval"
    monkeypatch.setattr(sys, "argv", ["lm_eval", *words[2:]])
    cli = HarnessCLI()
    args = cli.parse_args()
    assert args.model == seen["model"] and args.model_args == seen["model_args"]
    assert args.tasks == tasks and args.metadata == seen["metadata"]
    assert (args.device, int(args.batch_size), float(args.limit)) == ("cpu", 4, 3.0)
    assert args.log_samples and args.output_path == str(tmp_path / "o")


def test_a_lora_parent_is_evaluated_as_its_base_with_the_adapter(tiny, tmp_path: Path) -> None:
    """`models: [BASE+ADAPTER]` runs lm-eval's hf model with `peft=ADAPTER`: the same answers as the adapter merged
    into its base by medmerge (a passthrough recipe of BASE+ADAPTER), with no merged copy written for it."""
    from medmerge import fixtures
    from medmerge.tiny import build_lora

    build_lora(tiny["base"], tmp_path / "lora", seed=5, target_modules=["q_proj", "v_proj", "up_proj"])
    (tmp_path / "base").symlink_to(tiny["base"])
    recipe = {"merge_method": "passthrough", "models": [{"model": f"{tiny['base']}+{tmp_path / 'lora'}"}]}
    (tmp_path / "merged.yaml").write_text(yaml.safe_dump(recipe))
    spec = {
        "work_dir": "work",
        "recipes": ["merged.yaml"],
        "models": ["base+lora"],  # both parts relative to the experiment file
        "tasks": ["medmerge_mmlu_anatomy", "medmerge_pubmedqa"],
        "data_dir": str(fixtures.build_data_mirror(tmp_path / "mirror", per_corpus=3)),
        "lm_eval": {"device": "cpu", "dtype": "float32", "batch_size": 4},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_experiment(path, say=lambda _: None)
    work = tmp_path / "work"
    assert sorted(p.name for p in (work / "models").iterdir()) == ["merged"]  # the adapter arm merges nothing

    def answers(arm: str) -> list[tuple[str, list]]:
        samples = sorted((work / "results" / arm / "shotset1").rglob("samples_*.jsonl"))
        rows = [json.loads(line) for f in samples for line in f.read_text().splitlines()]
        return [(r["doc_id"], [round(float(x[0]), 3) for x in r["filtered_resps"]]) for r in rows]

    assert answers("base+lora") == answers("merged") and answers("merged")
    assert "| base+lora |" in (work / "report" / "leaderboard.md").read_text()


def test_a_missing_adapter_or_an_adapter_in_an_ensemble_is_one_line(tmp_path: Path) -> None:
    from medmerge.experiment import load_experiment
    from medmerge_common.errors import UserError

    path = tmp_path / "experiment.yaml"
    cases = {
        "models: [org/base+./no/such/lora]\n": f"{path}:3: models[0]: adapter './no/such/lora' is neither",
        "ensembles:\n  - {name: e, members: [org/a, org/base+org/lora]}\n": (
            f"{path}:4: ensembles[0].members[1]: 'org/base+org/lora': an ensemble's members are models whole"
        ),
    }
    for text, expected in cases.items():
        path.write_text("work_dir: w\ntasks: [medmerge_mmlu_anatomy]\n" + text)
        with pytest.raises(UserError) as caught:
            load_experiment(path)
        assert expected in str(caught.value), (text, str(caught.value))
