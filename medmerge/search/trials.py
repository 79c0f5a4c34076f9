"""One trial: merge a point of the search space into a loaded model, score it with lm-eval on held-out tasks.

A `TrialWorker` holds one model copy: lm-eval's own `hf` model, loaded once (exactly as `lm_eval --model hf
--model_args pretrained=DIR` loads it) from a first merge written to disk (the carrier). Each trial merges its
recipe into that model's tensors (`merge.inplace`: only the tensors the trial changes) and runs
`lm_eval.simple_evaluate` on the same object — no checkpoint written, no reload.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from medmerge.experiment import library_progress_bars, lm_eval_model_args, scoped_environment
from medmerge.search.space import FitnessTerm, Point, SearchSpace
from medmerge_common.errors import UserError, did_you_mean
from merge.inplace import InPlaceMerge


@dataclass
class TrialResult:
    fitness: float
    scores: dict[str, float]  # "task/metric" -> value, for every fitness term
    seconds: float  # merge + evaluation
    merge_seconds: float
    recomputed: int  # tensors merged (the others were unchanged since the worker's last trial)


def task_manager(fewshot_set: int, tasks: list[str]) -> Any:
    """lm-eval's TaskManager with BioInstructQA's shot set; one that indexes only medmerge's task directory when
    every task is medmerge's (indexing all of lm-eval's task files costs seconds per manager)."""
    from lm_eval.tasks import TaskManager

    only_ours = all(name.startswith("medmerge_") for name in tasks)
    return TaskManager(include_defaults=not only_ours, metadata={"fewshot_set": fewshot_set})


def check_fitness_tasks(space: SearchSpace, manager: Any, allow_test: bool) -> None:
    """Every fitness task exists and, unless `allow_test`, is scored on held-out data: a task (or any task of a
    group) that lm-eval would score on a test split is refused, naming the fitness entry's line."""
    known = set(manager.all_tasks)
    for i, term in enumerate(space.settings.fitness):
        where = space.where("search", "fitness", i, "task")
        if term.task not in known:
            raise UserError(f"unknown lm-eval task or group '{term.task}'{did_you_mean(term.task, known)}", **where)
        if allow_test:
            continue
        with _quiet(logging.ERROR):
            tasks = manager.load([term.task])["tasks"]
        on_test = sorted(name for name, task in tasks.items() if task.config.test_split)
        if on_test:
            raise UserError(
                f"'{term.task}' is scored on a test split ({on_test[0]}: split '{tasks[on_test[0]].config.test_split}')"
                ": a search tuned on test questions makes every test number it reports meaningless. Use held-out"
                " tasks (the medmerge_*_validation tasks), or pass --allow-test-fitness to do it anyway",
                **where,
            )


def fitness_of(results: dict[str, Any], terms: list[FitnessTerm]) -> tuple[float, dict[str, float]]:
    """Σ weight × metric over the fitness terms, from simple_evaluate's output (tasks and groups alike)."""
    scores: dict[str, float] = {}
    for term in terms:
        entry = results.get("groups", {}).get(term.task) or results["results"].get(term.task, {})
        value = entry.get(f"{term.metric},none")
        if not isinstance(value, int | float):
            reported = sorted({k.split(",")[0] for k, v in entry.items() if isinstance(v, int | float) and "," in k})
            raise UserError(
                f"fitness: task '{term.task}' reports no metric '{term.metric}'"
                f"{did_you_mean(term.metric, reported)} (it reports: {', '.join(reported) or 'nothing'})"
            )
        scores[f"{term.task}/{term.metric}"] = float(value)
    return sum(t.weight * scores[f"{t.task}/{t.metric}"] for t in terms), scores


class TrialWorker:
    """One model copy that evaluates trials one after another (in this process, or as a Ray actor)."""

    def __init__(
        self, space: SearchSpace, carrier: str, carrier_point: Point, data_dir: str | None, tasks: Any = None
    ) -> None:
        """`tasks`: a TaskManager to reuse (the driver's, when the worker runs in its process)."""
        import lm_eval.api.registry

        self.space = space
        self.data_dir = data_dir
        settings = space.settings
        with _quiet(logging.WARNING), library_progress_bars(False):
            self.lm = lm_eval.api.registry.get_model("hf").create_from_arg_obj(
                lm_eval_model_args(carrier, settings.lm_eval),
                {"batch_size": settings.lm_eval.batch_size, "device": settings.lm_eval.device},
            )
        loaded = space.recipe(carrier_point)
        self.merger = InPlaceMerge(
            loaded,
            self.lm.model.state_dict(keep_vars=True),
            device=settings.merge.device,
            seed=settings.merge.seed,
            cache_inputs=settings.cache_inputs,
        )
        self.merger.assume(loaded)
        self.tasks = tasks or task_manager(settings.fewshot_set, [t.task for t in settings.fitness])

    def run(self, point: Point) -> TrialResult:
        import lm_eval

        settings = self.space.settings
        start = time.perf_counter()
        recomputed = self.merger.merge(self.space.recipe(point))
        merged = time.perf_counter()
        with scoped_environment(MEDMERGE_DATA_DIR=self.data_dir), _quiet(logging.ERROR):
            output = lm_eval.simple_evaluate(
                model=self.lm,
                tasks=[t.task for t in settings.fitness],
                task_manager=self.tasks,
                limit=settings.lm_eval.limit,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
        fitness, scores = fitness_of(output, settings.fitness)
        end = time.perf_counter()
        return TrialResult(fitness, scores, end - start, merged - start, recomputed)

    def run_numbered(self, number: int, point: Point) -> tuple[int, TrialResult]:
        return number, self.run(point)

    def close(self) -> None:
        self.merger.close()


@contextmanager
def _quiet(level: int) -> Iterator[None]:
    """lm-eval's and transformers' loggers at `level` or above for the block (a search runs hundreds of
    evaluations; their per-run INFO lines would bury the trial log)."""
    loggers = [logging.getLogger(name) for name in ("lm-eval", "lm_eval", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels):
            logger.setLevel(old)
