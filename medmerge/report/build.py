"""`medmerge report RESULTS... -o DIR`: lm-eval outputs in, leaderboard.md/.csv, pairwise.csv, PNGs, index.html out.

runs = read_runs(inputs)            # results_*.json (+ samples_*.jsonl), tolerant
board = build_leaderboard(runs)     # rows, columns, mean ± std, ranks, parents
comparisons = compare(board)        # paired tests where per-sample logs exist
figures = make_figures(board, dir)  # matplotlib PNGs
render -> markdown, CSV, HTML       # written to a staging dir, renamed into place when complete
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from medmerge.report.pairwise import compare
from medmerge.report.plots import make_figures
from medmerge.report.render import Report, markdown, write_csv, write_html
from medmerge.report.results import read_runs
from medmerge.report.table import build_leaderboard
from merge.errors import RecipeError
from merge.io.writer import atomic_output_dir

MARKER = ".medmerge-report"  # lets a later report replace this directory, and nothing else


def build_report(
    inputs: Sequence[str | Path],
    out: str | Path,
    title: str = "Leaderboard",
    note: str = "",
    rank_by: str | None = None,
    bootstrap: int = 10_000,
    seed: int = 0,
    say: Callable[[str], None] = lambda _: None,
) -> Path:
    """Write the report for the lm-eval results under `inputs` into `out`; returns out/leaderboard.md."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise RecipeError(f"{out} exists, is not empty and is not a medmerge report: choose another -o directory")
    runs, warnings = read_runs(list(inputs))
    for warning in warnings:
        say(f"warning: {warning}")
    if not runs:
        raise RecipeError(f"no lm-eval results files (results_*.json) found in {', '.join(map(str, inputs))}")
    try:
        board = build_leaderboard(runs, warnings, rank_by=rank_by)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    say(f"{len(runs)} runs, {len(board.rows)} models, {len(board.columns)} columns")
    comparisons, notes = compare(board, iterations=bootstrap, seed=seed)
    if comparisons:
        say(f"{len(comparisons)} paired tests")
    elif not any(run.samples for run in runs):
        notes.append("no per-sample logs (lm_eval --log_samples), so no paired significance tests")
    with atomic_output_dir(out, overwrite=True) as staging:
        figures = make_figures(board, staging)
        report = Report(title, note, board, comparisons, figures, notes + board.warnings)
        (staging / "leaderboard.md").write_text(markdown(report), encoding="utf-8")
        write_csv(report, staging)
        write_html(report, staging)
        (staging / MARKER).write_text("written by medmerge report; the next report may replace this directory\n")
    return out / "leaderboard.md"
