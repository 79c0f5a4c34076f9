"""Merge speed and memory: medmerge against mergekit 0.1.5, side by side, on a ~0.89B-parameter model.

    python benchmarks/merge_bench.py --mergekit-python /path/to/mergekit-venv/bin/python

Builds (once, under --work) a synthetic Mistral-shaped checkpoint — hidden 2048, 16 layers, intermediate
5632, vocab 32000, bf16 — and two "fine-tunes" (base + small noise), then times linear, slerp (gradient
t), ties, dare_ties, breadcrumbs_ties and della (density 0.5, weight 0.5), model_stock, nearswap, nuslerp (per
row, about the base), multislerp, karcher, sce, ram, ramplus_tl and arcee_fusion with each tool in a fresh
process, reporting wall time and peak RSS (from /usr/bin/time). The page cache is warmed before every run so
both tools read the inputs from memory. First it times the I/O floor (the median of five runs of `io_floor.py`:
read the three models and write one with plain safetensors calls, no arithmetic) and reports every merge's time as
a multiple of it.
Prints a Markdown table for benchmarks/RESULTS.md; --only picks methods, --repeat N runs each tool N times per
method (alternating) and reports the median wall time and the largest peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

# BioMistral's published SLERP gradient, read from the recipe we ship rather than copied.
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "biomistral-instruct-slerp.yaml"
BIOMISTRAL_SLERP_T = yaml.safe_load(RECIPE.read_text())["parameters"]["t"]
SHAPE = {"hidden": 2048, "layers": 16, "intermediate": 5632, "vocab": 32000, "heads": 16, "kv_heads": 8}


def build_models(work: Path) -> dict[str, Path]:
    dirs = {n: work / n for n in ("base", "ft1", "ft2")}
    if all((d / "config.json").exists() for d in dirs.values()):
        return dirs
    h, i, v, L = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"], SHAPE["layers"]
    kv = SHAPE["kv_heads"] * (h // SHAPE["heads"])
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(L):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": L,
        "num_attention_heads": SHAPE["heads"],
        "num_key_value_heads": SHAPE["kv_heads"],
        "vocab_size": v,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    print(f"building 3 x {sum(torch.Size(s).numel() for s in shapes.values()) / 1e9:.2f}B-parameter models in {work}")
    for n, (name, d) in enumerate(dirs.items()):
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        noise = torch.Generator().manual_seed(n)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, shape in shapes.items():
            t = torch.randn(shape, generator=g) * 0.02
            if n:
                t += torch.randn(shape, generator=noise) * 0.002
            t = t.bfloat16()
            if size + t.numel() * 2 > 2e9:
                shards.append({})
                size = 0
            shards[-1][key] = t
            size += t.numel() * 2
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        weight_map = {}
        for f, shard in zip(files, shards):
            save_file(shard, d / f, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, f)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "config.json").write_text(json.dumps(config))
        print(f"  {name}: {len(files)} shards")
    return dirs


def recipes(d: dict[str, Path]) -> dict[str, dict]:
    base, ft1, ft2 = (str(d[k]) for k in ("base", "ft1", "ft2"))
    half = {"weight": 0.5, "density": 0.5}
    return {
        "linear": {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "models": [
                {"model": base, "parameters": {"weight": 0.4}},
                {"model": ft1, "parameters": {"weight": 0.3}},
                {"model": ft2, "parameters": {"weight": 0.3}},
            ],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "dtype": "bfloat16",
            "slices": [
                {
                    "sources": [
                        {"model": base, "layer_range": [0, SHAPE["layers"]]},
                        {"model": ft1, "layer_range": [0, SHAPE["layers"]]},
                    ]
                }
            ],
            "parameters": {"t": BIOMISTRAL_SLERP_T},
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "dtype": "bfloat16",
            "parameters": {"normalize": True},
            "models": [{"model": base}, {"model": ft1, "parameters": half}, {"model": ft2, "parameters": half}],
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": base,
            "dtype": "bfloat16",
            "parameters": {"int8_mask": True},
            "models": [{"model": base}, {"model": ft1, "parameters": half}, {"model": ft2, "parameters": half}],
        },
        **{
            method: {
                "merge_method": method,
                "base_model": base,
                "dtype": "bfloat16",
                "models": [{"model": base}, {"model": ft1, "parameters": half}, {"model": ft2, "parameters": half}],
            }
            for method in ("breadcrumbs_ties", "della")
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "dtype": "bfloat16",
            "models": [{"model": base}, {"model": ft1}, {"model": ft2}],
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "dtype": "bfloat16",
            "parameters": {"t": 0.001},
            "models": [{"model": base}, {"model": ft1}],
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "dtype": "bfloat16",
            "parameters": {"nuslerp_flatten": False},
            "models": [{"model": ft1, "parameters": {"weight": 0.6}}, {"model": ft2, "parameters": {"weight": 0.4}}],
        },
        "multislerp": {
            "merge_method": "multislerp",
            "dtype": "bfloat16",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, ft1, ft2)],
        },
        "karcher": {"merge_method": "karcher", "dtype": "bfloat16", "models": [{"model": m} for m in (base, ft1, ft2)]},
        **{
            method: {
                "merge_method": method,
                "base_model": base,
                "dtype": "bfloat16",
                "models": [{"model": base}, {"model": ft1}, {"model": ft2}],
            }
            for method in ("sce", "ram", "ramplus_tl")
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "dtype": "bfloat16",
            "out_dtype": "bfloat16",
            "models": [{"model": base}, {"model": ft1}],
        },
        # the literature methods mergekit 0.1.5 lacks: medmerge alone
        "lines": {
            "merge_method": "lines",
            "base_model": base,
            "dtype": "bfloat16",
            "models": [
                {"model": base},
                {"model": ft1, "parameters": {"weight": 1.0}},
                {"model": ft2, "parameters": {"weight": 1.0}},
            ],
        },
        **{
            method: {
                "merge_method": method,
                "base_model": base,
                "dtype": "bfloat16",
                "models": [{"model": base}, {"model": ft1}, {"model": ft2}],
            }
            for method in ("pcb", "widen")
        },
    }


MERGEKIT_LACKS = ("lines", "pcb", "widen")
FLOOR_RUNS = 5


def timed(cmd: list[str], inputs: list[Path]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of `cmd` in a fresh process, with its inputs in the page cache."""
    for d in inputs:
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
    rss_kb = int(re.findall(r"MAXRSS (\d+)", result.stderr)[-1])
    return wall, rss_kb / 1e6


