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
from medmerge_common.errors import UserError
from medmerge_common.outdir import atomic_output_dir

MARKER = ".medmerge-report"  # lists the files a report wrote: a later report may replace those, and nothing else
MARKER_HEADER = "# written by medmerge report; a later report may replace this directory while it holds only:\n"


def build_report(
    inputs: Sequence[str | Path],
    out: str | Path,
    title: str = "Leaderboard",
    note: str = "",
    rank_by: str | None = None,
    bootstrap: int = 10_000,
    seed: int = 0,
    std: str = "population",
    say: Callable[[str], None] = lambda _: None,
) -> Path:
    """Write the report for the lm-eval results under `inputs` into `out`; returns out/leaderboard.md."""
    out = Path(out)
    check_report_dir(out)
    runs, warnings = read_runs(list(inputs))
    for warning in warnings:
        say(f"warning: {warning}")
    if not runs:
        raise UserError(f"no lm-eval results files (results_*.json) found in {', '.join(map(str, inputs))}")
    try:
        board = build_leaderboard(runs, warnings, rank_by=rank_by, std=std)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    say(f"{len(runs)} runs, {len(board.rows)} models, {len(board.columns)} columns")
    comparisons, notes = compare(board, iterations=bootstrap, seed=seed)
    if comparisons:
        say(f"{len(comparisons)} paired tests")
    elif not any(run.samples for run in runs):
        notes.append("no per-sample logs (lm_eval --log_samples), so no paired significance tests")
    with atomic_output_dir(out, overwrite=True, markers=[MARKER]) as staging:
        figures = make_figures(board, staging)
        report = Report(title, note, board, comparisons, figures, notes + board.warnings)
        (staging / "leaderboard.md").write_text(markdown(report), encoding="utf-8")
        write_csv(report, staging)
        write_html(report, staging)
        written = sorted(p.name for p in staging.iterdir())
        (staging / MARKER).write_text(MARKER_HEADER + "".join(f"{name}\n" for name in written))
    return out / "leaderboard.md"


def check_report_dir(out: Path) -> None:
    """A report replaces an earlier report, and only when its directory holds nothing but the files that report
    wrote (listed in its MARKER): notes, results or anything else put there stay, and the report is refused."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise UserError(f"{out} exists, is not empty and is not a medmerge report: choose another -o directory")
    written = {line for line in (out / MARKER).read_text(encoding="utf-8").splitlines() if not line.startswith("#")}
    foreign = sorted(p.name for p in out.iterdir() if p.name != MARKER and p.name not in written)
    if foreign:
        raise UserError(
            f"{out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which no report wrote, "
            "so it will not be replaced: move that away or choose another -o directory"
        )
