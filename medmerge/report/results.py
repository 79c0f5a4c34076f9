"""Reading lm-eval's output: `results_<date>.json` files and, beside them, `samples_<task>_<date>.jsonl`.

Tolerant by design: a file that is not an lm-eval results file is skipped and named, never fatal. Metric keys
stay as lm-eval writes them (`acc,none`, `exact_match,strict-match`); `display_metric` makes them readable.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmerge_common.errors import UserError

# lm-eval names its files results_<date_id>.json and samples_<task>_<date_id>.jsonl (same date_id).
DATE_ID = re.compile(r"_(\d{4}-\d{2}-\d{2}T[0-9\-.]+)$")
NOT_METRICS = {"alias", "name", "sample_len", "sample_count", "samples"}
# Fields of a doc that carry the few-shot prompts (BioInstructQA builds each shot set's prompts into the doc; "prompt"
# in results written before `prompts`): left out of a document's identity, so shot sets pair up on the same question
# while other data never does.
PROMPT_FIELDS = {"prompts", "prompt"}


@dataclass
class Measure:
    value: float
    stderr: float | None


@dataclass
class Run:
    """One lm-eval invocation for one model (one results file)."""

    path: Path
    model: str  # what lm-eval calls the model: pretrained=... (hub id or directory)
    date: float
    variant: tuple[tuple[str, str], ...]  # settings that make runs incomparable (shots, chat template, ...)
    metrics: dict[str, dict[str, Measure]]  # task -> metric key -> measure
    seed: tuple[Any, ...]  # what distinguishes repeated runs: BioInstructQA shot set, lm-eval's few-shot seed
    group_subtasks: dict[str, list[str]]
    higher_is_better: dict[str, dict[str, bool]]
    samples: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)  # task -> metric -> doc -> value
    doc_hashes: dict[str, dict[int, str]] = field(default_factory=dict)  # task -> doc -> identity of the doc


def newest_per_seed(runs: list[Run], has: Callable[[Run], bool]) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """Of `runs` (oldest first), those for which `has` holds, one per seed: a rerun with the same seed replaces the
    earlier run. Also returns the (replaced, replacing) pairs."""
    chosen: dict[tuple[Any, ...], Run] = {}
    replaced: list[tuple[Run, Run]] = []
    for run in runs:
        if has(run):
            if run.seed in chosen:
                replaced.append((chosen[run.seed], run))
            chosen[run.seed] = run
    return list(chosen.values()), replaced


def display_metric(key: str) -> str:
    """'acc,none' -> 'acc'; 'exact_match,strict-match' -> 'exact_match (strict-match)'."""
    name, _, filter_name = key.partition(",")
    return name if filter_name in ("", "none") else f"{name} ({filter_name})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _task_metrics(entry: dict[str, Any]) -> dict[str, Measure]:
    out: dict[str, Measure] = {}
    for key, value in entry.items():
        name, _, filter_name = key.partition(",")
        if name in NOT_METRICS or name.endswith("_stderr") or _number(value) is None:
            continue
        stderr = _number(entry.get(f"{name}_stderr,{filter_name}" if filter_name else f"{name}_stderr"))
        out[key] = Measure(float(value), stderr if stderr is not None and stderr >= 0 else None)
    return out


def _shots(data: dict[str, Any], task: str) -> Any:
    """Shots as the prompt really has them: lm-eval's n-shot (our fixed-shot tasks set it to the shots in their
    prompts); results written before that carry BioInstructQA's shots as metadata.shots, with n-shot 0."""
    metadata = (data.get("configs", {}).get(task) or {}).get("metadata") or {}
    return metadata.get("shots", data.get("n-shot", {}).get(task))


