"""The search's two figures: fitness per trial (with the running best) and fitness against each parameter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure  # no pyplot: no backend switch, no global figure registry

from medmerge.search.space import SearchSpace

if TYPE_CHECKING:
    from medmerge.search.run import Trial


def plot_trials(trials: list[Trial], space: SearchSpace, out: Path) -> list[Path]:
    """OUT/fitness.png and OUT/parameters.png; returns their paths."""
    numbers = [t.trial + 1 for t in trials]
    fitness = [t.fitness for t in trials]
    best = [max(fitness[: i + 1]) for i in range(len(fitness))]
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(numbers, fitness, "o", color="#4c72b0", label="trial")
    ax.step(numbers, best, where="post", color="#dd8452", label="best so far")
    ax.set(xlabel="trial", ylabel="fitness", title=f"{space.file.name}: {space.settings.optimizer}")
    ax.legend(loc="lower right")
    paths = [out / "fitness.png"]
    figure.savefig(paths[0], dpi=120)

    dims = space.dimensions
    cols = min(3, len(dims))
    rows = math.ceil(len(dims) / cols)
    figure = Figure(figsize=(3.2 * cols, 2.8 * rows), layout="constrained")
    for i, dim in enumerate(dims):
        ax = figure.add_subplot(rows, cols, i + 1)
        values = [t.point[dim.name] for t in trials]
        if dim.choices:
            labels = [str(c) for c in dim.choices]
            ax.set_xticks(range(len(labels)), labels, rotation=20)
            values = [dim.choices.index(v) for v in values]
        ax.scatter(values, fitness, c=numbers, cmap="viridis", s=18)
        ax.set(xlabel=dim.name, ylabel="fitness" if i % cols == 0 else None)
        ax.xaxis.label.set_fontsize(7)
    paths.append(out / "parameters.png")
    figure.savefig(paths[1], dpi=120)
    return paths
