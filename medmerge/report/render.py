"""Writing a leaderboard out: leaderboard.md, leaderboard.csv, pairwise.csv and a self-contained index.html."""

from __future__ import annotations

import base64
import csv
from dataclasses import dataclass
from pathlib import Path

import jinja2

from medmerge.report.pairwise import Comparison
from medmerge.report.plots import Figure
from medmerge.report.table import Cell, Column, Leaderboard, Row, column_sections

ALPHA = 0.05
MIN_EFFECT = 0.001  # the smallest difference the report prints (three decimals): smaller ones are never marked


@dataclass
class Report:
    title: str
    note: str
    board: Leaderboard
    comparisons: list[Comparison]
    figures: list[Figure]
    notes: list[str]  # columns without tests, files skipped, runs superseded

    def comparison(self, column: Column, a: Row, b: Row) -> Comparison | None:
        for c in self.comparisons:
            if c.column == column and {id(c.a), id(c.b)} == {id(a), id(b)}:
                return c
        return None

    def runs(self, row: Row) -> int:
        return max((len(cell.values) for cell in row.cells.values()), default=0)


def fmt(value: float) -> str:
    return f"{value:.3f}"


def fmt_cell(cell: Cell | None) -> str:
    if cell is None:
        return ""
    return fmt(cell.mean) + (f" ± {fmt(cell.err)}" if cell.err is not None else "")


def fmt_delta(value: float) -> str:
    """Three decimals, like every score: a difference below the last digit prints as +0.000 or -0.000 (its sign
    kept) and is never marked significant (MIN_EFFECT)."""
    return f"{value:+.3f}"


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def signed_delta(report: Report, column: Column, row: Row, other: Row) -> tuple[float, Comparison | None]:
    """row - other on the leaderboard means, and the paired test between them if one was made."""
    return row.cells[column].mean - other.cells[column].mean, report.comparison(column, row, other)


def _significance_mark(comparison: Comparison | None, row: Row) -> str:
    if comparison is None:
        return ""
    winner = comparison.better(ALPHA, MIN_EFFECT)
    return "" if winner is None else ("*" if winner is row else "†")


def markdown(report: Report) -> str:
    board = report.board
    lines = [f"# {report.title}", ""]
    if report.note:
        lines += [report.note.strip(), ""]
    if board.headline:
        lines += [f"Ranked by **{board.headline.label}**. " + legend(board.std), ""]
    sections = column_sections(board)
    main = sections[0][1]
    lines += _markdown_table(report, main, ranked=True)
    for title, columns in sections[1:]:
        lines += ["", f"## {title}", ""] + _markdown_table(report, columns, ranked=False)
    merges = [r for r in board.rows if r.parent_refs]
    if merges:
        lines += ["", "## Merges against their parents", "", PARENTS_LEGEND, ""]
        lines += ["| merge | parent | " + " | ".join(c.label for c in main) + " |"]
        lines += ["|---|---|" + "---:|" * len(main)]
        for row in merges:
            for parent in row.parents:
                cells = []
                for column in main:
                    if column in row.cells and column in parent.cells:
                        delta, comparison = signed_delta(report, column, row, parent)
                        cells.append(fmt_delta(delta) + _significance_mark(comparison, row))
                    else:
                        cells.append("")
                lines.append(f"| {row.label} | {parent.label} | " + " | ".join(cells) + " |")
            for ref in row.missing_parents:
                lines.append(f"| {row.label} | {ref} (not evaluated here) | " + " | " * len(main))
    if report.comparisons and board.headline:
        tested = [c for c in report.comparisons if c.column == board.headline]
        if tested:
            lines += ["", f"## Paired tests on {board.headline.label}", "", MATRIX_LEGEND, ""]
            lines += ["| row − column | " + " | ".join(r.label for r in board.rows) + " |"]
            lines += ["|---|" + "---:|" * len(board.rows)]
            for row in board.rows:
                cells = []
                for other in board.rows:
                    comparison = report.comparison(board.headline, row, other) if other is not row else None
                    if comparison is None:
                        cells.append("")
                        continue
                    delta, _ = signed_delta(report, board.headline, row, other)
                    cells.append(f"{fmt_delta(delta)} (p {fmt_p(comparison.p)}){_significance_mark(comparison, row)}")
                lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
            lines += ["", "Every column's tests: `pairwise.csv` and `index.html`."]
    if report.figures:
        lines += ["", "## Figures", ""] + [f"![{f.title}]({f.file})" for f in report.figures]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def _markdown_table(report: Report, columns: list[Column], ranked: bool) -> list[str]:
    board = report.board
    lead = "| rank | model | runs | " if ranked else "| model | "
    lines = [lead + " | ".join(c.label for c in columns) + " |"]
    lines += [("|---:|---|---:|" if ranked else "|---|") + "---:|" * len(columns)]
    for row in board.rows:
        star = " ★" if ranked and board.headline and row.beats_all_parents(board.headline) else ""
        cells = [fmt_cell(row.cells.get(c)) + (" ↑" if row.beats_all_parents(c) else "") for c in columns]
        lead = f"| {row.rank or ''} | {row.label}{star} | {report.runs(row)} | " if ranked else f"| {row.label} | "
        lines.append(lead + " | ".join(cells) + " |")
    return lines


