"""Paired tests between every two rows of a leaderboard, on the documents both were scored on (`--log_samples`).

A task column with one run per model and 0/1 scores (acc, mc1) gets McNemar's exact test. Continuous scores
(mc2), models folded over several runs (per-document mean over the runs) and group columns (one stratum per
task, weighted as lm-eval weighted the group's value) get a paired bootstrap. Documents are matched by doc_id and
must be the same document (its content, less the few-shot prompt a BioInstructQA doc carries), so runs on
different data never pair up silently while the three shot sets do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medmerge.report.results import Run, newest_per_seed
from medmerge.report.stats import holm, mcnemar_exact, paired_bootstrap
from medmerge.report.table import Column, Leaderboard, Row

Scores = tuple[dict[int, float], dict[int, str], int]  # doc -> score, doc -> doc_hash, runs folded


@dataclass
class Comparison:
    column: Column
    a: Row
    b: Row
    delta: float  # a - b on the paired documents (group: weighted over its tasks)
    p: float
    test: str
    docs: int
    p_holm: float = 1.0  # adjusted over all pairs of the same column

    def better(self, alpha: float = 0.05, min_effect: float = 0.0) -> Row | None:
        """The significantly better row at level alpha, if any; a difference below `min_effect` never is."""
        if self.p >= alpha or self.delta == 0 or abs(self.delta) < min_effect:
            return None
        a_better = self.delta > 0 if self.column.higher_is_better else self.delta < 0
        return self.a if a_better else self.b


def _row_scores(row: Row, task: str, metric: str) -> Scores | None:
    runs, _ = newest_per_seed(row.runs, lambda r: metric in r.samples.get(task, {}))
    if not runs:
        return None
    docs = set.intersection(*(set(r.samples[task][metric]) for r in runs))
    hashes = runs[-1].doc_hashes.get(task, {})
    docs = {d for d in docs if all(r.doc_hashes.get(task, {}).get(d) == hashes.get(d) for r in runs)}
    scores = {d: sum(r.samples[task][metric][d] for r in runs) / len(runs) for d in sorted(docs)}
    return scores, hashes, len(runs)


def _pair(x: Scores, y: Scores) -> tuple[list[float], list[float]]:
    docs = [d for d in x[0] if d in y[0] and x[1].get(d) == y[1].get(d)]
    return [x[0][d] for d in docs], [y[0][d] for d in docs]


def _group_weights(run: Run, group: str, metric: str, tasks: list[str]) -> set[str] | None:
    """Which of 'equal' and 'size' weights reproduce the group value lm-eval wrote from its tasks' values
    (both, where the tasks' values make them agree); None where the run lacks what it takes to tell."""
    value = run.metrics.get(group, {}).get(metric)
    leaves = [run.metrics.get(t, {}).get(metric) for t in tasks]
    sizes = [len(run.samples.get(t, {}).get(metric, {})) for t in tasks]
    if value is None or any(v is None for v in leaves) or not all(sizes):
        return None
    values = [v.value for v in leaves if v is not None]
    candidates = {
        "equal": sum(values) / len(values),
        "size": sum(n * v for n, v in zip(sizes, values, strict=True)) / sum(sizes),
    }
    return {kind for kind, mean in candidates.items() if abs(value.value - mean) < 1e-9}


def compare(
    board: Leaderboard, iterations: int = 10_000, seed: int = 0, progress: Callable[[str], None] | None = None
) -> tuple[list[Comparison], list[str]]:
    """Every pair of rows on every column that has per-sample logs; notes say which columns got no test."""
    comparisons: list[Comparison] = []
    notes: list[str] = []
    for column in board.columns:
        if progress:
            progress(column.label)
        tasks = board.group_subtasks.get(column.task, []) if column.is_group else [column.task]
        if column.is_group and any(t in board.group_subtasks for t in tasks):
            notes.append(f"{column.label}: a group of groups, no group-level test")
            continue
        scores: dict[int, dict[str, Scores]] = {}
        for i, row in enumerate(board.rows):
            if column not in row.cells:  # samples logged, but no value in the results file: nothing to compare
                continue
            found = {t: s for t in tasks if (s := _row_scores(row, t, column.metric)) is not None}
            if len(found) == len(tasks):
                scores[i] = found
        weights, undecided = None, False
        if column.is_group:
            kinds = {"equal", "size"}
            for run in (r for i in scores for r in board.rows[i].runs):
                matching = _group_weights(run, column.task, column.metric, tasks)
                if matching is not None:  # None: this run cannot tell; an empty set: it matches neither weighting
                    kinds &= matching
            if not kinds:
                notes.append(f"{column.label}: group value not reproducible from its tasks, no group-level test")
                continue
            # One run whose values tell the two apart decides; where none does (say, all tasks at 0.0), the
            # observed means agree and equal weights (BioInstructQA's mean of tasks) are used.
            weights = "equal" if "equal" in kinds else "size"
            undecided = kinds == {"equal", "size"}
        found_pairs = []
        indices = sorted(scores)
        for n, i in enumerate(indices):
            for j in indices[n + 1 :]:
                strata = [_pair(scores[i][t], scores[j][t]) for t in tasks]
                if any(not a for a, _ in strata):
                    continue
                docs = sum(len(a) for a, _ in strata)
                binary = all(v in (0.0, 1.0) for a, b in strata for v in (*a, *b))
                single = all(scores[k][t][2] == 1 for k in (i, j) for t in tasks)
                if not column.is_group and binary and single:
                    a, b = strata[0]
                    delta, p, test = (sum(a) - sum(b)) / len(a), mcnemar_exact(a, b), "McNemar exact"
                else:
                    w = [len(a) for a, _ in strata] if weights == "size" else None
                    if w is not None:
                        w = [n_docs / sum(w) for n_docs in w]
                    delta, p = paired_bootstrap(strata, w, iterations=iterations, seed=seed)
                    test = f"paired bootstrap ({iterations} resamples)"
                    if column.is_group:
                        kind = "size-weighted" if w else "equally weighted"
                        if undecided:  # every run's group value fits both weightings (e.g. tasks of equal size)
                            kind += ": the runs' group values fit either weighting, so the mean of tasks is used"
                        test = f"paired bootstrap ({iterations} resamples, {len(strata)} tasks {kind})"
                found_pairs.append(Comparison(column, board.rows[i], board.rows[j], delta, p, test, docs))
        for comparison, adjusted in zip(found_pairs, holm([c.p for c in found_pairs]), strict=True):
            comparison.p_holm = adjusted
        comparisons += found_pairs
    return comparisons, notes
