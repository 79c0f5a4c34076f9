"""Which output tensor comes from which input tensors, with which parameters — before any weight is read.

The plan is built from configs and safetensors headers only. Tensor names follow the Hugging Face
decoder layout: `...layers.<i>.<rest>` are layer tensors (renumbered in the output when slices stack
layers); the others are embeddings (before the layers, taken from the first slice) or final norm and
lm_head (after, taken from the last slice), and sit at t = 0 on parameter gradients.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from medmerge_common.errors import Problem, UserError
from merge.io.checkpoint import Checkpoint, OutputTensor, TensorInfo, config_int
from merge.methods import REQUIRED
from merge.methods.lines import lines_scale
from merge.params import layer_position, resolve
from merge.recipe import Parameters, Recipe
from merge.vocabulary import Vocabulary, vocab_size

LAYER = re.compile(r"^(.*?\blayers\.)(\d+)(\..+)$")


class TensorProblems:
    """Per-tensor problems, said once per kind: the first tensor's message and how many more tensors have it
    (a shape mismatch in every layer is one line, not one per tensor)."""

    def __init__(self) -> None:
        self._kinds: dict[tuple[str, str], list[Problem]] = {}

    def add(self, kind: str, problem: Problem) -> None:
        self._kinds.setdefault((kind, f"{problem.file}:{problem.line}:{problem.field}"), []).append(problem)

    def __bool__(self) -> bool:
        return bool(self._kinds)

    def problems(self) -> list[Problem]:
        out = []
        for same in self._kinds.values():
            first = same[0]
            more = f" (and {len(same) - 1} more tensor(s) like it)" if len(same) > 1 else ""
            out.append(Problem(first.message + more, first.file, first.line, first.field))
        return out


@dataclass(frozen=True)
class Source:
    """One input of a tensor job: which model, which of its tensors, and its per-model parameters."""

    model: str
    tensor: str
    params: dict[str, Any]


@dataclass(frozen=True)
class TensorJob:
    output: OutputTensor
    sources: tuple[Source, ...]
    base_index: int | None
    params: dict[str, Any]
    t: float
    depth: float | None = None  # l / (L - 1) over the output model's layers; None outside them (LiNeS reads it)
    copy_only: bool = False  # integer buffers are copied from the first source, never merged
    vocabulary: bool = False  # rows indexed by token: re-indexed to the output vocabulary before merging


@dataclass
class MergePlan:
    recipe: Recipe
    reference: str  # the model whose config, generation config and (by default) tokenizer are used
    jobs: list[TensorJob]
    config: dict[str, Any]
    num_layers: int
    models: list[str] = field(default_factory=list)
    vocabulary: Vocabulary | None = None  # the output vocabulary, when the recipe sets one


@dataclass(frozen=True)
class _SliceSource:
    model: str
    start: int
    end: int
    params: Parameters | None
    path: tuple


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_SliceSource, ...]
    params: Parameters | None
    base: str | None


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def num_layers(config: dict[str, Any]) -> int | None:
    return config_int(config, *LAYER_KEYS)


def build_plan(recipe: Recipe, models: dict[str, Checkpoint], vocabulary: Vocabulary | None = None) -> MergePlan:
    """Plan every output tensor (re-indexing token rows to `vocabulary` when given); raise UserError with all
    problems (file/line/field where possible)."""
    problems: list[Problem] = []
    reference = recipe.base_model or recipe.model_refs()[0]
    _check_architectures(recipe, models, reference, problems)
    slices = _slices(recipe, models, problems)
    if problems:
        raise UserError(problems=problems)

    outer = [name for name in models[slices[0].sources[0].model].tensors if not LAYER.match(name)]
    pre = sorted(n for n in outer if _is_embedding(n))
    post = sorted(n for n in outer if not _is_embedding(n))

    tensor_problems = TensorProblems()
    jobs: list[TensorJob] = []
    for name in pre:
        jobs += _job(
            recipe,
            models,
            vocabulary,
            slices[0],
            name,
            {s.model: name for s in slices[0].sources},
            0.0,
            tensor_problems,
        )
    out_layer = 0
    total_layers = sum(sl.sources[0].end - sl.sources[0].start for sl in slices)
    for sl in slices:
        length = sl.sources[0].end - sl.sources[0].start
        for offset in range(length):
            t = layer_position(offset, length)
            depth = layer_position(out_layer, total_layers)
            first = sl.sources[0]
            for ref_name in sorted(_layer_tensors(models[first.model], first.start + offset)):
                m = LAYER.match(ref_name)
                assert m
                out_name = f"{m.group(1)}{out_layer}{m.group(3)}"
                inputs = {s.model: f"{m.group(1)}{s.start + offset}{m.group(3)}" for s in sl.sources}
                jobs += _job(recipe, models, None, sl, out_name, inputs, t, tensor_problems, depth)
            out_layer += 1
    for name in post:
        jobs += _job(
            recipe,
            models,
            vocabulary,
            slices[-1],
            name,
            {s.model: name for s in slices[-1].sources},
            0.0,
            tensor_problems,
        )
    if tensor_problems:
        raise UserError(problems=tensor_problems.problems())

    config = _output_config(recipe, models[reference].config, slices, models, out_layer, vocabulary)
    return MergePlan(recipe, reference, jobs, config, out_layer, list(models), vocabulary)


def _is_embedding(name: str) -> bool:
    return "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"])


def _layer_tensors(model: Checkpoint, index: int) -> list[str]:
    out = []
    for name in model.tensors:
        m = LAYER.match(name)
        if m and int(m.group(2)) == index:
            out.append(name)
    return out


def _check_architectures(
    recipe: Recipe, models: dict[str, Checkpoint], reference: str, problems: list[Problem]
) -> None:
    ref_arch = models[reference].config.get("architectures")
    for ref, model in models.items():
        arch = model.config.get("architectures")
        if arch != ref_arch:
            problems.append(
                Problem(
                    f"model '{ref}' is {arch}, but '{reference}' is {ref_arch}: "
                    "only models of one architecture can be merged",
                    recipe.source_file,
                )
            )


def _slices(recipe: Recipe, models: dict[str, Checkpoint], problems: list[Problem]) -> list[_Slice]:
    """The recipe's inputs as slices (the `models:` form is one slice over every layer)."""

    def layers_of(ref: str, path: tuple) -> int:
        n = num_layers(models[ref].config)
        if n is None:
            problems.append(
                Problem(f"model '{ref}' has no num_hidden_layers in its config.json", **recipe.where(*path))
            )
            return 0
        held = sorted({int(m.group(2)) for m in map(LAYER.match, models[ref].tensors) if m})
        if held and held != list(range(n)):
            span = f"layers {held[0]}-{held[-1]}" if held == list(range(held[0], held[-1] + 1)) else "other layers"
            problems.append(
                Problem(
                    f"model '{ref}': config.json says {n} layers, but its weights hold {len(held)} ({span})",
                    **recipe.where(*path),
                )
            )
            return len(held)  # what the weights hold: so only this one line is said
        return n

    if recipe.models:
        entries = [(m.model, m.parameters, ("models", i, "model")) for i, m in enumerate(recipe.models)]
        if recipe.base_joins_models and recipe.base_model:
            entries.append((recipe.base_model, None, ("base_model",)))
        counts = {ref: layers_of(ref, path) for ref, _, path in entries}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{ref}: {n}" for ref, n in counts.items())
            problems.append(
                Problem(f"models differ in layer count ({detail}); use slices to pick layers", **recipe.where("models"))
            )
        return [
            _Slice(
                tuple(_SliceSource(ref, 0, counts[ref], params, path) for ref, params, path in entries),
                None,
                recipe.base_model,
            )
        ]
    out = []
    for i, s in enumerate(recipe.slices or []):
        sources = []
        for j, src in enumerate(s.sources):
            path = ("slices", i, "sources", j, "layer_range")
            n = layers_of(src.model, path)
            start, end = src.layer_range
            if n and end > n:
                problems.append(
                    Problem(
                        f"layer_range [{start}, {end}] is out of bounds: model '{src.model}' has "
                        f"{n} layers (0..{n - 1})",
                        **recipe.where(*path),
                    )
                )
            sources.append(_SliceSource(src.model, start, end, src.parameters, path))
        out.append(_Slice(tuple(sources), s.parameters, s.base_model or recipe.base_model))
    return out