STD_WORDS = {
    "population": "population std (÷n, BioMistral's statistics.pstdev)",
    "sample": "sample std (÷(n−1))",
}


def legend(std: str) -> str:
    return (
        f"Cells: mean ± {STD_WORDS[std]} over repeated runs (few-shot sets or seeds; see runs), or ± lm-eval's "
        "stderr for a single run. BioInstructQA's exact_match is BioMistral's metric (the gold letter is the top "
        "token over the whole vocabulary); acc is the argmax over the option letters. ★: a merge better than every "
        "one of its parents on the ranking column; ↑: on that column."
    )


PARENTS_LEGEND = (
    "Δ = merge − parent (parents from the model card's base_model list, else the recipe in the model "
    f"directory). * merge significantly better, † significantly worse (paired test, p < {ALPHA}, not adjusted, and "
    f"|Δ| ≥ {MIN_EFFECT}: a smaller difference prints as ±0.000 and is never marked)."
)
MATRIX_LEGEND = (
    "Δ = row − column on the leaderboard means; p from McNemar's exact test (one run each, 0/1 scores) or a "
    f"paired bootstrap over documents (several runs, continuous scores, groups). * row significantly better, † "
    f"worse (p < {ALPHA} and |Δ| ≥ {MIN_EFFECT}); pairwise.csv also has Holm-adjusted p-values."
)


def write_csv(report: Report, out: Path) -> None:
    board = report.board
    with (out / "leaderboard.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        header = ["rank", "model", "model_path", "runs", "beats_all_parents", "parents"]
        for column in board.columns:
            header += [column.label, f"{column.label} err", f"{column.label} runs"]
        writer.writerow(header)
        for row in board.rows:
            line: list[object] = [
                row.rank or "",
                row.label,
                row.model,
                report.runs(row),
                int(bool(board.headline and row.beats_all_parents(board.headline))),
                ";".join(row.parent_refs),
            ]
            for column in board.columns:
                cell = row.cells.get(column)
                err = cell.err if cell else None
                line += [
                    repr(cell.mean) if cell else "",
                    repr(err) if err is not None else "",
                    len(cell.values) if cell else "",
                ]
            writer.writerow(line)
    with (out / "pairwise.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "metric", "model_a", "model_b", "delta_a_minus_b", "p", "p_holm", "test", "docs"])
        for c in report.comparisons:
            numbers = [repr(c.delta), repr(c.p), repr(c.p_holm)]
            writer.writerow([c.column.task, c.column.metric, c.a.label, c.b.label, *numbers, c.test, c.docs])


def write_html(report: Report, out: Path) -> None:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("medmerge.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    images = {f.file: base64.b64encode((out / f.file).read_bytes()).decode("ascii") for f in report.figures}
    html = environment.get_template("index.html.jinja").render(
        report=report,
        board=report.board,
        images=images,
        sections=column_sections(report.board),
        fmt=fmt,
        fmt_cell=fmt_cell,
        fmt_delta=fmt_delta,
        fmt_p=fmt_p,
        signed_delta=signed_delta,
        alpha=ALPHA,
        min_effect=MIN_EFFECT,
        legend=legend(report.board.std),
        parents_legend=PARENTS_LEGEND,
        matrix_legend=MATRIX_LEGEND,
    )
    (out / "index.html").write_text(html, encoding="utf-8")
