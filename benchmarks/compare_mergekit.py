"""Compare medmerge's merges with mergekit 0.1.5's on the same recipes and inputs, tensor by tensor.

    python benchmarks/compare_mergekit.py --mergekit-python /path/to/mergekit-venv/bin/python

mergekit must live in its own virtual environment (it pins other versions of our dependencies); point
`--mergekit-python` (or $MEDMERGE_MERGEKIT_PYTHON) at that venv's python. The script builds small
Mistral-shaped models (a base and two perturbed "fine-tunes"), runs every recipe through both tools and
reports, per recipe, how many output elements differ. A difference is *explained* only when it is one
known, documented divergence:

  * TIES magnitude trim: entries whose |delta| equals the k-th largest |delta| of some model. mergekit
    chooses among such equal-magnitude entries with an unstable argsort (an arbitrary subset); medmerge
    keeps the lowest flat indices. Same count kept, possibly other positions.
  * Model Breadcrumbs: the same at either edge of the kept magnitude band (entries whose |delta| equals the
    magnitude just inside or outside the band's lower or upper edge).

  * Padding rows of a vocabulary padded with `pad_to_multiple_of`: each is the mean of a model's rows, which
    mergekit sums in its token order; its ids for tokens new to the base change from run to run (set and
    hash-map order), so its sum order does too. They must agree to float rounding.

Vocabulary tensors of recipes that set `tokenizer_source` / `tokenizer` are compared token by token (mergekit's
rows put in our token order), after checking that both tools' output vocabularies hold the same tokens.

Random methods (DARE, DELLA at density < 1) cannot agree element by element with another generator; for them
the script compares what the papers define, over the whole model: the share of entries the merge changes (the
keep rate) and the L1 norm of the merged task vector (the rescale), which must agree within 1 point and 2%.

Exit status 1 if any difference is unexplained or a random method's statistics disagree.
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
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmerge.tiny import build_lora, build_model, build_tokenizer, perturbed_copy  # noqa: E402
from merge.recipe import DTYPES  # noqa: E402
from merge.run import run_merge  # noqa: E402


def recipes(base: str, ft1: str, ft2: str, adapter: str, other_vocab: str) -> dict[str, dict]:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "biomistral-instruct-slerp.yaml"
    slerp_t = yaml.safe_load(recipe.read_text())["parameters"]["t"]  # BioMistral's published gradient
    three = [
        {"model": base, "parameters": {"weight": 0.5}},
        {"model": ft1, "parameters": {"weight": 0.3}},
        {"model": ft2, "parameters": {"weight": 0.2}},
    ]
    two_ft = [
        {"model": base},
        {"model": ft1, "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": ft2, "parameters": {"weight": 0.3, "density": 0.7}},
    ]
    with_base = [{"model": base}, {"model": ft1}, {"model": ft2}]
    weighted_ft = [{"model": ft1, "parameters": {"weight": 0.7}}, {"model": ft2, "parameters": {"weight": 0.4}}]
    layers = 4
    return {
        "linear": {"merge_method": "linear", "models": three, "dtype": "bfloat16"},
        "linear_unnormalized_fp32": {
            "merge_method": "linear",
            "models": three,
            "parameters": {"normalize": False},
            "dtype": "float32",
        },
        "slerp_gradient": {
            "merge_method": "slerp",
            "base_model": base,
            "dtype": "bfloat16",
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, layers]}, {"model": ft1, "layer_range": [0, layers]}]}
            ],
            "parameters": {"t": slerp_t},
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": two_ft,
            "parameters": {"lambda": 0.8, "normalize": True},
            "dtype": "bfloat16",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": two_ft,
            "parameters": {"normalize": True, "int8_mask": True},
            "dtype": "bfloat16",
        },
        "ties_fp32_lambda": {
            "merge_method": "ties",
            "base_model": base,
            "models": two_ft,
            "parameters": {"normalize": False, "lambda": 1.5},
            "dtype": "float32",
        },
        "dare_ties_density1": {
            "merge_method": "dare_ties",
            "base_model": base,
            "dtype": "bfloat16",
            "models": [
                {"model": base},
                {"model": ft1, "parameters": {"weight": 0.6}},
                {"model": ft2, "parameters": {"weight": 0.4}},
            ],
        },
        "dare_linear_density1": {
            "merge_method": "dare_linear",
            "base_model": base,
            "dtype": "bfloat16",
            "models": [{"model": ft1, "parameters": {"weight": 0.6}}, {"model": ft2, "parameters": {"weight": 0.4}}],
            "parameters": {"normalize": True},
        },
        "passthrough_stack": {
            "merge_method": "passthrough",
            "dtype": "bfloat16",
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 3]}]},
                {"sources": [{"model": ft1, "layer_range": [1, 4]}]},
            ],
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": ft1, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}},
                {"model": ft2, "parameters": {"weight": 0.3, "density": 0.8}},
            ],
            "dtype": "bfloat16",
        },
        "breadcrumbs_ties_fp32": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": two_ft,
            "parameters": {"normalize": True, "gamma": 0.02},
            "dtype": "float32",
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": base}, {"model": ft1}],
            "parameters": {"t": 0.02},
            "dtype": "bfloat16",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": with_base,
            "dtype": "bfloat16",
        },
        "model_stock_filter_wise_fp32": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": with_base,
            "parameters": {"filter_wise": True},
            "dtype": "float32",
        },
        "della_density1": {
            "merge_method": "della",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": ft1, "parameters": {"weight": 0.6}},
                {"model": ft2, "parameters": {"weight": 0.4}},
            ],
            "dtype": "bfloat16",
        },
        "ties_out_fp16": {
            "merge_method": "ties",
            "base_model": base,
            "models": two_ft,
            "dtype": "float32",
            "out_dtype": "float16",
        },
        "nuslerp_flatten": {
            "merge_method": "nuslerp",
            "models": weighted_ft,
            "dtype": "bfloat16",
        },
        "nuslerp_rows_base_fp32": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": weighted_ft,
            "parameters": {"nuslerp_flatten": False},
            "dtype": "float32",
        },
        "nuslerp_columns_base": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": weighted_ft,
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            "dtype": "bfloat16",
        },
        "multislerp_three": {
            "merge_method": "multislerp",
            "models": three,
            "dtype": "bfloat16",
        },
        "multislerp_base_fp32": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": weighted_ft,
            "parameters": {"normalize_weights": False},
            "dtype": "float32",
        },
        "karcher": {
            "merge_method": "karcher",
            "models": with_base,
            "dtype": "bfloat16",
        },
        "karcher_fp32_iter3": {
            "merge_method": "karcher",
            "models": [{"model": ft1}, {"model": ft2}],
            "parameters": {"max_iter": 3, "tol": 1e-7},
            "dtype": "float32",
        },
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "models": with_base,
            "dtype": "bfloat16",
        },
        "sce_topk_fp32": {
            "merge_method": "sce",
            "base_model": base,
            "models": with_base,
            "parameters": {"select_topk": 0.3},
            "dtype": "float32",
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": with_base,
            "parameters": {"epsilon": 0.03},
            "dtype": "bfloat16",
        },
        "ramplus_tl_fp32": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": with_base,
            "parameters": {"epsilon": 0.03, "r": 0.5, "alpha": 0.4},
            "dtype": "float32",
        },
        "ramplus_tl_bf16": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": with_base,
            "parameters": {"epsilon": 0.03},
            "dtype": "bfloat16",
            "out_dtype": "bfloat16",  # as for arcee_fusion: mergekit's λ is float32, so it would write float32
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": base}, {"model": ft1}],
            "dtype": "bfloat16",
            "out_dtype": "bfloat16",  # without it mergekit writes float32 (its mask is float32); medmerge bf16
        },
        "lora_passthrough": {"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]},
        "lora_ties_bf16": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": f"{ft1}+{adapter}", "parameters": {"weight": 0.5, "density": 1.0}},
                {"model": ft2, "parameters": {"weight": 0.3, "density": 1.0}},
            ],
            "dtype": "bfloat16",
        },
        "union_linear": {
            "merge_method": "linear",
            "models": [
                {"model": base, "parameters": {"weight": 0.6}},
                {"model": other_vocab, "parameters": {"weight": 0.4}},
            ],
            "tokenizer_source": "union",
            "dtype": "bfloat16",
        },
        "union_ties_tokens_padded_fp32": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": ft1, "parameters": {"weight": 0.5, "density": 1.0}},
                {"model": other_vocab, "parameters": {"weight": 0.5, "density": 1.0}},
            ],
            "tokenizer": {
                "source": "union",
                "pad_to_multiple_of": 64,
                "tokens": {
                    "<extra>": {"source": {"kind": "zero"}},
                    "<s>": {"source": {"kind": "model_token", "model": other_vocab, "token": "</s>"}, "force": True},
                    "Question": {"source": other_vocab, "force": True},
                },
            },
            "dtype": "float32",
        },
        "base_vocabulary_task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": ft1, "parameters": {"weight": 0.5}},
                {"model": other_vocab, "parameters": {"weight": 0.3}},
            ],
            "tokenizer_source": "base",
            "dtype": "bfloat16",
        },
    }


def random_recipes(base: str, ft1: str, ft2: str) -> dict[str, dict]:
    def recipe(method: str, **params: float) -> dict:
        return {
            "merge_method": method,
            "base_model": base,
            "dtype": "float32",
            "models": [
                {"model": base},
                {"model": ft1, "parameters": {"weight": 1.0, **params}},
                {"model": ft2, "parameters": {"weight": 0.5, **params}},
            ],
        }

    return {
        "dare_linear_density05": recipe("dare_linear", density=0.5),
        "dare_ties_density07": recipe("dare_ties", density=0.7),
        "della_linear_density05": recipe("della_linear", density=0.5, epsilon=0.2),
        "della_density06": recipe("della", density=0.6, epsilon=0.1),
    }


@dataclass
class RandomOutcome:
    name: str
    keep: tuple[float, float]  # share of entries the merge changes: medmerge, mergekit
    l1: tuple[float, float]  # L1 norm of the merged task vector: medmerge, mergekit

    @property
    def ok(self) -> bool:
        return abs(self.keep[0] - self.keep[1]) < 0.01 and abs(self.l1[0] / self.l1[1] - 1) < 0.02


def statistics(name: str, ours: Path, theirs: Path, base_dir: Path) -> RandomOutcome:
    base = load_all(base_dir)
    merged = {"medmerge": load_all(ours), "mergekit": load_all(theirs)}
    keep, l1 = [], []
    for tensors in merged.values():
        deltas = [(tensors[k].double() - base[k].double()).reshape(-1) for k in base]
        keep.append(sum(int((d != 0).sum()) for d in deltas) / sum(d.numel() for d in deltas))
        l1.append(sum(float(d.abs().sum()) for d in deltas))
    return RandomOutcome(name, (keep[0], keep[1]), (l1[0], l1[1]))


@dataclass
class Outcome:
    name: str
    tensors: int
    elements: int
    differing: int
    explained: int
    max_abs: float

    @property
    def ok(self) -> bool:
        return self.differing == self.explained


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ties_threshold_ties(recipe: dict, model_dirs: dict[str, Path], name: str, positions: torch.Tensor) -> int:
    """How many of `positions` (flat) sit on a magnitude-threshold tie of some model's delta."""
    dtype = DTYPES[recipe["dtype"]]
    base = load_all(model_dirs[recipe["base_model"]])[name].to(dtype)
    hit = torch.zeros(positions.numel(), dtype=torch.bool)
    for m in recipe["models"]:
        density = (m.get("parameters") or {}).get("density", 1.0)
        if m["model"] == recipe["base_model"] or density >= 1:
            continue
        delta = (load_all(model_dirs[m["model"]])[name].to(dtype) - base).reshape(-1)
        k = max(1, int(density * delta.numel()))
        magnitude = delta.abs().float()
        threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values  # the k-th largest |delta|
        hit |= magnitude[positions] == threshold
    return int(hit.sum())


