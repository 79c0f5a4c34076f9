"""The optimisers, behind one ask/tell interface over points of the search space (dimension name -> value).

Both are seeded and keep their randomness to themselves (CMA-ES's sampler draws from its own generator, not
numpy's global one, which lm-eval reseeds on every evaluation), so the points asked depend only on the seed and
the fitness values told: a resumed search replays its journal through ask/tell and continues identically.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from medmerge.search.space import Dimension, Point


class Optimizer(Protocol):
    def ask(self) -> list[Point]:
        """The next round of points, evaluated side by side; every one is told before the next ask."""

    def tell(self, points: list[Point], fitness: list[float]) -> None:
        """The fitness of each point of the last round (higher is better)."""


class CMAES:
    """CMA-ES (Hansen's `cma` package) on the unit cube: each dimension's range maps linearly onto [0, 1], a
    choice onto equal slices of it; the search starts at the middle, or at `start`, with step `sigma`. A round is
    one generation (`batch` points; default cma's 4 + 3 ln d); with `start`, the first round is that point alone
    (scored to compare with, not told: it is the distribution's mean, not one of its samples)."""

    def __init__(
        self, dimensions: list[Dimension], seed: int, sigma: float, batch: int | None, start: Point | None = None
    ) -> None:
        import cma

        self.dimensions = dimensions
        self.start = start
        self.rng = np.random.default_rng(seed)
        # cma refuses one-dimensional problems; a second coordinate that nothing reads keeps it in its tested range
        width = max(len(dimensions), 2)
        options = {
            "bounds": [0.0, 1.0],
            "seed": seed + 1,  # cma reads 0 as "seed from the clock"
            "randn": lambda *shape: self.rng.standard_normal(shape),
            "verbose": -9,
        }
        if batch:
            options["popsize"] = batch
        mean = [d.to_unit(start[d.name]) for d in dimensions] if start else [0.5] * len(dimensions)
        self.strategy = cma.CMAEvolutionStrategy(mean + [0.5] * (width - len(dimensions)), sigma, options)
        self.asked: list[np.ndarray] = []

    def ask(self) -> list[Point]:
        if self.start is not None:
            self.asked = []
            return [self.start]
        self.asked = self.strategy.ask()
        return [{d.name: d.from_unit(float(x[i])) for i, d in enumerate(self.dimensions)} for x in self.asked]

    def tell(self, points: list[Point], fitness: list[float]) -> None:
        if self.start is not None:
            self.start = None
            return
        self.strategy.tell(self.asked, [-f for f in fitness])  # cma minimises


class TPE:
    """Optuna's tree-structured Parzen estimator (its default startup of random trials first); ranges are
    uniform, choices categorical. A round is `batch` points (default 1); with `start`, the first round is that
    point alone (enqueued, and told like any trial)."""

    def __init__(self, dimensions: list[Dimension], seed: int, batch: int | None, start: Point | None = None) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        self.distributions = {
            d.name: optuna.distributions.CategoricalDistribution(d.choices)
            if d.choices
            else optuna.distributions.FloatDistribution(d.low, d.high)
            for d in dimensions
        }
        self.batch = batch or 1
        self.asked: list = []
        self.start = start
        if start is not None:
            self.study.enqueue_trial(start)

    def ask(self) -> list[Point]:
        size, self.start = (1 if self.start is not None else self.batch), None
        self.asked = [self.study.ask(self.distributions) for _ in range(size)]
        return [dict(trial.params) for trial in self.asked]

    def tell(self, points: list[Point], fitness: list[float]) -> None:
        for trial, value in zip(self.asked, fitness):
            self.study.tell(trial, value)


def make_optimizer(
    name: str, dimensions: list[Dimension], seed: int, sigma: float, batch: int | None, start: Point | None = None
) -> Optimizer:
    return CMAES(dimensions, seed, sigma, batch, start) if name == "cma" else TPE(dimensions, seed, batch, start)