def _job(
    recipe: Recipe,
    models: dict[str, Checkpoint],
    vocabulary: Vocabulary | None,
    sl: _Slice,
    out_name: str,
    inputs: dict[str, str],
    t: float,
    problems: TensorProblems,
    depth: float | None = None,
) -> list[TensorJob]:
    """One output tensor's job (or none, with problems recorded): find the inputs, resolve the parameters.
    With an output vocabulary, a tensor whose rows are each model's tokens (its first dimension is the model's
    vocab_size: embeddings, lm_head) gets that vocabulary's rows. The recipe's `lines:` scales the method's
    λ by the tensor's `depth` (merge/methods/lines.py)."""
    by_token = vocabulary is not None and all(
        (info := models[s.model].tensors.get(inputs[s.model])) is not None
        and info.shape[:1] == (vocab_size(models[s.model].config),)
        for s in sl.sources
    )
    found = _input_tensors(recipe, models, sl, out_name, inputs, problems, by_token)
    if found is None:
        return []
    first = found[0]
    if not first.dtype.is_floating_point:  # integer buffers are copied from the first source, never merged
        source = Source(sl.sources[0].model, inputs[sl.sources[0].model], {})
        return [TensorJob(OutputTensor(out_name, first.dtype, first.shape), (source,), None, {}, t, copy_only=True)]
    params = _shared_params(recipe, sl, out_name, t, problems)
    sources = _per_model_params(recipe, sl, inputs, t, problems)
    if params is None or sources is None or not _method_check(recipe, params, sources, out_name, problems):
        return []
    if recipe.layer_scaling is not None:
        params["lambda"] *= lines_scale(recipe.layer_scaling.alpha, recipe.layer_scaling.beta, depth)
    base_index = next((i for i, s in enumerate(sl.sources) if s.model == sl.base), None)
    dtype = recipe.output_dtype or first.dtype
    shape = first.shape
    if by_token:
        assert vocabulary is not None
        shape = (vocabulary.size, *shape[1:])
        missing = vocabulary.missing_model([s.model for s in sl.sources])
        if missing:
            problems.add(
                "token source",
                Problem(
                    f"tokenizer.tokens takes rows from model '{missing}', which is not an input of '{out_name}'",
                    **recipe.where("tokenizer", "tokens"),
                ),
            )
            return []
    job = TensorJob(
        OutputTensor(out_name, dtype, shape), tuple(sources), base_index, params, t, depth, vocabulary=by_token
    )
    return [job]