def breadcrumbs_edge_ties(recipe: dict, model_dirs: dict[str, Path], name: str, positions: torch.Tensor) -> int:
    """How many of `positions` (flat) have the |delta| of a Breadcrumbs keep-band edge of some model: the
    magnitude at ascending rank b - 1, b, b + k - 1 or b + k (mergekit's unstable sort picks among equal ones)."""
    dtype = DTYPES[recipe["dtype"]]
    base = load_all(model_dirs[recipe["base_model"]])[name].to(dtype)
    shared_gamma = (recipe.get("parameters") or {}).get("gamma", 0.01)
    hit = torch.zeros(positions.numel(), dtype=torch.bool)
    for m in recipe["models"]:
        params = m.get("parameters") or {}
        density = params.get("density", 1.0)
        if m["model"] == recipe["base_model"] or density >= 1:
            continue
        magnitude = (load_all(model_dirs[m["model"]])[name].to(dtype) - base).reshape(-1).abs().float()
        n = magnitude.numel()
        k = int(density * n)
        bottom = max(0, n - k - int(params.get("gamma", shared_gamma) * n))
        ranked = torch.sort(magnitude).values
        edges = ranked[[r for r in (bottom - 1, bottom, bottom + k - 1, bottom + k) if 0 <= r < n]]
        hit |= torch.isin(magnitude[positions], edges)
    return int(hit.sum())


