"""`medmerge search SEARCH.yaml OUT_DIR`: optimise a recipe's parameters against lm-eval scores on held-out tasks.

    ask a round of points -> merge each into a loaded model and score it (workers side by side) -> journal -> tell

The journal (OUT_DIR/journal.jsonl: one line per finished trial) is the only state. A killed search run again
replays it through the seeded optimiser, which asks the same points, and carries on where it stopped: for a
fixed seed and trial budget the result is the one an uninterrupted search gives. Workers may die and be
replaced; only the driver writes the journal.
At the end: OUT_DIR/best.yaml (an ordinary recipe), fitness.png / parameters.png, and with `test_tasks` the best
recipe merged and evaluated on the test tasks beside its parents (and the hand-picked start point, if the file
gives one) in OUT_DIR/final/report/: numbers the search never saw.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from medmerge.experiment import scoped_environment
from medmerge.search.optimizers import make_optimizer
from medmerge.search.space import Point, SearchSpace, load_search, seconds
from medmerge.search.trials import TrialResult, TrialWorker, check_fitness_tasks, task_manager
from medmerge_common.errors import UserError
from merge.run import run_merge

Say = Callable[[str], None]
JOURNAL = "journal.jsonl"
CARRIER = "carrier"  # the first trial's merge on disk: what the workers load once
DEFAULT_TRIALS = 20


@dataclass
class Trial:
    trial: int
    point: Point
    fitness: float
    scores: dict[str, float]
    seconds: float
    merge_seconds: float
    recomputed: int


@dataclass
class SearchOutcome:
    best: Trial
    start: Trial | None  # the hand-picked start point's trial (the first), if the search file gives one
    trials: list[Trial]
    best_recipe: Path
    report: Path | None  # the final test report's leaderboard.md


class Journal:
    """OUT_DIR/journal.jsonl: a header naming the search, then one line per finished trial (in finishing order;
    a line cut short by a kill is ignored)."""

    def __init__(self, path: Path, identity: str, restart: bool) -> None:
        self.path = path
        self.trials: dict[int, Trial] = {}
        if restart and path.exists():
            path.unlink()
        if not path.exists():
            path.write_text(json.dumps({"search": identity}) + "\n")
            return
        text = path.read_text()
        lines = text.splitlines()
        header = _json(lines[0]) if lines else None
        if len(lines) <= 1:  # no trial finished: nothing to keep
            path.write_text(json.dumps({"search": identity}) + "\n")
            return
        if not header or header.get("search") != identity:
            raise UserError(
                "holds the journal of a different search (the search file changed since); use another output "
                "directory, or --restart to discard it",
                file=path,
            )
        for line in lines[1:]:
            record = _json(line)
            if record is not None:
                trial = Trial(**record)
                self.trials[trial.trial] = trial
        if not text.endswith("\n"):  # a kill cut the last line short: drop it
            path.write_text("\n".join(lines[:-1]) + "\n")

    def add(self, trial: Trial) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(asdict(trial)) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.trials[trial.trial] = trial


def _json(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class SerialPool:
    """Trials one after another on one worker in this process."""

    def __init__(self, worker: TrialWorker) -> None:
        self.worker = worker

    def run(self, items: list[tuple[int, Point]]) -> Iterator[tuple[int, TrialResult]]:
        for number, point in items:
            yield self.worker.run_numbered(number, point)

    def close(self) -> None:
        self.worker.close()


class RayPool:
    """Trials side by side on `workers` Ray actors, one model copy each (a GPU each when merging or evaluating on
    cuda); an actor that dies is restarted and its trial retried."""

    def __init__(self, args: tuple, workers: int, address: str | None, cuda: bool, data_dir: str | None) -> None:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise UserError("parallel trials need Ray: pip install 'medmerge[ray]' (or set workers: 1)") from None
        env = {"MEDMERGE_DATA_DIR": data_dir} if data_dir else {}
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            local = {} if address else {"num_cpus": max(workers, os.cpu_count() or 1), "object_store_memory": 2 * 10**8}
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env},
                **local,
            )
        remote = ray.remote(num_cpus=1, num_gpus=1 if cuda else 0, max_restarts=-1, max_task_retries=-1)(TrialWorker)
        self.ray = ray
        self.actors = [remote.remote(*args) for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def run(self, items: list[tuple[int, Point]]) -> Iterator[tuple[int, TrialResult]]:
        yield from self.pool.map_unordered(lambda actor, item: actor.run_numbered.remote(*item), items)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started_ray:
            self.ray.shutdown()


def run_search(
    path: str | Path,
    out_dir: str | Path,
    *,
    allow_test_fitness: bool = False,
    ray_address: str | None = None,
    restart: bool = False,
    merge_best: str | Path | None = None,
    say: Say = print,
) -> SearchOutcome:
    """Run (or resume) the search of `path` into `out_dir`."""
    space = load_search(path)
    settings = space.settings
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a directory", file=out)
    best_dir = Path(merge_best) if merge_best is not None else None
    if best_dir is not None and best_dir.exists() and (not best_dir.is_dir() or any(best_dir.iterdir())):
        # refused now, not after the search's hours; never replaced
        raise UserError(f"--merge-best {best_dir}: exists and is not an empty directory; name a new one")
    data_dir = str((space.file.parent / settings.data_dir).resolve()) if settings.data_dir else None
    budget_trials = settings.trials or (None if settings.time_budget is not None else DEFAULT_TRIALS)
    budget_seconds = seconds(settings.time_budget, space.file, space.lines) if settings.time_budget else math.inf
    with scoped_environment(MEDMERGE_DATA_DIR=data_dir):
        tasks = task_manager(settings.fewshot_set, [t.task for t in settings.fitness])
        check_fitness_tasks(space, tasks, allow_test_fitness)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / JOURNAL, hashlib.sha256(space.text.encode()).hexdigest(), restart)
    if journal.trials:
        say(f"resuming: {len(journal.trials)} trial(s) in {journal.path}")
    optimizer = make_optimizer(
        settings.optimizer, space.dimensions, settings.seed, settings.sigma, settings.batch, space.start
    )
    pool: SerialPool | RayPool | None = None
    started = time.monotonic()
    spent = sum(t.seconds for t in journal.trials.values())  # earlier runs' trials count against a time budget
    done = 0
    try:
        while budget_trials is None or done < budget_trials:
            asked = optimizer.ask()
            points = asked if budget_trials is None else asked[: budget_trials - done]
            numbers = list(range(done, done + len(points)))
            for number, point in zip(numbers, points):
                known = journal.trials.get(number)
                if known is not None and known.point != point:
                    raise UserError(
                        f"trial {number} in the journal is not the point this search asks now (another medmerge, "
                        "cma or optuna version?); use another output directory, or --restart",
                        file=journal.path,
                    )
            todo = [(n, p) for n, p in zip(numbers, points) if n not in journal.trials]
            if todo and spent + time.monotonic() - started >= budget_seconds:
                say(f"time budget of {settings.time_budget} spent")
                break
            if todo and pool is None:
                pool = _start_pool(space, out, points[0], data_dir, ray_address, tasks, say)
            asked_now = dict(todo)
            for number, result in pool.run(todo) if todo else ():
                trial = Trial(number, asked_now[number], **asdict(result))
                journal.add(trial)
                say(_trial_line(trial, budget_trials))
            done += len(points)
            if len(points) < len(asked) or (budget_trials is not None and done >= budget_trials):
                break
            optimizer.tell(points, [journal.trials[n].fitness for n in numbers])
    finally:
        if pool is not None:
            pool.close()
    trials = [journal.trials[n] for n in sorted(journal.trials) if n < done]
    if not trials:
        raise UserError("the budget ended before the first trial finished", file=space.file)
    best = max(trials, key=lambda t: (t.fitness, -t.trial))
    start = trials[0] if space.start is not None and trials[0].trial == 0 else None
    best_recipe = _write_best(space, best, start, trials, out)
    from medmerge.search.plots import plot_trials

    plot_trials(trials, space, out)
    if start is not None:
        say(f"start point (trial 1): fitness {start.fitness:.4f}")
    gain = f" ({best.fitness - start.fitness:+.4f} over the start point)" if start is not None else ""
    say(f"best: trial {best.trial + 1}, fitness {best.fitness:.4f}{gain}; recipe {best_recipe}")
    report = None
    try:
        if settings.test_tasks:
            report = _final_evaluation(space, best, start, best_recipe, out, data_dir, say)
    finally:  # the best model is the user's even when the final evaluation fails
        if best_dir is not None:
            _merge_best(space, best, best_recipe, out, best_dir, say)
    return SearchOutcome(best, start, trials, best_recipe, report)


def _merge_best(space: SearchSpace, best: Trial, best_recipe: Path, out: Path, best_dir: Path, say: Say) -> None:
    """--merge-best: the final report's merge of the best recipe, linked into `best_dir` (the same bytes: one
    merge, not two); merged afresh when there is none."""
    from medmerge.experiment import KEY_FILE
    from medmerge_common.outdir import atomic_output_dir

    merged = out / "final" / "models" / best_recipe.stem
    if (merged / KEY_FILE).is_file():
        with atomic_output_dir(best_dir, overwrite=False) as staging:
            for file in merged.iterdir():
                if file.is_file() and file.name != KEY_FILE:
                    _link_or_copy(file, staging / file.name)
        say(f"the best recipe's merge (the final report's) is in {best_dir}")
        return
    settings = space.settings
    run_merge(space.recipe(best.point), best_dir, device=settings.merge.device, seed=settings.merge.seed, warn=say)
    say(f"merged the best recipe into {best_dir}")


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of a 7B model's shards), or a copy where the file system has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _start_pool(
    space: SearchSpace, out: Path, first: Point, data_dir: str | None, ray_address: str | None, tasks: Any, say: Say
) -> SerialPool | RayPool:
    """Merge the first point to disk (the carrier every worker loads), then start the workers."""
    settings = space.settings
    carrier = out / CARRIER
    say(f"writing the carrier model (the first point, merged once to disk) to {carrier}")
    run_merge(space.recipe(first), carrier, device=settings.merge.device, seed=settings.merge.seed, overwrite=True)
    args = (space, str(carrier.resolve()), first, data_dir)
    if settings.workers == 1 and ray_address is None:
        return SerialPool(TrialWorker(*args, tasks=tasks))  # the driver's task manager: indexed once
    cuda = "cuda" in (settings.merge.device, settings.lm_eval.device)
    say(f"starting {settings.workers} Ray worker(s){' at ' + ray_address if ray_address else ''}")
    return RayPool(args, settings.workers, ray_address, cuda, data_dir)


def _trial_line(trial: Trial, budget: int | None) -> str:
    values = ", ".join(f"{name}={_show(value)}" for name, value in trial.point.items())
    return (
        f"[trial {trial.trial + 1}{'/' + str(budget) if budget else ''}] fitness {trial.fitness:.4f}  ({values}; "
        f"{trial.recomputed} tensors merged in {trial.merge_seconds:.1f}s, {trial.seconds:.1f}s in all)"
    )


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_best(space: SearchSpace, best: Trial, start: Trial | None, trials: list[Trial], out: Path) -> Path:
    """OUT/best.yaml: the best point as an ordinary recipe, its header saying how it was found (and OUT/start.yaml,
    the start point's recipe, when the search file gives one)."""
    settings = space.settings
    fitness = " + ".join(f"{t.weight:g} x {t.task} {t.metric}" for t in settings.fitness)
    if start is not None:
        _write_atomic(
            out / "start.yaml",
            space.recipe_text(
                start.point,
                f"the start point of {space.file}: "
                f"fitness {start.fitness:.6g} (held-out tasks; scores {json.dumps(start.scores)})",
            ),
        )
    header = "\n".join(
        [
            f"found by `medmerge search {space.file}`: trial {best.trial + 1} of {len(trials)}, "
            f"fitness {best.fitness:.6g}" + (f" (start point: {start.fitness:.6g})" if start is not None else ""),
            f"fitness: {fitness} (held-out tasks; scores {json.dumps(best.scores)})",
            f"optimizer: {settings.optimizer}, seed {settings.seed}; budget: "
            + (f"{settings.trials} trials" if settings.trials else "")
            + (f" / {settings.time_budget}" if settings.time_budget else ""),
            "search space: "
            + "; ".join(f"{d.name} in {list(d.choices) if d.choices else [d.low, d.high]}" for d in space.dimensions),
        ]
    )
    return _write_atomic(out / "best.yaml", space.recipe_text(best.point, header))


def _write_atomic(path: Path, text: str) -> Path:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    staging.replace(path)
    return path


def _final_evaluation(
    space: SearchSpace, best: Trial, start: Trial | None, best_recipe: Path, out: Path, data_dir: str | None, say: Say
) -> Path:
    """The best recipe merged and evaluated on the test tasks beside its parents (and the start point's recipe,
    unless it is the best), as an ordinary `medmerge run` experiment in OUT/final (resumable; paired tests in its
    report)."""
    from medmerge.experiment import located_model, run_experiment

    settings = space.settings
    # absolute, for an experiment file in OUT/final; a LoRA parent, BASE+ADAPTER, is evaluated with lm-eval's peft
    parents = [located_model(ref, Path.cwd()) for ref in space.recipe(best.point).model_refs()]
    final = out / "final"
    final.mkdir(exist_ok=True)
    experiment = {
        "work_dir": ".",
        "recipes": [str(best_recipe.resolve())]
        + ([str((out / "start.yaml").resolve())] if start is not None and start is not best else []),
        "models": parents,
        "tasks": settings.test_tasks,
        "data_dir": data_dir,
        "fewshot_sets": [settings.fewshot_set],
        "note": f"The best recipe of `medmerge search {space.file}` (chosen on held-out tasks) against its parents"
        + (" and the search's start point (`start`, the hand-picked settings)." if start is not None else "."),
        "merge": settings.merge.model_dump(),
        "lm_eval": settings.lm_eval.model_dump(),
    }
    path = final / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    say(f"final evaluation on the test tasks: {path}")
    return run_experiment(path, say=say)