def _input_tensors(
    recipe: Recipe,
    models: dict[str, Checkpoint],
    sl: _Slice,
    out_name: str,
    inputs: dict[str, str],
    problems: TensorProblems,
    by_token: bool = False,
) -> list[TensorInfo] | None:
    """Each source's input tensor, all of one shape (but for the token dimension of `by_token` tensors); None
    (problem recorded) when one is missing or differs."""
    found = []
    for s in sl.sources:
        info = models[s.model].tensors.get(inputs[s.model])
        if info is None:
            problems.add(
                f"missing in {s.model}",
                Problem(f"model '{s.model}' has no tensor '{inputs[s.model]}'", **recipe.where(*s.path)),
            )
            return None
        found.append(info)
    if len({info.shape[1:] if by_token else info.shape for info in found}) > 1:
        detail = ", ".join(f"'{s.model}' {list(info.shape)}" for s, info in zip(sl.sources, found))
        hint = (
            "; models with different vocabularies merge with tokenizer_source: union (or base, or a model)"
            if recipe.vocabulary_settings is None and len({info.shape[1:] for info in found}) == 1
            else ""
        )
        problems.add("shapes", Problem(f"tensor '{out_name}' has different shapes: {detail}{hint}", recipe.source_file))
        return None
    return found


def _shared_params(
    recipe: Recipe, sl: _Slice, out_name: str, t: float, problems: TensorProblems
) -> dict[str, Any] | None:
    """The method's shared parameters for one tensor (slice, then recipe scope); None when one has no value."""
    params: dict[str, Any] = {}
    for spec in recipe.method.params:
        if spec.per_model:
            continue
        value = resolve(spec.name, spec.type, (sl.params, recipe.parameters), out_name, t)
        params[spec.name] = spec.default if value is None else value
        if params[spec.name] is REQUIRED:
            problems.add(
                f"no {spec.name}",
                Problem(
                    f"parameter '{spec.name}' has no value for tensor '{out_name}' "
                    "(no filter matches it and there is no default entry)",
                    recipe.source_file,
                ),
            )
            return None
    return params


