"""From lm-eval runs to a leaderboard: rows (models), columns (task x metric), folded repeats, ranks, parents.

A row is one model under one set of prompt settings (shots, chat template); its repeated runs (BioInstructQA's
three shot sets, other few-shot seeds) fold into mean ± population std (BioMistral's statistics.pstdev; `std="sample"`
for the n-1 form). A single run shows lm-eval's stderr.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from medmerge.report.parents import find_parents, same_model
from medmerge.report.results import Run, display_metric, newest_per_seed
from medmerge_common.errors import did_you_mean


@dataclass(frozen=True)
class Column:
    task: str
    metric: str  # lm-eval's key, e.g. "acc,none"
    is_group: bool
    higher_is_better: bool = True

    @property
    def label(self) -> str:
        return f"{self.task.removeprefix('medmerge_')} {display_metric(self.metric)}"


# The spread of repeated runs: BioMistral reports statistics.pstdev over its three shot sets (population, /n);
# "sample" (/(n-1)) is 1.22x larger for n = 3.
STD = {"population": statistics.pstdev, "sample": statistics.stdev}


@dataclass
class Cell:
    values: list[float]
    stderr: float | None  # lm-eval's, for a single run
    std: str = "population"  # which STD folds repeated runs

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def err(self) -> float | None:
        return STD[self.std](self.values) if len(self.values) > 1 else self.stderr

    @property
    def err_kind(self) -> str:
        return f"{self.std} std over {len(self.values)} runs" if len(self.values) > 1 else "stderr"


@dataclass
class Row:
    model: str
    variant: tuple[tuple[str, str], ...]
    runs: list[Run]
    label: str = ""
    cells: dict[Column, Cell] = field(default_factory=dict)
    rank: int | None = None
    parent_refs: list[str] = field(default_factory=list)
    parents_from: str = ""
    parents: list[Row] = field(default_factory=list)  # the parent_refs found among the rows
    missing_parents: list[str] = field(default_factory=list)

    def beats_all_parents(self, column: Column) -> bool:
        """True when every parent was evaluated on `column` and this model is better than each."""
        if not self.parent_refs or self.missing_parents or column not in self.cells:
            return False
        mine = self.cells[column].mean
        theirs = [p.cells[column].mean for p in self.parents if column in p.cells]
        if len(theirs) != len(self.parents):
            return False
        return all(mine > t if column.higher_is_better else mine < t for t in theirs)


@dataclass
class Leaderboard:
    rows: list[Row]
    columns: list[Column]
    headline: Column | None
    group_subtasks: dict[str, list[str]]
    warnings: list[str]
    std: str = "population"


def _columns(runs: list[Run]) -> tuple[list[Column], dict[str, list[str]]]:
    """Group columns first (the averages), then every task under them, then tasks outside any group."""
    subtasks: dict[str, list[str]] = {}
    for run in runs:
        for group, members in run.group_subtasks.items():
            known = subtasks.setdefault(group, [])
            known += [m for m in members if m not in known]
    metrics: dict[str, list[str]] = {}
    higher: dict[tuple[str, str], bool] = {}
    for run in runs:
        for task, measures in run.metrics.items():
            for key in measures:
                if task not in subtasks and key.split(",")[0].endswith("_size_weighted"):
                    continue  # a group's aggregation aid; equal to the plain metric on a single task
                if key not in metrics.setdefault(task, []):
                    metrics[task].append(key)
                name = key.split(",")[0]
                higher.setdefault((task, key), run.higher_is_better.get(task, {}).get(name, True))
    nested = {m for members in subtasks.values() for m in members}
    order: list[str] = []

    def visit(task: str) -> None:
        if task not in order:
            order.append(task)
            for member in subtasks.get(task, []):
                visit(member)

    for task in metrics:
        if task not in nested:
            visit(task)
    order = [t for t in order if t in metrics]
    order = [t for t in order if t in subtasks] + [t for t in order if t not in subtasks]
    columns = [Column(t, k, t in subtasks, higher[(t, k)]) for t in order for k in metrics[t]]
    return columns, subtasks


def _labels(rows: list[Row]) -> None:
    """Hub ids as they are; directories by their name, with enough parents to tell them apart; a variant suffix
    where one model was evaluated under several settings."""

    def short(model: str, depth: int) -> str:
        path = Path(model)
        return "/".join(path.parts[-depth:]) if path.is_absolute() or path.exists() else model

    depth = 1
    while depth < 8 and len({short(r.model, depth) for r in rows}) < len({r.model for r in rows}):
        depth += 1
    variants: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for row in rows:
        variants.setdefault(row.model, set()).add(row.variant)
    for row in rows:
        row.label = short(row.model, depth)
        if len(variants[row.model]) > 1:
            row.label += " [" + ", ".join(f"{k} {v}" for k, v in row.variant) + "]"


def build_leaderboard(
    runs: list[Run], warnings: list[str], rank_by: str | None = None, std: str = "population"
) -> Leaderboard:
    """Fold runs into rows (mean ± `std` std of repeated runs), pick columns, rank on the headline column, find
    each merge's parents."""
    if std not in STD:
        raise ValueError(f"unknown std '{std}' (use {' or '.join(STD)})")
    columns, subtasks = _columns(runs)
    rows: dict[tuple[str, tuple[tuple[str, str], ...]], Row] = {}
    for run in sorted(runs, key=lambda r: r.date):
        row = rows.setdefault((run.model, run.variant), Row(run.model, run.variant, []))
        row.runs.append(run)
    superseded: set[tuple[Path, Path]] = set()
    for row in rows.values():
        for column in columns:
            runs, replaced = newest_per_seed(row.runs, lambda r, c=column: c.metric in r.metrics.get(c.task, {}))
            superseded |= {(old.path, new.path) for old, new in replaced}
            if runs:
                measures = [r.metrics[column.task][column.metric] for r in runs]
                single_stderr = measures[0].stderr if len(measures) == 1 else None
                row.cells[column] = Cell([m.value for m in measures], single_stderr, std)
    for old, new in sorted(superseded):
        warnings.append(f"{old}: superseded by the newer run {new} (same model, settings and seed)")
    ordered = list(rows.values())
    _labels(ordered)

    headline = columns[0] if columns else None
    if rank_by is not None:
        matches = [c for c in columns if rank_by in (c.label, c.task, f"{c.task} {display_metric(c.metric)}")]
        if not matches:
            labels = [c.label for c in columns]
            raise ValueError(
                f"--rank-by '{rank_by}' is not a column{did_you_mean(rank_by, labels)}; columns: {', '.join(labels)}"
            )
        headline = matches[0]
    if headline is not None:
        sign = 1 if headline.higher_is_better else -1
        scored = sorted((r for r in ordered if headline in r.cells), key=lambda r: -sign * r.cells[headline].mean)
        for row in scored:
            better = sum(1 for r in scored if sign * r.cells[headline].mean > sign * row.cells[headline].mean)
            row.rank = better + 1
        ordered = scored + [r for r in ordered if headline not in r.cells]

    for row in ordered:
        row.parent_refs, row.parents_from = find_parents(row.model)
        for ref in row.parent_refs:
            # A parent counts only under the same prompt settings: 3-shot merge against 3-shot parent.
            found = [r for r in ordered if r is not row and r.variant == row.variant and same_model(ref, r.model)]
            if found:
                row.parents.append(found[0])
            else:
                row.missing_parents.append(ref)
    return Leaderboard(ordered, columns, headline, subtasks, warnings, std)


def column_sections(board: Leaderboard) -> list[tuple[str, list[Column]]]:
    """The main table (averages and single-metric tasks), then one table per group whose tasks each report
    several metrics (TruthfulQA's categories, MC1 and MC2), so the main table stays readable."""
    per_task: dict[str, int] = {}
    for column in board.columns:
        per_task[column.task] = per_task.get(column.task, 0) + 1
    detailed = {
        group: [c for c in board.columns if c.task in members]
        for group, members in board.group_subtasks.items()
        if any(per_task.get(m, 0) > 1 and m not in board.group_subtasks for m in members)
    }
    moved = {c for columns in detailed.values() for c in columns if not c.is_group}
    sections = [("", [c for c in board.columns if c not in moved])]
    for group, columns in detailed.items():
        leaves = [c for c in columns if not c.is_group]
        if leaves:
            sections.append((f"{group.removeprefix('medmerge_')} by task", leaves))
    return sections