def parse_results(path: Path, data: dict[str, Any]) -> Run:
    """A Run from a loaded results file; raises ValueError where it is not lm-eval's format."""
    results = data.get("results")
    if not isinstance(results, dict) or not results or not all(isinstance(v, dict) for v in results.values()):
        raise ValueError("no lm-eval 'results' table")
    if not isinstance(data.get("config"), dict) and not isinstance(data.get("configs"), dict):
        raise ValueError("no lm-eval 'config'")
    config = data.get("config") or {}
    model_args = config.get("model_args") or {}
    if isinstance(model_args, str):
        model_args = dict(p.split("=", 1) for p in model_args.split(",") if "=" in p)
    model = data.get("model_name") or model_args.get("pretrained") or config.get("model")
    if not model:
        raise ValueError("names no model")
    metrics = {task: _task_metrics(entry) for task, entry in results.items()}
    for task, entry in (data.get("groups") or {}).items():
        metrics[task] = {**metrics.get(task, {}), **_task_metrics(entry)}
    metrics = {task: m for task, m in metrics.items() if m}
    if not metrics:
        raise ValueError("no numeric metrics")
    leaves = [t for t in metrics if t not in (data.get("group_subtasks") or {})]
    shots = sorted({str(s) for s in (_shots(data, t) for t in leaves) if s is not None})
    variant = [("shots", "/".join(shots))] if shots else []
    for key in ("chat_template_sha", "system_instruction_sha"):
        if data.get(key):
            variant.append((key.split("_sha")[0], str(data[key])[:8]))
    if data.get("fewshot_as_multiturn"):
        variant.append(("multiturn", "yes"))
    configs = (data.get("configs") or {}).values()
    shot_sets = sorted({str(((c or {}).get("metadata") or {}).get("fewshot_set")) for c in configs})
    fewshot_seed = config.get("fewshot_seed")
    if not isinstance(fewshot_seed, (int, str, type(None))):
        raise ValueError("config.fewshot_seed is not a number")
    seed = ("/".join(shot_sets), fewshot_seed)
    group_subtasks = data.get("group_subtasks") or {}
    if not isinstance(group_subtasks, dict) or not all(
        isinstance(members, list) and all(isinstance(m, str) for m in members) for members in group_subtasks.values()
    ):
        raise ValueError("group_subtasks is not a map of groups to task names")
    higher = {
        task: {k: bool(v) for k, v in (data.get("higher_is_better", {}).get(task) or {}).items()} for task in metrics
    }
    return Run(
        path=path,
        model=str(model),
        date=float(data.get("date") or path.stat().st_mtime),
        variant=tuple(variant),
        metrics=metrics,
        seed=seed,
        group_subtasks={g: list(s) for g, s in group_subtasks.items()},
        higher_is_better=higher,
    )


def _doc_identity(sample: dict[str, Any]) -> str:
    doc = sample.get("doc")
    if not isinstance(doc, dict):
        return str(sample.get("doc_hash", ""))
    kept = {k: v for k, v in doc.items() if k not in PROMPT_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def read_samples(run: Run, warnings: list[str]) -> None:
    """Fill run.samples from the samples_<task>_<date>.jsonl files written beside its results file."""
    match = DATE_ID.search(run.path.stem)
    if not match:
        return
    date_id = match.group(1)
    for sample_file in sorted(run.path.parent.glob(f"samples_*_{date_id}.jsonl")):
        task = sample_file.name[len("samples_") : -len(f"_{date_id}.jsonl")]
        values: dict[str, dict[int, float]] = {}
        hashes: dict[int, str] = {}
        bad_lines: list[int] = []
        try:
            with sample_file.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:  # one bad line (a run killed mid-write leaves a truncated last line) costs that line only
                        sample = json.loads(line)
                        doc = int(sample["doc_id"])
                        identity = _doc_identity(sample)
                        filter_name = str(sample.get("filter", "none"))
                        scores = {metric: _number(sample.get(metric)) for metric in sample.get("metrics", [])}
                    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
                        bad_lines.append(number)
                        continue
                    hashes[doc] = identity
                    for metric, value in scores.items():
                        if value is not None:
                            values.setdefault(f"{metric},{filter_name}", {})[doc] = value
        except (OSError, UnicodeDecodeError) as exc:
            warnings.append(f"{sample_file}: skipped, cannot be read ({type(exc).__name__}: {exc})")
            continue
        if bad_lines:
            more = f" and {len(bad_lines) - 1} more" if len(bad_lines) > 1 else ""
            warnings.append(f"{sample_file}:{bad_lines[0]}{more}: not an lm-eval sample, skipped (kept the others)")
        if not hashes:
            continue
        run.samples[task] = values
        run.doc_hashes[task] = hashes


def find_result_files(inputs: list[str | Path]) -> list[Path]:
    """Every JSON file named by `inputs` (files, or directories searched recursively), in a stable order. Hidden
    files and directories below an input directory are passed over: they are staging directories of runs in
    progress or killed (`.shotset1.partial-...`), never finished results."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*.json")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    return list(dict.fromkeys(files))


def read_runs(inputs: list[str | Path], with_samples: bool = True) -> tuple[list[Run], list[str]]:
    """All lm-eval runs under `inputs`, and one warning line per file skipped."""
    runs: list[Run] = []
    warnings: list[str] = []
    for path in find_result_files(inputs):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            run = parse_results(path, data)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
            warnings.append(f"{path}: skipped, not an lm-eval results file ({exc})")
            continue
        if with_samples:
            read_samples(run, warnings)
        runs.append(run)
    return runs, warnings