def _per_model_params(
    recipe: Recipe, sl: _Slice, inputs: dict[str, str], t: float, problems: TensorProblems
) -> list[Source] | None:
    """Each source with its own parameters (model, slice, then recipe scope); None when one has no value."""
    sources = []
    for s in sl.sources:
        own: dict[str, Any] = {}
        for spec in recipe.method.params:
            if not spec.per_model or (s.model == sl.base and not spec.base_too):
                continue
            value = resolve(spec.name, spec.type, (s.params, sl.params, recipe.parameters), inputs[s.model], t)
            own[spec.name] = spec.default if value is None else value
            if own[spec.name] is REQUIRED:
                problems.add(
                    f"no {spec.name} for {s.model}",
                    Problem(
                        f"parameter '{spec.name}' of model '{s.model}' has no value for tensor "
                        f"'{inputs[s.model]}' (no filter matches it)",
                        **recipe.where(*s.path[:-1]),
                    ),
                )
                return None
        sources.append(Source(s.model, inputs[s.model], own))
    return sources


def _method_check(
    recipe: Recipe, params: dict[str, Any], sources: list[Source], out_name: str, problems: TensorProblems
) -> bool:
    """The method's own check of one tensor's resolved parameters (weights that normalize cannot divide by...)."""
    check = recipe.method.check
    message = check(params, [s.params for s in sources]) if check else None
    if message:
        where = recipe.where("parameters") if recipe.parameters else {"file": recipe.source_file}
        problems.add(message, Problem(f"tensor '{out_name}': {message}", **where))
    return message is None


def _output_config(
    recipe: Recipe,
    reference: dict[str, Any],
    slices: list[_Slice],
    models: dict[str, Checkpoint],
    total_layers: int,
    vocabulary: Vocabulary | None,
) -> dict[str, Any]:
    config = copy.deepcopy(reference)

    def holder(key: str) -> dict[str, Any]:  # where config_int reads `key`: the top level, else text_config
        return config["text_config"] if key not in config and isinstance(config.get("text_config"), dict) else config

    if vocabulary is not None:
        holder("vocab_size")["vocab_size"] = vocabulary.size
    target = holder("num_hidden_layers")
    for key in LAYER_KEYS:
        if key in target:
            target[key] = total_layers
    if isinstance(target.get("layer_types"), list):
        types: list[Any] = []
        for sl in slices:
            src = sl.sources[0]
            src_types = models[src.model].config.get("layer_types") or target["layer_types"]
            types += src_types[src.start : src.end]
        target["layer_types"] = types
    if recipe.output_dtype is not None:
        name = str(recipe.output_dtype).removeprefix("torch.")
        config["torch_dtype"] = name  # transformers 4 reads this key
        config["dtype"] = name  # transformers 5 reads this one
    return config