def by_token(ours: Path, theirs: Path, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, float]:
    """Put mergekit's token rows in our token order (its ids for tokens new to the base change from run to run:
    set and hash-map order), and its padding rows, each the mean of its rows summed in its own order, within
    float rounding of ours in place of ours; returns how many padding elements differ (explained), and by how much."""
    from transformers import AutoTokenizer

    our_vocab = AutoTokenizer.from_pretrained(str(ours)).get_vocab()
    their_vocab = AutoTokenizer.from_pretrained(str(theirs)).get_vocab()
    if set(our_vocab) != set(their_vocab):
        raise SystemExit(f"{ours}: vocabularies differ: {sorted(set(our_vocab) ^ set(their_vocab))[:5]}")
    order = torch.tensor([their_vocab[t] for t in sorted(our_vocab, key=our_vocab.__getitem__)])
    padding, largest = 0, 0.0
    for key, tensor in a.items():
        if tensor.shape[:1] != b[key].shape[:1] or tensor.shape[0] < len(order) or key not in VOCABULARY_TENSORS:
            continue
        theirs_reordered = torch.cat([b[key][order], b[key][len(order) :]])
        pad_ours, pad_theirs = tensor[len(order) :].double(), theirs_reordered[len(order) :].double()
        if not torch.allclose(pad_ours, pad_theirs, rtol=1e-2, atol=1e-6):
            raise SystemExit(f"{ours}: {key}: padding rows are not the mean row")
        padding += int((pad_ours != pad_theirs).sum())
        largest = max(largest, float((pad_ours - pad_theirs).abs().max()) if pad_ours.numel() else 0.0)
        b[key] = torch.cat([theirs_reordered[: len(order)], tensor[len(order) :]])
    return padding, largest


VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def compare(name: str, recipe: dict, ours: Path, theirs: Path, model_dirs: dict[str, Path]) -> Outcome:
    a, b = load_all(ours), load_all(theirs)
    by_vocabulary = recipe.get("tokenizer_source") or recipe.get("tokenizer")
    padding, max_abs = by_token(ours, theirs, a, b) if by_vocabulary else (0, 0.0)
    if set(a) != set(b):
        raise SystemExit(f"{name}: tensor names differ: {sorted(set(a) ^ set(b))[:5]}")
    differing = explained = elements = 0
    for key in a:
        if a[key].dtype != b[key].dtype or a[key].shape != b[key].shape:
            raise SystemExit(f"{name}: {key}: {a[key].dtype}{list(a[key].shape)} vs {b[key].dtype}{list(b[key].shape)}")
        elements += a[key].numel()
        diff = (a[key] != b[key]).reshape(-1)
        n = int(diff.sum())
        if not n:
            continue
        differing += n
        max_abs = max(max_abs, float((a[key].double() - b[key].double()).abs().max()))
        if recipe["merge_method"] == "ties" and key in load_all(model_dirs[recipe["base_model"]]):
            explained += ties_threshold_ties(recipe, model_dirs, key, diff.nonzero().reshape(-1))
        elif recipe["merge_method"].startswith("breadcrumbs"):
            explained += breadcrumbs_edge_ties(recipe, model_dirs, key, diff.nonzero().reshape(-1))
    return Outcome(name, len(a), elements, differing + padding, explained + padding, max_abs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mergekit-python",
        default=os.environ.get("MEDMERGE_MERGEKIT_PYTHON"),
        help="python of a venv with mergekit 0.1.5 installed ($MEDMERGE_MERGEKIT_PYTHON)",
    )
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--only", nargs="*", help="recipe names to run")
    args = parser.parse_args()
    if not args.mergekit_python:
        parser.error("give --mergekit-python or set MEDMERGE_MERGEKIT_PYTHON")
    outcomes, random_outcomes = run_comparison(Path(args.mergekit_python), args.work, args.hidden, args.only)
    print(f"{'recipe':28} {'tensors':>7} {'elements':>10} {'differ':>7} {'explained':>9} {'max |diff|':>10}")
    for o in outcomes:
        print(
            f"{o.name:28} {o.tensors:7d} {o.elements:10d} {o.differing:7d} {o.explained:9d} {o.max_abs:10.3g}"
            f"  {'ok' if o.ok else 'UNEXPLAINED'}"
        )
    print(f"\n{'random recipe':28} {'keep (ours/theirs)':>19} {'L1 of merged delta (ours/theirs)':>34}")
    for r in random_outcomes:
        print(
            f"{r.name:28} {r.keep[0]:9.4f}/{r.keep[1]:.4f} {r.l1[0]:16.4f}/{r.l1[1]:.4f}"
            f"  {'ok' if r.ok else 'DIFFERENT'}"
        )
    return 0 if all(o.ok for o in [*outcomes, *random_outcomes]) else 1


