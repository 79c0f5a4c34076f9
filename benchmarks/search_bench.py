"""`medmerge search`'s per-trial overhead: merging into the loaded model against merge-to-disk + reload.

    python benchmarks/search_bench.py [--trials 3] [--work benchmarks/_work]

On merge_bench.py's ~0.89B-parameter Mistral-shaped models (base + two fine-tunes, bf16), for each recipe below
and several parameter points, times what a trial costs before lm-eval runs:
  * to disk: `run_merge` into a directory, then `AutoModelForCausalLM.from_pretrained` (bf16) — what a search
    that writes each candidate does;
  * in memory: `InPlaceMerge.merge` into one model loaded once (what `medmerge search` does), which recomputes
    only the tensors whose parameters changed; and the same with `cache_inputs` (the parents' tensors kept in
    memory after the first trial).
Evaluation itself is the same in both and is not timed. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import build_models  # noqa: E402


def recipes(dirs: dict[str, Path]) -> dict[str, list[dict]]:
    """Per case, the recipes of successive trials."""
    base, a, b = (str(dirs[n]) for n in ("base", "ft1", "ft2"))

    def ties(w: float, d: float) -> dict:
        half = {"weight": w, "density": d}
        return {
            "merge_method": "ties",
            "base_model": base,
            "dtype": "bfloat16",
            "models": [{"model": a, "parameters": half}, {"model": b, "parameters": half}],
        }

    def linear(w: float) -> dict:
        return {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "models": [{"model": a, "parameters": {"weight": w}}, {"model": b, "parameters": {"weight": 1 - w}}],
        }

    def slerp(t_attn: float) -> dict:  # only the attention's t is searched: the MLPs are merged once
        return {
            "merge_method": "slerp",
            "base_model": a,
            "dtype": "bfloat16",
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": [{"filter": "self_attn", "value": t_attn}, {"value": 0.5}]},
        }

    points = [0.3, 0.45, 0.6, 0.75]
    return {
        "linear (every tensor changes)": [linear(p) for p in points],
        "ties (every tensor changes)": [ties(p, 1 - p) for p in points],
        "slerp, attention t only": [slerp(p) for p in points],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(Path(__file__).resolve().parent / "_work"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from merge.inplace import InPlaceMerge
    from merge.recipe import Recipe
    from merge.run import run_merge

    work = Path(args.work)
    dirs = build_models(work)
    out = work / "search_trial"
    rows = []
    for case, trial_recipes in recipes(dirs).items():
        loaded = [Recipe.model_validate(r) for r in trial_recipes]
        disk = []
        for recipe in loaded[1:]:
            start = time.perf_counter()
            run_merge(recipe, out, overwrite=True)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
            disk.append(time.perf_counter() - start)
            del model
        run_merge(loaded[0], out, overwrite=True)  # the carrier
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        medians = []
        for cache in (False, True):
            merger = InPlaceMerge(loaded[0], model.state_dict(keep_vars=True), cache_inputs=cache)
            merger.merge(loaded[0])  # with cache_inputs, the first trial reads (and keeps) every input
            memory, recomputed = [], []
            for recipe in loaded[1:]:
                start = time.perf_counter()
                recomputed.append(merger.merge(recipe))
                memory.append(time.perf_counter() - start)
            merger.close()
            total = len(merger.outputs)
            del merger
            medians.append(statistics.median(memory))
        del model
        d, (m, c) = statistics.median(disk), medians
        rows.append((case, d, m, c, recomputed[0], total))
        print(f"{case}: to disk + reload {d:.2f} s, in memory {m:.2f} s, cached {c:.2f} s", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("\n| trial | to disk + reload | in memory | (less) | in memory, cache_inputs | (less) | tensors merged |")
    print("|---|---|---|---|---|---|---|")
    for case, d, m, c, changed, total in rows:
        print(f"| {case} | {d:.2f} s | {m:.2f} s | {d / m:.1f}x | {c:.2f} s | {d / c:.1f}x | {changed} of {total} |")


if __name__ == "__main__":
    main()
