"""MoE build speed and memory: `medmerge moe` against mergekit 0.1.5's `mergekit-moe`, side by side.

    python benchmarks/moe_bench.py --mergekit-python /path/to/mergekit-venv/bin/python

Uses merge_bench.py's ~0.89B-parameter Mistral-shaped base and two "fine-tunes" (built once under --work; a small
BPE tokenizer is added to the base for the prompts) and builds a 2-expert Mixtral (~1.4B parameters, bf16) with
each gate mode that reads no random numbers: cheap_embed (token embeddings) and hidden (the base model runs the
prompts; medmerge also with --prompt-dtype float32). Each tool runs in a fresh process with its inputs in the
page cache; wall time and peak RSS come from /usr/bin/time. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merge_bench import build_models, timed  # noqa: E402

from medmerge.tiny import CORPUS, build_tokenizer  # noqa: E402


def configs(d: dict[str, Path]) -> dict[str, dict]:
    experts = [
        {"source_model": str(d["ft1"]), "positive_prompts": CORPUS[2:5]},
        {"source_model": str(d["ft2"]), "positive_prompts": CORPUS[5:7], "negative_prompts": CORPUS[:1]},
    ]
    return {
        mode: {"base_model": str(d["base"]), "gate_mode": mode, "dtype": "bfloat16", "experts": experts}
        for mode in ("cheap_embed", "hidden")
    }


# (row, gate mode, medmerge's extra options): mergekit-moe runs the prompts in bfloat16 only
RUNS = [
    ("cheap_embed", "cheap_embed", []),
    ("hidden", "hidden", []),
    ("hidden, float32 prompts", "hidden", ["--prompt-dtype", "float32"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_work")
    parser.add_argument(
        "--mergekit-python",
        default=os.environ.get("MEDMERGE_MERGEKIT_PYTHON"),
        help="python of a venv with mergekit 0.1.5 (omit to time medmerge alone)",
    )
    parser.add_argument("--only", nargs="*", help="gate modes to run (default: all)")
    args = parser.parse_args()
    dirs = build_models(args.work)
    if not (dirs["base"] / "tokenizer.json").exists():
        build_tokenizer(dirs["base"])
    inputs = list(dirs.values())
    rows = []
    mergekit_runs: dict[str, tuple[float, float]] = {}
    for name, mode, options in RUNS:
        if args.only and mode not in args.only:
            continue
        path = args.work / f"moe_{mode}.yaml"
        path.write_text(yaml.safe_dump(configs(dirs)[mode], sort_keys=False))
        out = args.work / "out" / f"moe_{mode}"
        ours = timed(
            [sys.executable, "-m", "medmerge.cli", "moe", str(path), str(out / "medmerge"), "--overwrite", "--quiet"]
            + options,
            inputs,
        )
        theirs = mergekit_runs.get(mode, (None, None))
        if args.mergekit_python and mode not in mergekit_runs:
            shutil.rmtree(out / "mergekit", ignore_errors=True)
            exe = Path(args.mergekit_python).parent / "mergekit-moe"
            theirs = mergekit_runs[mode] = timed(
                [str(exe), str(path), str(out / "mergekit"), "--device", "cpu"], inputs
            )
        shutil.rmtree(out, ignore_errors=True)
        rows.append((name, *ours, *theirs))
        print(
            f"{name}: medmerge {ours[0]:.1f} s {ours[1]:.2f} GB"
            + (f" | mergekit-moe {theirs[0]:.1f} s {theirs[1]:.2f} GB" if theirs[0] else ""),
            flush=True,
        )
    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        "| gate_mode | medmerge wall | medmerge peak RSS | mergekit-moe wall | mergekit-moe peak RSS | time ratio "
        "| RSS ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, w, r, mw, mr in rows:
        theirs = f"{mw:.1f} s | {mr:.2f} GB | {w / mw:.2f} | {r / mr:.2f}" if mw else "- | - | - | -"
        print(f"| {name} | {w:.1f} s | {r:.2f} GB | {theirs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
