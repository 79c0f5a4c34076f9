"""The merge methods by name, each declared once: its parameters (type, default, bounds, scope), its paper,
whether it needs a base, how many inputs it takes, whether it is random, and what it checks per tensor.

The math is a pure function in this package (its docstring gives the paper's equation); a declaration adapts a
:class:`MergeCall` to that function's plain arguments. The task-vector family is one definition over
(sparsification x sign consensus x defaults), as the papers build on each other: `TASK_VECTOR_METHODS`.
Adding a method: a module with its function, and one `Method` in `METHODS` (README: "Adding a merge method").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from merge.methods.arcee_fusion import arcee_fusion
from merge.methods.fisher import fisher_average
from merge.methods.linear import linear
from merge.methods.lines import lines_scale
from merge.methods.model_stock import model_stock
from merge.methods.nearswap import nearswap
from merge.methods.passthrough import passthrough
from merge.methods.pcb import pcb
from merge.methods.ram import ram
from merge.methods.sce import sce
from merge.methods.slerp import slerp
from merge.methods.spherical import karcher_mean, multislerp, nuslerp, nuslerp_t
from merge.methods.task_vectors import (
    consensus_mask,
    magnitude_prune,
    merge_task_vectors,
    outlier_prune,
    random_prune,
    rank_random_prune,
    rescale_l1,
)
from merge.methods.widen import widen

REQUIRED = object()


@dataclass(frozen=True)
class Bounds:
    """The values a number parameter may take. Outside them is an error, or only a warning when not `strict`
    (a value that makes sense mathematically but rarely on purpose, such as slerp extrapolating past a model)."""

    low: float
    high: float
    low_open: bool = False
    strict: bool = True

    def contains(self, value: float) -> bool:
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Param:
    """A recipe parameter. `per_model` ones are read from each source (the base never gets NON-base ones)."""

    name: str
    type: type  # float, int, bool, or str for a tensor file
    default: Any = REQUIRED
    per_model: bool = False
    base_too: bool = False  # per-model parameter that the base model also takes (linear's weight)
    doc: str = ""
    bounds: Bounds | None = None
    # per-model, type str: a directory of safetensors holding, under the model's tensor names, one tensor of the same
    # shape for each (a Fisher); the runner reads it beside the input and the method gets the tensor, not the path
    tensor_file: bool = False


@dataclass
class MergeCall:
    """Everything one output tensor needs, as plain values: inputs in source order, resolved parameters."""

    tensors: list[torch.Tensor]
    base_index: int | None
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    rng: np.random.Generator | None = None  # random methods only: seeded by (seed, tensor name) by the runner
    # where the output tensor's layer sits among the output model's layers, l / (L - 1); None outside the layers
    # (embeddings, final norm, lm_head). Only layer-scaled methods (LiNeS) read it.
    depth: float | None = None
    name: str = ""  # the output tensor's name, for methods that treat a tensor by its role (WIDEN: token rows)

    def split(self) -> tuple[torch.Tensor | None, list[torch.Tensor], list[dict[str, Any]]]:
        """(the base or None, the other inputs, their parameters)."""
        others = [i for i in range(len(self.tensors)) if i != self.base_index]
        base = None if self.base_index is None else self.tensors[self.base_index]
        return base, [self.tensors[i] for i in others], [self.model_params[i] for i in others]

    def base_and_others(self) -> tuple[torch.Tensor, list[torch.Tensor], list[dict[str, Any]]]:
        base, others, params = self.split()
        assert base is not None
        return base, others, params


Check = Callable[[dict[str, Any], list[dict[str, Any]]], str | None]  # (shared, per-model params) -> problem


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    apply: Callable[[MergeCall], torch.Tensor]
    params: tuple[Param, ...] = ()
    paper: str = ""  # where the method is defined (model card, README)
    # "required": the merge is relative to the base; "optional": a recipe's base_model, when it names one, is
    # an input (added if not listed, as mergekit does); "none": the base is an ordinary model, if listed
    base: Literal["required", "optional", "none"] = "none"
    min_models: int = 1  # inputs besides the base
    max_models: int | None = None
    random: bool = False  # the runner hands `apply` a generator seeded by (seed, tensor name): MergeCall.rng
    check: Check | None = None  # a tensor's resolved parameters that cannot be merged: the plan reports it

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def takes_base(self) -> bool:
        return self.base != "none"


def normalizable(shared: dict[str, Any], per_model: list[dict[str, Any]]) -> str | None:
    """normalize divides by the sum of the weights: weights summing to zero cannot be merged."""
    weights = [p["weight"] for p in per_model if "weight" in p]
    if shared.get("normalize") and weights and sum(weights) == 0:
        return "the weights sum to zero, so normalize would divide by zero (set normalize: false or change them)"
    return None


def _linear(c: MergeCall) -> torch.Tensor:
    return linear(c.tensors, [p["weight"] for p in c.model_params], normalize=c.params["normalize"])


def _slerp(c: MergeCall) -> torch.Tensor:
    base, others, _ = c.base_and_others()
    return slerp(c.params["t"], base, others[0])


def _nearswap(c: MergeCall) -> torch.Tensor:
    base, others, _ = c.base_and_others()
    return nearswap(c.params["t"], base, others[0])


def _model_stock(c: MergeCall) -> torch.Tensor:
    base, others, _ = c.base_and_others()
    return model_stock(base, others, filter_wise=c.params["filter_wise"])


def _nuslerp(c: MergeCall) -> torch.Tensor:
    base, (a, b), per_model = c.split()
    t = nuslerp_t([p["weight"] for p in per_model])
    shape = {"flatten": c.params["nuslerp_flatten"], "columns": c.params["nuslerp_row_wise"]}
    return nuslerp(t, a, b, **shape, origin=base)


def _multislerp(c: MergeCall) -> torch.Tensor:
    base, others, per_model = c.split()
    weights = [p["weight"] for p in per_model]
    return multislerp(others, weights, base, c.params["normalize_weights"], c.params["eps"])


def _karcher(c: MergeCall) -> torch.Tensor:
    return karcher_mean(c.tensors, c.params["max_iter"], c.params["tol"])  # the base, if any, is one more point


def _sce(c: MergeCall) -> torch.Tensor:
    base, others, _ = c.base_and_others()
    return sce(base, others, c.params["select_topk"])


def _pcb(c: MergeCall) -> torch.Tensor:
    base, others, _ = c.base_and_others()
    return pcb(base, others, c.params["pcb_ratio"], c.params["lambda"])


TOKEN_EMBEDDINGS = ("embed_tokens.weight", "wte.weight")


def _widen(c: MergeCall) -> torch.Tensor:
    base, others, _ = c.base_and_others()
    ratio, calibration = c.params["above_average_value_ratio"], c.params["score_calibration_value"]
    return widen(base, others, ratio, calibration, token_rows=c.name.endswith(TOKEN_EMBEDDINGS))


def _arcee_fusion(c: MergeCall) -> torch.Tensor:
    base, (other,), _ = c.base_and_others()
    return arcee_fusion(base, other)


def _ram(plus: bool, c: MergeCall) -> torch.Tensor:
    base, others, _ = c.base_and_others()
    return ram(base, others, c.params["epsilon"], (c.params["r"], c.params["alpha"]) if plus else None)


def _fisher(c: MergeCall) -> torch.Tensor:
    _, others, per_model = c.split()
    return fisher_average(
        others, [p["fisher"] for p in per_model], [p["weight"] for p in per_model], c.params["epsilon"]
    )


def _passthrough(c: MergeCall) -> torch.Tensor:
    return passthrough(c.tensors[0], c.model_params[0].get("scale"))


# --- the task-vector family ----------------------------------------------------------------------------------

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della"] | None


def _task_vectors(
    sparsification: Sparsification, consensus: bool, tall: bool, lines: bool, c: MergeCall
) -> torch.Tensor:
    """θ_base + λ [· LiNeS scale] · combine(w_i · sparsify(τ_i) [⊙ m_consensus]), see
    merge/methods/task_vectors.py. bfloat16 on the CPU with no sparsification, TIES's, Breadcrumbs' or DARE's runs
    fused (merge/methods/fused_bf16.py), to the same bits."""
    from merge.methods import fused_bf16  # numba: imported when a task-vector merge runs, not on every command

    base, others, per_model = c.base_and_others()
    lambda_ = c.params["lambda"]
    if lines:
        alpha = 1 / len(others) if c.params["alpha"] is None else c.params["alpha"]
        beta = 1 - alpha if c.params["beta"] is None else c.params["beta"]
        lambda_ *= lines_scale(alpha, beta, c.depth)
    mask = None
    if tall:  # the TALL masks' consensus, from the unpruned task vectors (the mask is elementwise: applying it
        # to each pruned τ̂_i before combining gives the masked merge, sign election included)
        lambdas = [p["tall_lambda"] for p in per_model]
        mask = consensus_mask([x - base for x in others], lambdas, c.params["k"]).to(base.dtype)
    densities = [p["density"] for p in per_model]
    weights = [p["weight"] for p in per_model]
    rescale = None
    if c.params["rescale"]:
        rescale = "density" if sparsification == "random" and c.params["rescale_by_density"] else "l1"
    # DARE: one counter-based mask stream per model, keyed from the tensor's seeded generator
    keys = []
    if sparsification == "random":
        keys = [int(k) for k in c.rng.integers(2**64, size=len(others), dtype=np.uint64)]
    fusable = (None, "magnitude", "random", "magnitude_outliers")
    if mask is None and sparsification in fusable and fused_bf16.applies(base, others):
        return fused_bf16.fused_task_vectors(
            base,
            others,
            weights,
            magnitude_densities=densities if sparsification in ("magnitude", "magnitude_outliers") else None,
            band_gammas=[p["gamma"] for p in per_model] if sparsification == "magnitude_outliers" else None,
            random_keys=keys or None,
            random_densities=densities if sparsification == "random" else None,
            rescale=rescale if sparsification else None,
            sign_consensus=consensus,
            normalize=c.params["normalize"],
            lambda_=lambda_,
        )
    uniform = (
        [None if d >= 1 else torch.from_numpy(c.rng.random(base.numel(), dtype=np.float32)) for d in densities]
        if sparsification == "della"
        else None
    )

    def sparsify(delta: torch.Tensor, i: int) -> torch.Tensor:
        p = per_model[i]
        if sparsification == "magnitude":
            pruned = magnitude_prune(delta, p["density"])
        elif sparsification == "random":
            keep = None if p["density"] >= 1 else fused_bf16.bernoulli_keep(keys[i], delta.numel(), p["density"])
            pruned = random_prune(delta, keep)
            if rescale == "density" and pruned is not delta:
                return pruned.mul_(1 / p["density"])
        elif sparsification == "magnitude_outliers":
            pruned = outlier_prune(delta, p["density"], p["gamma"])
        else:
            pruned = delta if uniform[i] is None else rank_random_prune(delta, p["density"], p["epsilon"], uniform[i])
        return rescale_l1(delta, pruned) if rescale == "l1" and pruned is not delta else pruned

    def prune(delta: torch.Tensor, i: int) -> torch.Tensor:
        pruned = sparsify(delta, i) if sparsification else delta
        return pruned if mask is None else pruned * mask.reshape(pruned.shape)

    return merge_task_vectors(
        base,
        others,
        weights,
        prune=prune if sparsification or mask is not None else None,
        sign_consensus=consensus,
        normalize=c.params["normalize"],
        lambda_=lambda_,
    )


def _della_epsilon(shared: dict[str, Any], per_model: list[dict[str, Any]]) -> str | None:
    for p in per_model:
        if (
            "epsilon" in p
            and p["density"] < 1
            and not 0 < p["density"] - p["epsilon"] < p["density"] + p["epsilon"] < 1
        ):
            return (
                f"density {p['density']:g} ± epsilon {p['epsilon']:g} must lie inside (0, 1): "
                "the keep probabilities run from density − epsilon to density + epsilon"
            )
    return normalizable(shared, per_model)


TALL_PARAMS = (
    Param(
        "k",
        int,
        2,
        doc="consensus: keep an entry where at least k models' TALL masks hold it (2 drops entries only one model "
        "or none needs; 0 keeps all)",
        bounds=Bounds(0, 1e9),
    ),
    Param(
        "tall_lambda",
        float,
        0.4,
        per_model=True,
        doc="TALL mask threshold λ_t: |τ_t| ≥ λ_t·|τ_MTL − τ_t| (the middle of the paper's grid 0.2-0.6; tune it "
        "on validation). `lambda` stays the merged vector's scale",
        bounds=Bounds(0, 1e30),
    ),
)


LINES_PARAMS = (
    Param(
        "alpha",
        float,
        None,
        doc="LiNeS: scale of the shallowest layer's (and the embeddings', final norm's, lm_head's) task vector; "
        "default 1/N for N models, the paper's multi-task α for task arithmetic",
        bounds=Bounds(0, 1e30),
    ),
    Param(
        "beta",
        float,
        None,
        doc="LiNeS: added scale at the deepest layer (α + β·l/(L−1) at layer l); default 1 − α, so the deepest "
        "layer keeps the whole sum (the paper tunes β on validation, 0.1 .. 1.0)",
    ),
)


def _tall_k(shared: dict[str, Any], per_model: list[dict[str, Any]]) -> str | None:
    models = sum("tall_lambda" in p for p in per_model)  # the base takes no per-model TALL parameter
    if shared["k"] > models:
        return f"k = {shared['k']} exceeds the {models} models merged into the base: no entry could be kept"
    return normalizable(shared, per_model)


def _task_vector_params(sparsification: Sparsification, normalize: bool, rescale: bool) -> tuple[Param, ...]:
    # mergekit accepts these six for every task-vector method; so do we. Sparsifications add their own.
    shared = (
        Param("weight", float, per_model=True, doc="scale of this model's task vector"),
        Param(
            "density",
            float,
            1.0,
            per_model=True,
            doc="fraction of the task vector kept, in (0, 1]",
            bounds=Bounds(0, 1, low_open=True),
        ),
        Param("normalize", bool, normalize, doc="divide by the sum of the (agreeing) weights"),
        Param("rescale", bool, rescale, doc="rescale each pruned task vector to its L1 norm before pruning"),
        Param("lambda", float, 1.0, doc="scale of the merged task vector"),
        Param("int8_mask", bool, False, doc="accepted for mergekit recipes; masks are always compact here"),
    )
    extra = {
        "random": Param(
            "rescale_by_density",
            bool,
            False,
            doc="medmerge only: rescale kept entries by 1/density, as the DARE paper and early-2024 mergekit did "
            "(default false: match the L1 norm, as mergekit 0.1.5 does)",
        ),
        "magnitude_outliers": Param(
            "gamma", float, 0.01, per_model=True, doc="fraction of largest |τ| dropped as outliers", bounds=Bounds(0, 1)
        ),
        "della": Param(
            "epsilon",
            float,
            0.15,
            per_model=True,
            doc="half-width of the keep probabilities around density, by magnitude rank",
            bounds=Bounds(0, 1, low_open=True),
        ),
    }
    return (*shared, extra[sparsification]) if sparsification in extra else shared


def task_vector_method(
    name: str,
    summary: str,
    paper: str,
    sparsification: Sparsification,
    consensus: bool,
    normalize: bool = False,
    rescale: bool = False,
    tall: bool = False,
    lines: bool = False,
) -> Method:
    """One member of the task-vector family: a sparsification, with or without TIES's sign consensus, with or
    without the TALL masks' consensus (`k`, `tall_lambda`), with or without LiNeS's layer scaling (`alpha`,
    `beta`), and the defaults of `normalize` and `rescale` its paper (and mergekit) use."""
    return Method(
        name,
        summary,
        partial(_task_vectors, sparsification, consensus, tall, lines),
        _task_vector_params(sparsification, normalize, rescale)
        + (TALL_PARAMS if tall else ())
        + (LINES_PARAMS if lines else ()),
        paper=paper,
        base="required",
        random=sparsification in ("random", "della"),
        check=_della_epsilon if sparsification == "della" else _tall_k if tall else normalizable,
    )


DARE = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
DELLA = "https://arxiv.org/abs/2406.11617"
CONSENSUS = "https://arxiv.org/abs/2405.07813"
LINES = "https://arxiv.org/abs/2410.17146"
TASK_VECTOR_METHODS = (
    task_vector_method(
        "task_arithmetic", "base + weighted sum of task vectors", "https://arxiv.org/abs/2212.04089", None, False
    ),
    task_vector_method(
        "ties",
        "TIES: magnitude trim, sign election, disjoint mean",
        "https://arxiv.org/abs/2306.01708",
        "magnitude",
        True,
        normalize=True,
    ),
    task_vector_method(
        "dare_linear", "DARE random drop and rescale, then a weighted sum", DARE, "random", False, rescale=True
    ),
    task_vector_method(
        "dare_ties", "DARE random drop and rescale, then TIES sign election", DARE, "random", True, rescale=True
    ),
    task_vector_method(
        "breadcrumbs",
        "Model Breadcrumbs: drop the largest and the smallest |τ|, then a weighted sum",
        BREADCRUMBS,
        "magnitude_outliers",
        False,
    ),
    task_vector_method(
        "breadcrumbs_ties", "Model Breadcrumbs, then TIES sign election", BREADCRUMBS, "magnitude_outliers", True
    ),
    task_vector_method(
        "della",
        "DELLA: magnitude-ranked random drop, rescale, TIES sign election",
        DELLA,
        "della",
        True,
        normalize=True,
        rescale=True,
    ),
    task_vector_method(
        "della_linear", "DELLA's drop and rescale, then a weighted sum", DELLA, "della", False, rescale=True
    ),
    task_vector_method(
        "consensus_ta",
        "consensus merging: task arithmetic kept where at least k models' TALL masks agree",
        CONSENSUS,
        None,
        False,
        tall=True,
    ),
    task_vector_method(
        "consensus_ties",
        "consensus merging: TIES kept where at least k models' TALL masks agree",
        CONSENSUS,
        "magnitude",
        True,
        normalize=True,
        tall=True,
    ),
    task_vector_method(
        "lines",
        "LiNeS: task arithmetic with each layer's task vector scaled by α + β·l/(L−1), shallow layers least",
        LINES,
        None,
        False,
        lines=True,
    ),
)

RAM = "https://arxiv.org/abs/2601.13572"
RAM_EPSILON = Param(
    "epsilon", float, 1e-5, doc="a task-vector entry counts as changed when |τ| exceeds it", bounds=Bounds(0, 1e30)
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            "weighted average of the models",
            _linear,
            (Param("weight", float, per_model=True, base_too=True), Param("normalize", bool, True)),
            paper="https://arxiv.org/abs/2203.05482",
            check=normalizable,
        ),
        Method(
            "slerp",
            "spherical interpolation between the base and one other model",
            _slerp,
            (
                Param(
                    "t",
                    float,
                    doc="0 gives the base model, 1 the other",
                    bounds=Bounds(0, 1, strict=False),  # mergekit extrapolates beyond the models; we warn
                ),
            ),
            paper="https://en.wikipedia.org/wiki/Slerp",
            base="required",
            max_models=1,
        ),
        Method(
            "nearswap",
            "take the other model's value where it is within t of the base's",
            _nearswap,
            (Param("t", float, doc="distance below which the other model's value is taken", bounds=Bounds(0, 1e30)),),
            paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            base="required",
            max_models=1,
        ),
        Method(
            "model_stock",
            "Model Stock: the fine-tunes' average pulled towards the base by their task vectors' angle",
            _model_stock,
            (Param("filter_wise", bool, False, doc="one angle per row instead of per tensor"),),
            paper="https://arxiv.org/abs/2403.19522",
            base="required",
            min_models=2,
        ),
        Method(
            "nuslerp",
            "SLERP of two models' whole tensors, rows or columns, about the origin or the base (t from weights)",
            _nuslerp,
            (
                Param("weight", float, per_model=True, doc="t = w_2 / (w_1 + w_2), 0.5 when they sum to zero"),
                Param("nuslerp_flatten", bool, True, doc="one angle per tensor (else one per row or column)"),
                Param("nuslerp_row_wise", bool, False, doc="without flatten: one angle per column v[:, j]"),
            ),
            paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
            base="optional",
            min_models=2,
            max_models=2,
        ),
        Method(
            "multislerp",
            "barycentric interpolation of N models on the hypersphere, about the origin or the base",
            _multislerp,
            (
                Param("weight", float, per_model=True, doc="this model's share of the barycentre"),
                Param("normalize_weights", bool, True, doc="divide the weights by their sum"),
                Param("eps", float, 1e-8, doc="added to norms before dividing", bounds=Bounds(0, 1, low_open=True)),
            ),
            paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            base="optional",
        ),
        Method(
            "karcher",
            "Karcher (Riemannian) mean of the models' directions, at their mean norm",
            _karcher,
            (
                Param("max_iter", int, 10, doc="fixed-point iterations at most", bounds=Bounds(0, 1000)),
                Param("tol", float, 1e-5, doc="stop when the step is shorter than this", bounds=Bounds(0, 1)),
            ),
            paper="https://arxiv.org/abs/2603.04972",
            base="optional",
        ),
        *TASK_VECTOR_METHODS,
        Method(
            "sce",
            "SCE: select high-variance entries, weight task vectors by their energy, erase minority signs",
            _sce,
            (
                Param(
                    "select_topk",
                    float,
                    1.0,
                    doc="fraction of entries kept by variance across the models (1 keeps all)",
                    bounds=Bounds(0, 1),
                ),
                Param("int8_mask", bool, False, doc="accepted for mergekit recipes; masks are always compact here"),
            ),
            paper="https://arxiv.org/abs/2408.07990",
            base="required",
        ),
        Method(
            "pcb",
            "PCB: weight each task-vector entry by its intra- and inter-task competition, keep the top ratio",
            _pcb,
            (
                Param(
                    "pcb_ratio",
                    float,
                    0.1,
                    doc="fraction of each task vector's entries kept, by balance score (the authors' default)",
                    bounds=Bounds(0, 1, low_open=True),
                ),
                Param("lambda", float, 1.0, doc="scale of the merged task vector"),
            ),
            paper="https://arxiv.org/abs/2410.02396",
            base="required",
        ),
        Method(
            "widen",
            "WIDEN: weight each model's change per column by its ranked magnitude and direction shifts",
            _widen,
            (
                Param(
                    "above_average_value_ratio",
                    float,
                    1.0,
                    doc="t: a column whose rank exceeds t times the model's mean rank gets score_calibration_value",
                    bounds=Bounds(0, 1e30),
                ),
                Param(
                    "score_calibration_value",
                    float,
                    1.0,
                    doc="s: the score of a model's important columns (the others share a softmax over the models)",
                    bounds=Bounds(0, 1e30),
                ),
            ),
            paper="https://arxiv.org/abs/2408.03092",
            base="required",
        ),
        Method(
            "ram",
            "RAM: an entry one model changed takes its change, an entry several changed their mean",
            partial(_ram, False),
            (RAM_EPSILON,),
            paper=RAM,
            base="required",
        ),
        Method(
            "ramplus_tl",
            "RAM+: RAM with each model's unique changes boosted by how much it shares (per tensor)",
            partial(_ram, True),
            (
                Param("r", float, 0.1, doc="boost per unit of the shared/unique ratio", bounds=Bounds(0, 1e30)),
                Param("alpha", float, 0.2, doc="the shared/unique ratio's clamp, [0, alpha]", bounds=Bounds(0, 1e30)),
                RAM_EPSILON,
            ),
            paper=RAM,
            base="required",
        ),
        Method(
            "arcee_fusion",
            "Arcee Fusion: take the other model's change where its importance is an outlier",
            _arcee_fusion,
            paper="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
            base="required",
            max_models=1,
        ),
        Method(
            "fisher",
            "Fisher-weighted average: each entry weighted by each model's (diagonal) Fisher information",
            _fisher,
            (
                Param(
                    "fisher",
                    str,
                    per_model=True,
                    doc="directory of this model's diagonal Fisher (`medmerge fisher MODEL -o DIR`)",
                    tensor_file=True,
                ),
                Param("weight", float, 1.0, per_model=True, doc="λ_i, this model's merging coefficient"),
                Param(
                    "epsilon",
                    float,
                    1e-6,
                    doc="floor of every Fisher entry (keeps entries no model's Fisher sees well defined)",
                    bounds=Bounds(0, 1, low_open=True),
                ),
            ),
            paper="https://arxiv.org/abs/2111.09832",
            check=normalizable,
        ),
        Method(
            "passthrough",
            "copy one model's tensors (layer stacking with slices)",
            _passthrough,
            (Param("scale", float, None, per_model=True, base_too=True),),
            max_models=1,
        ),
    )
}
