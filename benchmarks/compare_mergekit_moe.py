"""Compare `medmerge moe` with mergekit 0.1.5's `mergekit-moe` on the same configs and small models.

    python benchmarks/compare_mergekit_moe.py --mergekit-python /path/to/mergekit-venv/bin/python

Builds tiny Mistral (bf16), Llama (float32, tied embeddings), Qwen2 and Qwen3 (bf16) bases with two perturbed
"fine-tunes" each, builds every config below with both tools and loads both outputs with transformers'
AutoModelForCausalLM, which is how a user meets them. The tensor layouts differ on disk (medmerge writes the
published checkpoints' per-expert tensors; mergekit 0.1.5 writes Mixtral and Qwen3 experts fused), so the
models' state dicts are compared, element by element, with the configs (all keys) and the logits of a prompt.
Only the deterministic gate modes are compared: `random` and `uniform_random` draw from a generator.

Exit status 1 if any element, config key or logit differs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmerge.tiny import build_model, build_tokenizer, perturbed_copy  # noqa: E402
from merge.moe.build import build_moe  # noqa: E402

FAMILIES = {"mistral": torch.bfloat16, "llama": torch.float32, "qwen2": torch.bfloat16, "qwen3": torch.bfloat16}
MEDICAL = ["The heart pumps blood through the arteries", "insulin is produced by the beta cells of the pancreas"]
EXAM = ["Question: Options: A. B. C. D. E. [INST] Solve this Multiple Choice Question [/INST] Answer:"]


def configs(models: dict[str, dict[str, str]]) -> dict[str, dict]:
    """name -> mergekit-moe config over the families' base / ft1 / ft2 directories."""

    def experts(family: str, **extra: object) -> list[dict]:
        m = models[family]
        return [
            {"source_model": m["ft1"], "positive_prompts": MEDICAL, "negative_prompts": ["anatomy genetics"], **extra},
            {"source_model": m["ft2"], "positive_prompts": EXAM},
        ]

    mistral, llama = models["mistral"], models["llama"]
    return {
        "mixtral_hidden": {
            "base_model": mistral["base"],
            "experts": experts("mistral", residual_scale=0.5),
            "dtype": "bfloat16",
        },
        "mixtral_hidden_avg": {"base_model": mistral["base"], "gate_mode": "hidden_avg", "experts": experts("mistral")},
        "mixtral_cheap_embed_fp16": {
            "base_model": mistral["base"],
            "gate_mode": "cheap_embed",
            "dtype": "float16",
            "experts": experts("mistral"),
        },
        "mixtral_three_top1": {
            "base_model": mistral["base"],
            "gate_mode": "hidden_last",
            "experts_per_token": 1,
            "experts": [*experts("mistral"), {"source_model": mistral["base"], "positive_prompts": ["nutrition"]}],
        },
        "mixtral_llama_fp32_tied": {"base_model": llama["base"], "gate_mode": "hidden", "experts": experts("llama")},
        "qwen_moe_shared": {
            "base_model": models["qwen2"]["base"],
            "experts": experts("qwen2"),
            "shared_experts": [{"source_model": models["qwen2"]["base"], "positive_prompts": ["medicine"]}],
        },
        "qwen_moe_from_mistral": {
            "base_model": mistral["base"],
            "architecture": "qwen",
            "gate_mode": "cheap_embed",
            "experts": experts("mistral"),
            "shared_experts": [
                {"source_model": mistral["ft1"], "positive_prompts": ["medicine"], "residual_scale": 2.0}
            ],
        },
        "qwen3_moe": {"base_model": models["qwen3"]["base"], "experts": experts("qwen3")},
    }


@dataclass
class Outcome:
    name: str
    tensors: int
    elements: int
    differing: int
    config_differences: list[str]
    logits_equal: bool

    @property
    def ok(self) -> bool:
        return self.differing == 0 and not self.config_differences and self.logits_equal


def build_models(work: Path, hidden: int) -> dict[str, dict[str, str]]:
    build_tokenizer(work / "tokenizer")
    out = {}
    for family, dtype in FAMILIES.items():
        dirs = {name: work / family / name for name in ("base", "ft1", "ft2")}
        if not (dirs["ft2"] / "config.json").exists():
            build_model(
                dirs["base"],
                work / "tokenizer",
                arch=family,
                layers=3,
                hidden=hidden,
                intermediate=2 * hidden,
                dtype=dtype,
                tie_embeddings=family == "llama",
            )
            perturbed_copy(dirs["base"], dirs["ft1"], 0.05, seed=1)
            perturbed_copy(dirs["base"], dirs["ft2"], 0.05, seed=2)
        out[family] = {name: str(path) for name, path in dirs.items()}
    return out


def compare(name: str, ours: Path, theirs: Path) -> Outcome:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(ours), dtype="auto")
    b = AutoModelForCausalLM.from_pretrained(str(theirs), dtype="auto")
    sa, sb = a.state_dict(), b.state_dict()
    differing = sum(
        sa[k].numel() if k not in sb or sa[k].dtype != sb[k].dtype else int((sa[k] != sb[k]).sum()) for k in sa
    ) + sum(sb[k].numel() for k in sb if k not in sa)
    ca, cb = a.config.to_dict(), b.config.to_dict()
    config_differences = sorted(k for k in set(ca) | set(cb) if k != "_name_or_path" and ca.get(k) != cb.get(k))
    ids = torch.tensor([[1, 5, 9, 30, 40, 77]])
    with torch.no_grad():
        logits_equal = torch.equal(a(ids).logits, b(ids).logits)
    return Outcome(name, len(sa), sum(t.numel() for t in sa.values()), differing, config_differences, logits_equal)


def run_comparison(
    mergekit_python: Path, work: Path | None, hidden: int = 64, only: list[str] | None = None
) -> list[Outcome]:
    work = work or Path(tempfile.mkdtemp(prefix="medmerge-moe-vs-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, hidden)
    outcomes = []
    for name, config in configs(models).items():
        if only and name not in only:
            continue
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        ours, theirs = work / "out" / name / "medmerge", work / "out" / name / "mergekit"
        shutil.rmtree(theirs, ignore_errors=True)
        build_moe(path, ours, overwrite=True)
        subprocess.run(
            [str(mergekit_python.parent / "mergekit-moe"), str(path), str(theirs)], check=True, capture_output=True
        )
        outcomes.append(compare(name, ours, theirs))
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mergekit-python",
        default=os.environ.get("MEDMERGE_MERGEKIT_PYTHON"),
        help="python of a venv with mergekit 0.1.5 installed ($MEDMERGE_MERGEKIT_PYTHON)",
    )
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--only", nargs="*", help="config names to run")
    args = parser.parse_args()
    if not args.mergekit_python:
        parser.error("give --mergekit-python or set MEDMERGE_MERGEKIT_PYTHON")
    outcomes = run_comparison(Path(args.mergekit_python), args.work, args.hidden, args.only)
    print(f"{'config':26} {'tensors':>7} {'elements':>9} {'differ':>6} {'logits':>6}  config keys that differ")
    for o in outcomes:
        print(
            f"{o.name:26} {o.tensors:7d} {o.elements:9d} {o.differing:6d} {'equal' if o.logits_equal else 'DIFF':>6}"
            f"  {', '.join(o.config_differences) or '-'}  {'ok' if o.ok else 'DIFFERENT'}"
        )
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
