"""Time `medmerge report` at the size of BioMistral's study: lm-eval outputs in their real layout.

Six models x BioInstructQA's three shot sets, every task at its real test size (8,318 documents), each run with
its --log_samples files, plus TruthfulQA-health (99 questions, plain and truthful prompt) once per model. Scores
are drawn at random per model; what is measured is reading, folding, 2 x 15 x 42 paired tests, figures, HTML.

    python benchmarks/report_bench.py [--work DIR] [--bootstrap 10000]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from medmerge.report import build_report
from medmerge_tasks.corpora import BIOINSTRUCTQA_CORPORA

SIZES = {  # BioInstructQA test sizes (shared/README.md)
    "mmlu_clinical_knowledge": 265,
    "mmlu_medical_genetics": 100,
    "mmlu_anatomy": 135,
    "mmlu_professional_medicine": 272,
    "mmlu_college_biology": 144,
    "mmlu_college_medicine": 173,
    "medqa_4options": 1273,
    "medqa_5options": 1273,
    "medmcqa": 4183,
    "pubmedqa": 500,
}
TRUTHFULQA = {"health": 55, "nutrition": 16, "psychology": 19, "science": 9}
MODELS = ["BioMistral/BioMistral-7B", "mistralai/Mistral-7B-Instruct-v0.1", "slerp", "ties", "dare_ties", "base"]


def write_run(out: Path, model: str, leaves: dict[str, np.ndarray], groups: dict[str, list[str]], meta: dict) -> None:
    """One lm-eval output directory: results_<date>.json + samples_<task>_<date>.jsonl, as its tracker writes."""
    date = f"2026-11-23T10-00-{len(list(out.parent.glob('*'))):02d}.000000"
    directory = out / model.replace("/", "__")
    directory.mkdir(parents=True)
    results, configs = {}, {}
    for task, scores in leaves.items():
        metric = "mc2" if scores.dtype == np.float64 and not np.isin(scores, (0, 1)).all() else "acc"
        mean = float(scores.mean())
        results[task] = {
            "alias": task,
            f"{metric},none": mean,
            f"{metric}_stderr,none": float(scores.std() / len(scores) ** 0.5),
        }
        configs[task] = {"metadata": meta}
        with (directory / f"samples_{task}_{date}.jsonl").open("w") as f:
            for i, s in enumerate(scores):
                doc = {"id": f"{task}-{i}", "question": f"question {i} of {task}", "prompt": f"shots {meta}"}
                f.write(
                    json.dumps({"doc_id": i, "doc": doc, "filter": "none", "metrics": [metric], metric: float(s)})
                    + "\n"
                )
    for group, members in groups.items():
        metric = next(k for k in results[members[0]] if k.endswith(",none") and "_stderr" not in k)
        results[group] = {metric: float(np.mean([results[m][metric] for m in members]))}
    data = {
        "results": results,
        "group_subtasks": groups,
        "configs": configs,
        "config": {"model": "hf", "model_args": {"pretrained": model}, "fewshot_seed": 1234},
        "model_name": model,
        "date": time.time(),
    }
    (directory / f"results_{date}.json").write_text(json.dumps(data))


def build_inputs(root: Path) -> None:
    rng = np.random.default_rng(0)
    bio = {f"medmerge_{s}": n for s, n in SIZES.items()}
    assert set(bio) == {f"medmerge_{s}" for s, _ in BIOINSTRUCTQA_CORPORA.values()}
    for m, model in enumerate(MODELS):
        skill = 0.45 + 0.02 * m
        for shot_set in (1, 2, 3):
            leaves = {t: (rng.random(n) < skill).astype(np.float64) for t, n in bio.items()}
            write_run(
                root / f"{m}-bio-{shot_set}",
                model,
                leaves,
                {"medmerge_bioinstructqa": list(bio)},
                {"fewshot_set": shot_set, "shots": 3},
            )
        for prompt in ("medmerge_truthfulqa_health", "medmerge_truthfulqa_health_truthful"):
            leaves = {f"{prompt}_{c}": rng.beta(2 + m * 0.1, 2, n) for c, n in TRUTHFULQA.items()}
            write_run(root / f"{m}-{prompt}", model, leaves, {prompt: list(leaves)}, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="where to write the inputs and the report (default: a temp dir)")
    parser.add_argument("--bootstrap", type=int, default=10_000)
    args = parser.parse_args()
    root = args.work or Path(tempfile.mkdtemp(prefix="report_bench_"))
    shutil.rmtree(root / "inputs", ignore_errors=True)
    start = time.perf_counter()
    build_inputs(root / "inputs")
    size = sum(p.stat().st_size for p in (root / "inputs").rglob("*")) / 1e6
    print(
        f"inputs: {len(list((root / 'inputs').rglob('results_*.json')))} runs, {size:.0f} MB, "
        f"written in {time.perf_counter() - start:.1f} s"
    )
    start = time.perf_counter()
    build_report([root / "inputs"], root / "report", bootstrap=args.bootstrap)
    seconds = time.perf_counter() - start
    tests = sum(1 for _ in (root / "report" / "pairwise.csv").open()) - 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(
        f"report: {seconds:.1f} s, {tests} paired tests ({args.bootstrap} bootstrap resamples), peak RSS {peak:.2f} GB"
    )


if __name__ == "__main__":
    main()