def run_comparison(
    mergekit_python: Path, work: Path | None, hidden: int = 128, only: list[str] | None = None
) -> tuple[list[Outcome], list[RandomOutcome]]:
    work = work or Path(tempfile.mkdtemp(prefix="medmerge-vs-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    dirs = {n: work / n for n in ("base", "ft1", "ft2")}
    if not (dirs["ft2"] / "config.json").exists():
        build_tokenizer(work / "tokenizer")
        build_model(dirs["base"], work / "tokenizer", hidden=hidden, intermediate=2 * hidden, layers=4)
        perturbed_copy(dirs["base"], dirs["ft1"], 0.05, seed=1)
        perturbed_copy(dirs["base"], dirs["ft2"], 0.05, seed=2)
    if not (work / "other_vocab" / "config.json").exists():  # another tokenizer: 420 tokens, other ids
        build_tokenizer(work / "tokenizer_420", vocab_size=420, extra_text=["hemoglobin erythrocyte nephron"] * 3)
        build_model(
            work / "other_vocab", work / "tokenizer_420", hidden=hidden, intermediate=2 * hidden, layers=4, seed=9
        )
    adapter = work / "lora"
    if not (adapter / "adapter_config.json").exists():
        build_lora(
            dirs["base"],
            adapter,
            target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            modules_to_save=["lm_head"],
        )
    model_dirs = {str(p): p for p in dirs.values()}
    names = [str(p) for p in dirs.values()]
    outcomes, random_outcomes = [], []
    for name, recipe in [
        *recipes(*names, str(adapter), str(work / "other_vocab")).items(),
        *random_recipes(*names).items(),
    ]:
        if only and name not in only:
            continue
        ours, theirs = merge_both(mergekit_python, work, name, recipe)
        if name in random_recipes(*names):
            random_outcomes.append(statistics(name, ours, theirs, dirs["base"]))
        else:
            outcomes.append(compare(name, recipe, ours, theirs, model_dirs))
    return outcomes, random_outcomes


def merge_both(mergekit_python: Path, work: Path, name: str, recipe: dict) -> tuple[Path, Path]:
    """The recipe merged by medmerge and by mergekit-yaml: (our output, mergekit's output)."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    ours, theirs = work / "out" / name / "medmerge", work / "out" / name / "mergekit"
    shutil.rmtree(theirs, ignore_errors=True)
    run_merge(path, ours, overwrite=True)
    subprocess.run(
        [
            str(mergekit_python.parent / "mergekit-yaml"),
            *(str(path), str(theirs), "--allow-crimes", "--no-lazy-unpickle"),
            *("--lora-merge-cache", str(work / "lora-cache")),  # where mergekit saves base+adapter merged
        ],
        check=True,
        capture_output=True,
    )
    return ours, theirs


if __name__ == "__main__":
    sys.exit(main())
