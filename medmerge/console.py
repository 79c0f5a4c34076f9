"""Terminal output: progress bars (rich, on stderr) and the dry-run plan listing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from merge.plan import MergePlan
from merge.run import Progress


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Progress | None]:
    """A rich progress bar driven by (done, total, label) calls; yields None when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[label]}"),
    )
    bar = Progress(*columns, console=Console(stderr=True))
    task = None

    def update(done: int, total: int, label: str) -> None:
        nonlocal task
        if task is None:  # started on the first step, so validation errors print without a bar
            bar.start()
            task = bar.add_task(description, total=total, label="")
        bar.update(task, completed=done, total=total, label=label)

    try:
        yield update
    except BaseException:
        bar.live.transient = True  # an error or Ctrl-C: take the bar away, so the error line is the first thing
        raise
    finally:
        if task is not None:  # a bar never started must print nothing (not even the newline stop() writes)
            bar.stop()


def describe_plan(plan: MergePlan) -> str:
    """A readable listing of what a merge would do, one line per output tensor."""
    recipe = plan.recipe
    lines = [
        f"recipe      {recipe.source_file}",
        f"method      {recipe.merge_method}  ({recipe.method.summary})",
        f"models      {', '.join(plan.models)}",
        f"base        {recipe.base_model or '-'}",
        f"output      {plan.num_layers} layers, {len(plan.jobs)} tensors, "
        f"{sum(j.output.nbytes for j in plan.jobs) / 1e9:.3f} GB, "
        f"dtype {recipe.out_dtype or recipe.dtype or 'as input'}",
    ]
    vocabulary = plan.vocabulary
    if vocabulary is not None and recipe.vocabulary_settings is not None:
        lacking = {ref: int((rows < 0).sum()) for ref, rows in vocabulary.rows.items()}
        lines.append(
            f"vocabulary  {len(vocabulary.tokens)} tokens ({recipe.vocabulary_settings.source}), "
            f"{vocabulary.size} rows; tokens each model lacks: " + ", ".join(f"{ref} {n}" for ref, n in lacking.items())
        )
    lines.append("")
    for job in plan.jobs:
        shared = " ".join(f"{k}={_fmt(v)}" for k, v in job.params.items())
        inputs = ", ".join(
            f"{s.model}"
            + (f"[{s.tensor}]" if s.tensor != job.output.name else "")
            + ("" if not s.params else " (" + " ".join(f"{k}={_fmt(v)}" for k, v in s.params.items()) + ")")
            for s in job.sources
        )
        lines.append(f"{job.output.name}  [position {job.t:.3f}]  {shared}  <- {inputs}")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
