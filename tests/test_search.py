"""`medmerge search`: the search file, in-memory trials (bit-equal to merging to disk), the optimisers' journal
(a resumed search is the uninterrupted one), the test-split guard, Ray workers and the final report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medmerge import fixtures
from medmerge.cli import main
from medmerge.experiment import scoped_environment
from medmerge.search.run import JOURNAL, run_search
from medmerge.search.space import load_search
from medmerge_common.errors import UserError
from merge.run import run_merge
from merge.yamlfile import parse_yaml
from tests.conftest import load_weights

D0 = ("models", 0, "parameters", "density")
W0 = ("models", 0, "parameters", "weight")
FITNESS = {"task": "medmerge_mmlu_med_validation", "metric": "acc"}
LM_EVAL = {"batch_size": 8, "dtype": "float32", "device": "cpu", "limit": 2}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.build_data_mirror(tmp_path_factory.mktemp("mirror"), per_corpus=3)


def ties_space(tiny: dict[str, Path], mirror: Path, **search: object) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(tiny["base"]),
        "dtype": "float32",
        "models": [
            {
                "model": str(tiny["ft1"]),
                "parameters": {"weight": {"range": [0.1, 1.0]}, "density": {"range": [0.2, 1]}},
            },
            {"model": str(tiny["ft2"]), "parameters": {"weight": 0.5, "density": {"range": [0.2, 1.0]}}},
        ],
        "search": {"fitness": [FITNESS], "trials": 4, "data_dir": str(mirror), "lm_eval": dict(LM_EVAL)} | search,
    }


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def journal(out: Path) -> list[dict]:
    """The finished trials, in trial order, without how long they took and how many tensors the worker re-merged
    (both depend on what that worker ran before: a resumed worker starts from a fresh carrier)."""
    lines = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()[1:]]
    work = ("seconds", "merge_seconds", "recomputed")
    return [{k: v for k, v in t.items() if k not in work} for t in sorted(lines, key=lambda t: t["trial"])]


# --- the search file ---------------------------------------------------------------------------------------


def test_search_file_dimensions_and_recipes(tiny, mirror, tmp_path):
    space = load_search(write(tmp_path / "s.yaml", ties_space(tiny, mirror)))
    assert [d.name for d in space.dimensions] == [
        "models[0].parameters.weight",
        "models[0].parameters.density",
        "models[1].parameters.density",
    ]
    point = {d.name: d.from_unit(1.0) for d in space.dimensions}
    recipe = space.recipe(point)
    assert recipe.models[0].parameters == {"weight": 1.0, "density": 1.0}
    assert recipe.models[1].parameters == {"weight": 0.5, "density": 1.0}
    assert "search" not in yaml.safe_load(space.recipe_text(point))


def test_lines_beta_after_ties_is_a_search_dimension(tiny, mirror, tmp_path):
    data = ties_space(tiny, mirror) | {"lines": {"alpha": 0.5, "beta": {"range": [0.1, 1.0], "start": 0.5}}}
    space = load_search(write(tmp_path / "s.yaml", data))
    assert space.dimensions[-1].name == "lines.beta"
    recipe = space.recipe({d.name: d.from_unit(1.0) for d in space.dimensions})
    assert (recipe.layer_scaling.alpha, recipe.layer_scaling.beta) == (0.5, 1.0)


BAD = [
    (lambda s: s["models"][0]["parameters"].update(density={"range": [0.9, 0.2]}), D0, "low must be below high"),
    (lambda s: s["models"][0]["parameters"].update(density={"range": ["a", 1]}), D0, "two numbers"),
    (
        lambda s: s["models"][0]["parameters"].update(density={"range": [0.2, 1.5]}),
        D0,
        "density must be in (0, 1], got 1.5 (with models[0].parameters.density = 1.5",
    ),
    (lambda s: s.update(merge_method={"range": [0, 1]}), ("merge_method",), "{choice: [method, ...]}"),
    (lambda s: s.update(merge_method={"choice": ["ties", "slerp"]}), ("models",), "slerp takes exactly 1"),
    (lambda s: s["models"][0].update(model={"choice": ["a", "b"]}), ("models", 0, "model"), "only parameter values"),
    (lambda s: s["models"][0]["parameters"].update(weight={"choice": [0.5]}), W0, "at least two"),
    (lambda s: s["search"].update(optimizer="bayes"), ("search", "optimizer"), "optimizer"),
    (lambda s: s["search"].update(time_budget="soon"), ("search", "time_budget"), "not a positive duration"),
    (lambda s: s["search"].update(fitness=[]), ("search", "fitness"), "fitness"),
    (lambda s: s["search"]["lm_eval"].update(model="medmerge-hf"), ("search", "lm_eval", "model"), "hf model"),
    (
        lambda s: s["models"][0]["parameters"].update(density={"range": [0.2, 0.9], "start": 0.95}),
        (*D0, "start"),
        "start 0.95 is not a number in the range [0.2, 0.9]",
    ),
    (
        lambda s: s["models"][0]["parameters"].update(weight={"choice": [0.3, 0.6], "start": 0.5}),
        (*W0, "start"),
        "start 0.5 is not one of the choices [0.3, 0.6]",
    ),
    (lambda s: s["models"][0]["parameters"].update(density={"range": [0.2, 0.9], "step": 0.1}), D0, "unknown key"),
]


@pytest.mark.parametrize(("change", "where", "message"), BAD, ids=[b[2] for b in BAD])
def test_bad_search_files_name_the_line(tiny, mirror, tmp_path, change, where, message):
    data = ties_space(tiny, mirror)
    change(data)
    path = write(tmp_path / "s.yaml", data)
    with pytest.raises(UserError) as error:
        load_search(path)
    text = str(error.value)
    assert message in text, text
    line = parse_yaml(path.read_text(), path)[1][where]
    assert text.startswith(f"{path}:{line}: "), text


def test_search_file_needs_a_range_and_a_search_block(tiny, mirror, tmp_path):
    plain = ties_space(tiny, mirror)
    for model in plain["models"]:
        model["parameters"] = {"weight": 0.5, "density": 0.5}
    with pytest.raises(UserError, match="nothing to search"):
        load_search(write(tmp_path / "s.yaml", plain))
    del plain["search"]
    with pytest.raises(UserError, match="no 'search:' block"):
        load_search(write(tmp_path / "s.yaml", plain))


def test_cli_error_is_one_line_and_writes_nothing(tiny, mirror, tmp_path, capsys):
    data = ties_space(tiny, mirror)
    data["search"]["fitness"] = [{"task": "medmerge_mmlu_med", "metric": "acc"}]  # a test split
    path = write(tmp_path / "s.yaml", data)
    assert main(["search", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test split" in err[0] and "--allow-test-fitness" in err[0], err
    line = parse_yaml(path.read_text(), path)[1][("search", "fitness", 0, "task")]
    assert f"s.yaml:{line}: search.fitness[0].task:" in err[0]
    assert not (tmp_path / "out" / "carrier").exists()
    data["search"]["fitness"] = [{"task": "medmerge_mmlu_med_validaton"}]
    assert main(["search", str(write(path, data)), str(tmp_path / "out")]) == 2
    assert "did you mean 'medmerge_mmlu_med_validation'" in capsys.readouterr().err


# --- trials in memory ----------------------------------------------------------------------------------------


def test_in_memory_trial_equals_the_merge_on_disk(tiny, mirror, tmp_path):
    """The worker's model after a trial holds the bits of the same recipe merged to disk and loaded by lm-eval,
    and scores what plain lm-eval scores on that directory; a trial that changes only the attention's t
    recomputes only the attention tensors."""
    import lm_eval

    from medmerge.search.trials import TrialWorker

    space = {
        "merge_method": "slerp",
        "base_model": str(tiny["ft1"]),
        "dtype": "float32",
        "models": [{"model": str(tiny["ft1"])}, {"model": str(tiny["ft2"])}],
        "parameters": {
            "t": [{"filter": "self_attn", "value": {"range": [0.0, 1.0]}}, {"value": [0.2, {"range": [0, 1]}]}]
        },
        "search": {"fitness": [FITNESS], "data_dir": str(mirror), "lm_eval": LM_EVAL | {"dtype": "bfloat16"}},
    }
    path = write(tmp_path / "s.yaml", space)
    search = load_search(path)
    names = [d.name for d in search.dimensions]
    assert names == ["parameters.t[0].value", "parameters.t[1].value[1]"]
    first, second = dict(zip(names, (0.3, 0.9))), dict(zip(names, (0.7, 0.9)))
    run_merge(search.recipe(first), tmp_path / "carrier")
    worker = TrialWorker(search, str(tmp_path / "carrier"), first, str(mirror))
    result = worker.run(second)
    attention = [n for n in load_weights(tmp_path / "carrier") if "self_attn" in n]
    assert result.recomputed == len(attention) > 0

    run_merge(search.recipe(second), tmp_path / "on_disk")
    on_disk = load_weights(tmp_path / "on_disk")
    in_memory = worker.lm.model.state_dict()
    for name, tensor in on_disk.items():
        assert in_memory[name].dtype == torch.bfloat16
        assert torch.equal(in_memory[name], tensor.to(torch.bfloat16)), name
    with scoped_environment(MEDMERGE_DATA_DIR=str(mirror)):
        plain = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(tmp_path / "on_disk"), "dtype": "bfloat16"},
            tasks=[FITNESS["task"]],
            limit=2,
            batch_size=8,
            device="cpu",
            metadata={"fewshot_set": 1},
        )
    assert result.scores == {"medmerge_mmlu_med_validation/acc": plain["results"][FITNESS["task"]]["acc,none"]}
    assert worker.run(second).recomputed == 0  # nothing changed
    worker.close()


# --- the search loop -------------------------------------------------------------------------------------------


class Killed(Exception):
    pass


def kill_after(trials: int):
    seen = []

    def say(line: str) -> None:
        seen.append(line)
        if sum(line.startswith("[trial") for line in seen) == trials:
            raise Killed

    return say


@pytest.mark.parametrize("optimizer", ["cma", "tpe"])
def test_start_point_is_scored_first_and_centres_the_search(tiny, mirror, tmp_path, optimizer):
    from medmerge.search.optimizers import make_optimizer

    data = ties_space(tiny, mirror)
    data["models"][0]["parameters"]["weight"] = {"range": [0.1, 1.0], "start": 0.5}
    space = load_search(write(tmp_path / "s.yaml", data))
    start = {"models[0].parameters.weight": 0.5, "models[0].parameters.density": 0.6}
    assert space.start == pytest.approx(start | {"models[1].parameters.density": 0.6})  # the middle elsewhere
    chosen = make_optimizer(optimizer, space.dimensions, 0, 0.25, 3, space.start)
    assert chosen.ask() == [space.start]  # a round of its own
    chosen.tell([space.start], [0.5])
    assert len(chosen.ask()) == 3
    if optimizer == "cma":  # the distribution's mean is the start point, on the unit cube
        assert list(chosen.strategy.mean[:3]) == pytest.approx([0.4 / 0.9, 0.5, 0.5])


@pytest.mark.parametrize("optimizer", ["cma", "tpe"])
def test_a_resumed_search_is_the_uninterrupted_one(tiny, mirror, tmp_path, optimizer):
    data = ties_space(tiny, mirror, optimizer=optimizer, trials=7, batch=3)
    data["models"][1]["parameters"]["density"]["start"] = 0.4
    path = write(tmp_path / "s.yaml", data)
    whole = run_search(path, tmp_path / "whole", say=lambda _: None)
    assert len(whole.trials) == 7 and whole.start is whole.trials[0]
    assert whole.start.point["models[1].parameters.density"] == 0.4
    with pytest.raises(Killed):
        run_search(path, tmp_path / "resumed", say=kill_after(4))
    assert len(journal(tmp_path / "resumed")) == 4
    with (tmp_path / "resumed" / JOURNAL).open("a") as file:
        file.write('{"trial": 4, "point": {"models[0].para')  # a kill in the middle of a line
    lines: list[str] = []
    resumed = run_search(path, tmp_path / "resumed", say=lines.append)
    assert lines[0] == f"resuming: 4 trial(s) in {tmp_path / 'resumed' / JOURNAL}"
    assert sum(line.startswith("[trial") for line in lines) == 3  # only the missing trials ran
    assert journal(tmp_path / "resumed") == journal(tmp_path / "whole")
    assert resumed.best.point == whole.best.point
    assert (tmp_path / "resumed" / "best.yaml").read_text() == (tmp_path / "whole" / "best.yaml").read_text()
    best = yaml.safe_load((tmp_path / "whole" / "best.yaml").read_text())
    assert best["models"][0]["parameters"]["weight"] == whole.best.point["models[0].parameters.weight"]
    assert (tmp_path / "whole" / "fitness.png").stat().st_size > 0
    assert (tmp_path / "whole" / "parameters.png").stat().st_size > 0


def test_a_changed_search_file_refuses_the_old_journal(tiny, mirror, tmp_path):
    data = ties_space(tiny, mirror, trials=1)
    path = write(tmp_path / "s.yaml", data)
    run_search(path, tmp_path / "out", say=lambda _: None)
    data["search"]["seed"] = 1
    write(path, data)
    with pytest.raises(UserError, match="journal of a different search"):
        run_search(path, tmp_path / "out", say=lambda _: None)
    assert len(run_search(path, tmp_path / "out", restart=True, say=lambda _: None).trials) == 1


def test_ray_workers_give_the_serial_search(tiny, mirror, tmp_path):
    """Two local Ray workers, one model copy each: the same trials and fitness as one worker in process."""
    pytest.importorskip("ray", reason="Ray is installed with medmerge[dev] / medmerge[ray]")
    serial = write(tmp_path / "serial.yaml", ties_space(tiny, mirror, trials=4, batch=4))
    parallel = write(tmp_path / "parallel.yaml", ties_space(tiny, mirror, trials=4, batch=4, workers=2))
    run_search(serial, tmp_path / "serial", say=lambda _: None)
    lines: list[str] = []
    run_search(parallel, tmp_path / "parallel", say=lines.append)
    assert "starting 2 Ray worker(s)" in lines
    assert journal(tmp_path / "parallel") == journal(tmp_path / "serial")


def test_best_recipe_merged_and_reported_on_test_tasks(tiny, mirror, tmp_path):
    data = ties_space(tiny, mirror, trials=2, test_tasks=["medmerge_mmlu_anatomy"])
    data["models"][0]["parameters"]["weight"]["start"] = 0.1
    outcome = run_search(
        write(tmp_path / "s.yaml", data), tmp_path / "out", merge_best=tmp_path / "best", say=lambda _: None
    )
    merged = load_weights(tmp_path / "best")
    final = tmp_path / "out" / "final" / "models" / "best"  # merged once, for the report; --merge-best links it
    for file in (tmp_path / "best").iterdir():
        assert file.stat().st_ino == (final / file.name).stat().st_ino, file.name
    assert {f.name for f in (tmp_path / "best").iterdir()} == {f.name for f in final.iterdir()} - {".medmerge_key"}
    run_merge(tmp_path / "out" / "best.yaml", tmp_path / "again")
    assert all(torch.equal(merged[n], t) for n, t in load_weights(tmp_path / "again").items())
    assert outcome.report is not None
    board = outcome.report.read_text()
    arms = ("base", "ft1", "ft2", "best") + (("start",) if outcome.best is not outcome.start else ())
    for arm in arms:
        assert f"| {arm} " in board, (arm, board)
        assert (tmp_path / "out" / "final" / "results" / arm).is_dir()
    start = yaml.safe_load((tmp_path / "out" / "start.yaml").read_text())
    assert start["models"][0]["parameters"]["weight"] == 0.1 == outcome.trials[0].point["models[0].parameters.weight"]
    with pytest.raises(UserError, match="exists and is not an empty directory"):  # before the search, not after
        run_search(tmp_path / "s.yaml", tmp_path / "out2", merge_best=tmp_path / "best", say=lambda _: None)
    assert not (tmp_path / "out2").exists()