def summary(runs: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """(median wall, largest peak RSS) of a tool's runs, (None, None) for none."""
    if not runs:
        return None, None
    return statistics.median(w for w, _ in runs), max(r for _, r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_work")
    parser.add_argument(
        "--mergekit-python",
        default=os.environ.get("MEDMERGE_MERGEKIT_PYTHON"),
        help="python of a venv with mergekit 0.1.5 (omit to time medmerge alone)",
    )
    parser.add_argument("--only", nargs="*", help="methods to run (default: all)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per tool and method, the two tools alternating; the median wall and the largest peak RSS are "
        "reported (single runs on a VM spread by 20-30%%)",
    )
    args = parser.parse_args()
    dirs = build_models(args.work)
    inputs = list(dirs.values())
    floor_out = args.work / "out" / "floor"
    floors = []
    for _ in range(FLOOR_RUNS):  # the write makes single runs spread widely (3.7-6.9 s in one hour): the median
        floors.append(
            timed(
                [sys.executable, str(Path(__file__).with_name("io_floor.py")), str(floor_out), *map(str, inputs)],
                inputs,
            )
        )
        shutil.rmtree(floor_out, ignore_errors=True)
    floor = sorted(floors)[len(floors) // 2]
    runs = ", ".join(f"{wall:.1f}" for wall, _ in floors)
    print(
        f"I/O floor (read 3 models, write 1, plain safetensors): {floor[0]:.1f} s, the median of {runs} s; "
        f"{floor[1]:.2f} GB",
        flush=True,
    )
    rows = []
    for name, recipe in recipes(dirs).items():
        if args.only and name not in args.only:
            continue
        path = args.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = args.work / "out" / name
        our_runs, their_runs = [], []
        for _ in range(args.repeat):
            cmd = [sys.executable, "-m", "medmerge.cli", "merge", str(path), str(out / "medmerge"), "--overwrite"]
            our_runs.append(timed([*cmd, "--quiet"], inputs))
            if args.mergekit_python and name not in MERGEKIT_LACKS:
                shutil.rmtree(out / "mergekit", ignore_errors=True)
                exe = Path(args.mergekit_python).parent / "mergekit-yaml"
                their_runs.append(timed([str(exe), str(path), str(out / "mergekit"), "--allow-crimes"], inputs))
            shutil.rmtree(out, ignore_errors=True)
        ours, theirs = summary(our_runs), summary(their_runs)
        rows.append((name, *ours, *theirs))
        print(
            f"{name}: medmerge {ours[0]:.1f} s {ours[1]:.2f} GB"
            + (f" | mergekit {theirs[0]:.1f} s {theirs[1]:.2f} GB" if theirs[0] else "")
            + (
                f" (runs: medmerge {', '.join(f'{w:.1f}' for w, _ in our_runs)}; "
                f"mergekit {', '.join(f'{w:.1f}' for w, _ in their_runs) or '-'})"
                if args.repeat > 1
                else ""
            ),
            flush=True,
        )
    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        "| method | medmerge wall | medmerge peak RSS | mergekit wall | mergekit peak RSS | time ratio | RSS ratio "
        "| medmerge / I/O floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(f"| I/O floor | {floor[0]:.1f} s | {floor[1]:.2f} GB | - | - | - | - | 1.00 |")
    for name, w, r, mw, mr in rows:
        theirs = f"{mw:.1f} s | {mr:.2f} GB | {w / mw:.2f} | {r / mr:.2f}" if mw else "- | - | - | -"
        print(f"| {name} | {w:.1f} s | {r:.2f} GB | {theirs} | {w / floor[0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
