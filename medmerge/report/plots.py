"""The report's figures (matplotlib, headless): task bars for all models, TruthfulQA plain vs truthful prompt,
and the per-layer expert choices of MoEs whose routers medmerge trained."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure  # no pyplot: no backend switch, no global figure registry

from medmerge.report.results import display_metric
from medmerge.report.table import Cell, Column, Leaderboard, Row
from medmerge_common.outdir import ROUTER_TRAINING_LOG

# TruthfulQA health forms: (plain group, truthful group, metrics drawn, file stem)
TRUTHFULQA_FORMS = (
    ("medmerge_truthfulqa_health", "medmerge_truthfulqa_health_truthful", ("mc1,none", "mc2,none"), "truthfulqa"),
    (
        "medmerge_truthfulqa_health_mcq",
        "medmerge_truthfulqa_health_mcq_truthful",
        ("acc,none", "exact_match,none"),
        "truthfulqa_mcq",
    ),
)
TRUTHFULQA_GROUPS = {group for form in TRUTHFULQA_FORMS for group in form[:2]}


@dataclass
class Figure:
    file: str
    title: str
    caption: str


def model_colours(rows: list[Row]) -> dict[int, tuple[float, ...]]:
    """A colour per row (by id): plain models in shades of blue, merges in shades of orange, so parents and
    merges are told apart at a glance in every figure."""
    merges = [r for r in rows if r.parent_refs]
    plain = [r for r in rows if not r.parent_refs]
    colours: dict[int, tuple[float, ...]] = {}
    for family, members in (("Blues", plain), ("Oranges", merges)):
        shades = colormaps[family]
        for i, row in enumerate(members):
            colours[id(row)] = shades(0.45 + 0.45 * i / max(1, len(members) - 1))
    return colours


def _legend_label(row: Row) -> str:
    return row.label + (" (merge)" if row.parent_refs else "")


def _fit_y(ax: Axes, cells: list[Cell]) -> None:
    """Scores live in [0, 1]; the axis widens where an error bar reaches beyond it, so no bar is cut off."""
    low = min([0.0, *(c.mean - (c.err or 0) for c in cells)])
    high = max([1.0, *(c.mean + (c.err or 0) for c in cells)])
    ax.set_ylim(low - 0.02 if low < 0 else 0.0, high + 0.02)


def _short(task: str) -> str:
    return task.removeprefix("medmerge_").replace("_", " ")


def task_bars(board: Leaderboard, out: Path) -> Figure | None:
    """Grouped bars: one group per task (leaf tasks, then the averages), one bar per model, error bars = std
    over runs (or stderr of a single run)."""
    truthfulqa = TRUTHFULQA_GROUPS | {t for g in TRUTHFULQA_GROUPS for t in board.group_subtasks.get(g, [])}
    leaves = [c for c in board.columns if not c.is_group and c.metric.startswith("acc,") and c.task not in truthfulqa]
    groups = [c for c in board.columns if c.is_group and c.metric.startswith("acc,") and c.task not in truthfulqa]
    columns = leaves + groups
    rows = [r for r in board.rows if any(c in r.cells for c in columns)]
    if not columns or not rows:
        return None
    width = 0.8 / len(rows)
    fig = MplFigure(figsize=(max(6.0, 0.9 * len(columns) + 3), 4.8))
    ax = fig.subplots()
    colours = model_colours(rows)
    drawn = []
    for i, row in enumerate(rows):
        xs = [k + (i - (len(rows) - 1) / 2) * width for k, c in enumerate(columns) if c in row.cells]
        cells = [row.cells[c] for c in columns if c in row.cells]
        drawn += cells
        ax.bar(
            xs,
            [c.mean for c in cells],
            width,
            yerr=[c.err or 0.0 for c in cells],
            capsize=2,
            color=colours[id(row)],
            label=_legend_label(row),
        )
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(
        [_short(c.task) + (" (avg)" if c.is_group else "") for c in columns], rotation=35, ha="right", fontsize=8
    )
    ax.set_ylabel("accuracy")
    _fit_y(ax, drawn)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.set_title("Accuracy per task" + _runs_note(board, columns))
    fig.tight_layout()
    fig.savefig(out / "tasks.png", dpi=110)
    return Figure(
        "tasks.png",
        "Accuracy per task",
        f"One bar per model (plain models in blue, merges in orange); error bars: {board.std} std over repeated runs, "
        "or lm-eval's stderr for a single run.",
    )


def _runs_note(board: Leaderboard, columns: list[Column]) -> str:
    runs = {len(r.cells[c].values) for r in board.rows for c in columns if c in r.cells}
    return f" (mean of {runs.pop()} runs)" if len(runs) == 1 and min(runs, default=1) > 1 else ""


def pairings(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """The rows grouped as the merging study drew them: one panel per pair of parents, holding the parents and
    every merge of them (a parent appears in each of its pairings); models in no pairing share one panel."""
    position = {id(row): i for i, row in enumerate(rows)}
    panels: dict[tuple[int, ...], list[Row]] = {}
    for row in rows:
        key = tuple(sorted(position[id(p)] for p in row.parents if id(p) in position))
        if key:
            panels.setdefault(key, [rows[i] for i in key]).append(row)
    paired = {id(r) for members in panels.values() for r in members}
    out = [(" × ".join(rows[i].label for i in key), members) for key, members in panels.items()]
    alone = [r for r in rows if id(r) not in paired]
    if alone:
        out.append(("models" if not out else "other models", alone))
    return out


def truthfulqa_bars(board: Leaderboard, out: Path) -> list[Figure]:
    """TruthfulQA health, one figure per form and metric: a panel per pairing, the categories (and all of them
    pooled) on the axis, and per model its plain-prompt bar beside its truthful-prompt bar."""
    figures = []
    for plain, truthful, metrics, stem in TRUTHFULQA_FORMS:
        categories = board.group_subtasks.get(plain, [])
        slots = [(plain, truthful, "all")] + [
            (c, c.replace(plain, truthful, 1), c.removeprefix(plain + "_")) for c in categories
        ]
        for metric in metrics:
            by_task = {c.task: c for c in board.columns if c.metric == metric}
            # the group's pooled value where the group reports both means (the lettered form)
            pooled = metric.replace(",", "_size_weighted,", 1)
            for group in (plain, truthful):
                by_task |= {c.task: c for c in board.columns if c.task == group and c.metric == pooled}
            rows = [r for r in board.rows if any(by_task.get(t) in r.cells for slot in slots for t in slot[:2])]
            if not rows:
                continue
            name = f"{stem}_{display_metric(metric)}.png"
            title = f"TruthfulQA health{' (lettered)' if 'mcq' in stem else ''} {display_metric(metric)}"
            _draw_pairings(pairings(rows), slots, by_task, title, out / name)
            figures.append(
                Figure(
                    name,
                    title,
                    "One panel per pairing (its two parents and their merges, as the study's figures 4 and 5); "
                    "per category ('all' = the four pooled), each model's plain-prompt bar (solid) beside its "
                    "bar for the prompt asking for a truthful, positive, unbiased answer (hatched).",
                )
            )
    return figures


def _draw_pairings(
    panels: list[tuple[str, list[Row]]],
    slots: list[tuple[str, str, str]],
    by_task: dict[str, Column],
    title: str,
    path: Path,
) -> None:
    most = max(len(members) for _, members in panels)
    fig = MplFigure(figsize=(max(7.0, 0.45 * most * len(slots) + 3.5), 2.9 * len(panels) + 0.7))
    axes = fig.subplots(len(panels), 1, squeeze=False)
    colours = model_colours(list({id(r): r for _, members in panels for r in members}.values()))
    for ax, (panel_title, members) in zip(axes[:, 0], panels, strict=True):
        width = 0.85 / (2 * len(members))
        drawn = []
        for i, row in enumerate(members):
            for j, hatch in enumerate(("", "///")):
                cells = [row.cells.get(by_task[slot[j]]) if slot[j] in by_task else None for slot in slots]
                drawn += [c for c in cells if c]
                ax.bar(
                    [k - 0.425 + (2 * i + j + 0.5) * width for k in range(len(slots))],
                    [c.mean if c else 0.0 for c in cells],
                    width,
                    yerr=[(c.err or 0.0) if c else 0.0 for c in cells],
                    capsize=1.5,
                    color=colours[id(row)],
                    hatch=hatch,
                    edgecolor="white" if hatch else None,
                    label=_legend_label(row) if not hatch else None,
                )
        ax.set_xticks(range(len(slots)))
        ax.set_xticklabels([slot[2] for slot in slots], fontsize=8)
        ax.set_title(panel_title, fontsize=9)
        _fit_y(ax, drawn)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.suptitle(f"{title}: plain (solid) vs truthful prompt (hatched)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)


def router_figures(board: Leaderboard, out: Path) -> list[Figure]:
    """For every row whose model directory holds a router training log (`medmerge moe train-router`), the studies'
    layer-wise analysis: per layer, the share of validation tokens that chose each expert and each expert's mean
    routing weight, as built (epoch 0, hollow) and as kept (the best epoch, filled)."""
    figures = []
    for index, row in enumerate(board.rows):
        log_path = Path(row.model) / ROUTER_TRAINING_LOG
        if not log_path.is_file():
            continue
        try:
            log = json.loads(log_path.read_text(encoding="utf-8"))
            epochs = {e["epoch"]: e for e in log["epochs"]}
            drawn = (epochs[0], epochs[log["best_epoch"]])
            experts = int(log["experts"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a log this report cannot read is not worth failing the report for
        fig = MplFigure(figsize=(10, 3.6))
        axes = fig.subplots(1, 2)
        layers = len(drawn[0]["validation_choices"])
        width = 0.8 / (2 * experts)
        colours = colormaps["tab10"]
        for ax, (key, ylabel) in zip(
            axes, (("validation_choices", "share of tokens choosing it"), ("validation_weights", "mean routing weight"))
        ):
            for e_index, epoch in enumerate(drawn):
                for expert in range(experts):
                    values = []
                    for layer in range(layers):
                        value = float(epoch[key][layer][expert])
                        tokens = sum(epoch["validation_choices"][layer]) / log["settings"]["top_k"]
                        values.append(value / tokens if key == "validation_choices" and tokens else value)
                    slot = expert * 2 + e_index
                    ax.bar(
                        [x + (slot - (2 * experts - 1) / 2) * width for x in range(layers)],
                        values,
                        width,
                        color=colours(expert) if e_index else "none",
                        edgecolor=colours(expert),
                        label=f"expert {expert} ({'trained' if e_index else 'as built'})",
                    )
            ax.set_xticks(range(layers))
            ax.set_xticklabels([str(layer) for layer in range(layers)], fontsize=8)
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel)
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        fig.suptitle(f"{row.label}: routers per layer, as built vs epoch {log['best_epoch']}", fontsize=10)
        fig.tight_layout()
        name = f"routers_{index}.png"
        fig.savefig(out / name, dpi=110)
        figures.append(
            Figure(
                name,
                f"{row.label}: expert choice per layer",
                f"Validation questions of its router training ({log['questions']['validation']}); hollow bars: the "
                f"routers as built, filled: after training (epoch {log['best_epoch']}, validation accuracy "
                f"{drawn[0]['validation_accuracy']:.3f} -> {drawn[1]['validation_accuracy']:.3f}).",
            )
        )
    return figures


def make_figures(board: Leaderboard, out: Path) -> list[Figure]:
    bars = task_bars(board, out)
    return ([bars] if bars else []) + truthfulqa_bars(board, out) + router_figures(board, out)
