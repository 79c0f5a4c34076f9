"""The recipe schema (mergekit's YAML format) and its validation, with file/line/field in every error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medmerge_common.errors import Problem, UserError, did_you_mean
from merge.io.lora import split_adapter
from merge.methods import LINES_PARAMS, METHODS, REQUIRED, Method
from merge.params import check_setting, convert
from merge.yamlfile import Path_, field_name, line_of, parse_yaml, read_text, validate_model

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")

Parameters = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputModel(_Strict):
    model: str
    parameters: Parameters | None = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None


class ModelToken(_Strict):
    """A token's stand-in row taken from one model's own vocabulary, by id or by token."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id and token")
        return self


class ZeroToken(_Strict):
    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """`tokenizer.tokens.<token>`: where the token's row comes from for models that lack it (all, with force)."""

    source: ModelToken | ZeroToken | str | None = None
    force: bool = False


class TokenizerSettings(_Strict):
    """`tokenizer:` (mergekit 0.1.5): the output vocabulary's source, extra tokens, and padding of its size."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class LayerScaling(_Strict):
    """`lines:` (medmerge): LiNeS (Wang et al., ICLR 2025) after a task-vector method — the merged task vector of
    layer l of L is scaled by alpha + beta·l/(L−1); embeddings, final norm and lm_head by alpha."""

    alpha: float = Field(allow_inf_nan=False)
    beta: float = Field(allow_inf_nan=False)


class Recipe(_Strict):
    """A merge recipe (mergekit's format): either `models` or `slices`; the README lists every field."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    name: str | None = None
    layer_scaling: LayerScaling | None = Field(default=None, alias="lines")

    # where it came from, for error messages (not part of the YAML)
    source_file: Path | None = Field(default=None, exclude=True)
    source_text: str = Field(default="", exclude=True, repr=False)  # the file as read: copied into the output
    key_lines: dict[Path_, int] = Field(default_factory=dict, exclude=True, repr=False)  # where each key sits
    warnings: list[Problem] = Field(default_factory=list, exclude=True, repr=False)  # legal but suspicious values

    @property
    def method(self) -> Method:
        return METHODS[self.merge_method]

    @property
    def merge_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    @property
    def output_dtype(self) -> torch.dtype | None:
        return DTYPES[self.out_dtype] if self.out_dtype else self.merge_dtype

    @property
    def vocabulary_settings(self) -> TokenizerSettings | None:
        """The output vocabulary's settings: from `tokenizer:`, or `tokenizer_source` alone; None: no re-indexing
        (every model must then have the same vocabulary size)."""
        if self.tokenizer is not None:
            return self.tokenizer
        return TokenizerSettings(source=self.tokenizer_source) if self.tokenizer_source else None

    @property
    def base_joins_models(self) -> bool:
        """Whether the base model is an input beside the `models:` list (a method that takes a base, a base not
        listed among them)."""
        return bool(
            self.models
            and self.base_model
            and self.method.takes_base
            and self.base_model not in [m.model for m in self.models]
        )

    def where(self, *path: str | int) -> dict[str, Any]:
        """file/line/field keyword arguments for an error about `path`."""
        return {"file": self.source_file, "line": line_of(self.key_lines, path), "field": field_name(path)}

    def model_refs(self) -> list[str]:
        """Every model the recipe names, base first, without duplicates."""
        refs = [self.base_model] if self.base_model else []
        if self.models:
            refs += [m.model for m in self.models]
        for s in self.slices or []:
            refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        return list(dict.fromkeys(refs))


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file (schema, method, parameters, dtypes). Raises UserError listing every
    problem found, each with file, line and field. Reads no model."""
    text = read_text(path)
    data, lines = parse_yaml(text, path)
    return recipe_from_data(data, path, lines, text)


def recipe_from_data(data: Any, path: str | Path, lines: dict[Path_, int], text: str) -> Recipe:
    """Check a parsed recipe (`data`, from file `path` whose `lines` name where each key sits; `text` is what is
    copied into the output) as load_recipe does."""
    recipe = validate_model(Recipe, data, path, lines)
    assert isinstance(recipe, Recipe)
    recipe.source_file = Path(path)
    recipe.source_text = text
    recipe.key_lines = lines
    problems, recipe.warnings = check_recipe(recipe)
    if problems:
        raise UserError(problems=problems)
    return recipe


def check_recipe(r: Recipe) -> tuple[list[Problem], list[Problem]]:
    """Everything that can be checked without opening a model: (problems, warnings)."""
    out: list[Problem] = []
    warnings: list[Problem] = []

    def problem(message: str, *path: str | int) -> None:
        out.append(Problem(message, **r.where(*path)))

    if r.merge_method not in METHODS:
        problem(
            f"unknown merge method '{r.merge_method}'{did_you_mean(r.merge_method, METHODS)}; "
            f"known: {', '.join(METHODS)}",
            "merge_method",
        )
        return out, warnings
    method = r.method
    for key in ("dtype", "out_dtype"):
        value = getattr(r, key)
        if value is not None and value not in DTYPES:
            problem(f"unknown dtype '{value}'{did_you_mean(value, DTYPES)}; use bfloat16, float16 or float32", key)
    if bool(r.models) == bool(r.slices):
        problem("give either 'models' or 'slices' (exactly one of them)", "models" if r.models else "merge_method")
        return out, warnings
    for ref, path in _model_ref_paths(r):
        bad = model_ref_problem(ref)
        if bad:
            problem(bad, *path)
    out += _check_tokenizer(r)

    if r.layer_scaling is not None and method.param("lambda") is None:
        takers = [name for name, m in METHODS.items() if m.param("lambda") and not _scales_layers(m)]
        problem(
            f"lines scales a task-vector method's merged task vector; {method.name} has none "
            f"(use it with {', '.join(takers)})",
            "lines",
        )
    elif r.layer_scaling is not None and _scales_layers(method):
        problem(f"{method.name} scales its layers itself: set alpha and beta under 'parameters'", "lines")
    if r.chat_template and r.chat_template != "chatml" and "{" not in r.chat_template:
        problem("chat_template must be 'chatml' or a Jinja template string", "chat_template")
    if method.needs_base and not (r.base_model or (r.slices and all(s.base_model for s in r.slices))):
        problem(f"{method.name} needs a base_model", "merge_method")

    # inputs per output slice, for the method's input count
    groups: list[tuple[list[str], str | None, tuple]] = []
    if r.models:
        refs = [m.model for m in r.models] + ([r.base_model] if r.base_joins_models and r.base_model else [])
        groups.append((refs, r.base_model, ("models",)))
    for i, s in enumerate(r.slices or []):
        groups.append(([src.model for src in s.sources], s.base_model or r.base_model, ("slices", i, "sources")))
        lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
        if len(lengths) > 1:
            problem("all sources of a slice must span the same number of layers", "slices", i, "sources")
    for refs, _, path in groups:
        for index, ref in enumerate(refs):
            if ref in refs[:index]:
                item = (*path, index, "model") if path[-1] == "sources" else ("models", index, "model")
                problem(
                    f"model '{ref}' is listed twice here (first as item {refs.index(ref)}); list each input once", *item
                )
    for refs, base, path in groups:
        n = len(set(refs) - ({base} if method.takes_base else set()))
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            wanted = (
                f"exactly {method.min_models}"
                if method.min_models == method.max_models
                else f"{method.min_models} to {method.max_models}"
                if method.max_models and method.min_models > 1
                else f"at most {method.max_models}"
                if method.max_models
                else f"at least {method.min_models}"
            )
            besides = " besides the base" if method.takes_base else ""
            problem(f"{method.name} takes {wanted} model(s){besides}, got {n}", *path)
        if method.needs_base and base and base not in refs:
            problem(f"the base model '{base}' must be one of the inputs here", *path)

    # parameter names and value shapes, in every place parameters may be set
    for params, path, per_model in _parameter_blocks(r):
        for name, value in params.items():
            spec = method.param(name)
            where = (*path, name)
            if spec is None:
                known = [p.name for p in method.params]
                problem(
                    f"'{method.name}' has no parameter '{name}'{did_you_mean(name, known)}"
                    f" (it takes: {', '.join(known) or 'none'})",
                    *where,
                )
                continue
            if per_model and not spec.per_model:
                problem(
                    f"'{name}' applies to the whole merge; set it under the slice's or the global "
                    "'parameters', not a model's",
                    *where,
                )
                continue
            malformed = check_setting(value)
            if malformed:
                problem(malformed, *where)
                continue
            bad = _first_bad_value(value, spec.type)
            if spec.type is str and any(_is_gradient(v) for v in [value, *_filtered_values(value)]):
                bad = f"'{name}' is a path: one per model (or per filter), not a gradient"
            if bad:
                problem(bad, *where)
                continue
            if spec.bounds is None:
                continue
            outside = [v for v in _numbers(value) if not spec.bounds.contains(v)]
            if outside and spec.bounds.strict:
                problem(f"{name} must be in {spec.bounds}, got {outside[0]:g}", *where)
            elif outside:
                warnings.append(
                    Problem(
                        f"{name} = {outside[0]:g} is outside {spec.bounds} ({spec.doc}): the merge extrapolates",
                        **r.where(*where),
                    )
                )
    out += _check_required(r, method)
    return out, warnings


def _scales_layers(method: Method) -> bool:
    """Whether the method takes LiNeS's alpha and beta itself (the `lines` method)."""
    return any(p in method.params for p in LINES_PARAMS)


def model_ref_problem(ref: str) -> str | None:
    """Why `ref` cannot name a model (None if it can): an existing directory or a hub id, `+ADAPTER` optional."""
    if ref.count("+") > 1:
        return f"model '{ref}' has more than one '+' (a LoRA input is written BASE+ADAPTER)"
    base, adapter = split_adapter(ref)
    for part, what in ((base, "model"), (adapter, "adapter")):
        if part is not None and not (Path(part).expanduser().exists() or HUB_ID.match(part)):
            return f"{what} '{part}' is neither an existing directory nor a hub id (org/name[@revision])"
    return None


def _check_tokenizer(r: Recipe) -> list[Problem]:
    """tokenizer_source / tokenizer: one of them, sources that name the recipe's models."""
    if r.tokenizer_source and r.tokenizer:
        return [Problem("give tokenizer_source or tokenizer, not both", **r.where("tokenizer"))]
    settings = r.vocabulary_settings
    if settings is None:
        return []
    refs = r.model_refs()
    path = ("tokenizer", "source") if r.tokenizer else ("tokenizer_source",)
    out = []
    if settings.source not in ("union", "base", *refs):
        out.append(
            Problem(
                f"'{settings.source}' is not 'union', 'base' or one of the recipe's models"
                f"{did_you_mean(settings.source, ['union', 'base', *refs])}",
                **r.where(*path),
            )
        )
    for token, entry in (settings.tokens or {}).items():
        model = entry.source.model if isinstance(entry.source, ModelToken) else entry.source
        if isinstance(model, str) and model not in refs:
            where = ("tokenizer", "tokens", token, "source") + (
                ("model",) if isinstance(entry.source, ModelToken) else ()
            )
            out.append(Problem(f"model '{model}' is not one of the recipe's models", **r.where(*where)))
    return out


def _model_ref_paths(r: Recipe) -> list[tuple[str, tuple]]:
    found: list[tuple[str, tuple]] = []
    if r.base_model:
        found.append((r.base_model, ("base_model",)))
    for i, m in enumerate(r.models or []):
        found.append((m.model, ("models", i, "model")))
    for i, s in enumerate(r.slices or []):
        if s.base_model:
            found.append((s.base_model, ("slices", i, "base_model")))
        for j, src in enumerate(s.sources):
            found.append((src.model, ("slices", i, "sources", j, "model")))
    return found


def _parameter_blocks(r: Recipe) -> list[tuple[Parameters, tuple, bool]]:
    """(parameters, path, is a per-model block) for every parameters block of the recipe."""
    blocks: list[tuple[Parameters, tuple, bool]] = []
    if r.parameters:
        blocks.append((r.parameters, ("parameters",), False))
    for i, m in enumerate(r.models or []):
        if m.parameters:
            blocks.append((m.parameters, ("models", i, "parameters"), True))
    for i, s in enumerate(r.slices or []):
        if s.parameters:
            blocks.append((s.parameters, ("slices", i, "parameters"), False))
        for j, src in enumerate(s.sources):
            if src.parameters:
                blocks.append((src.parameters, ("slices", i, "sources", j, "parameters"), True))
    return blocks


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return _leaves(value["value"])
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _is_gradient(value: Any) -> bool:
    return isinstance(value, list) and not any(isinstance(v, dict) for v in value)


def _filtered_values(value: Any) -> list[Any]:
    """The `value`s of a {filter, value} list (or of one such entry)."""
    entries = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
    return [e["value"] for e in entries if isinstance(e, dict)]


def _first_bad_value(value: Any, kind: type) -> str | None:
    for leaf in _leaves(value):
        try:
            convert(leaf, kind)
        except ValueError as exc:
            return str(exc)
    return None


def _numbers(value: Any) -> list[float]:
    return [convert(leaf, float) for leaf in _leaves(value)]


def _check_required(r: Recipe, method: Method) -> list[Problem]:
    """A required parameter must be set somewhere that reaches every input that needs it."""
    out = []
    global_params = r.parameters or {}
    for spec in method.params:
        if spec.default is not REQUIRED:
            continue
        if not spec.per_model:
            slices = r.slices or [None]
            for i, s in enumerate(slices):
                if spec.name not in global_params and not (s and s.parameters and spec.name in s.parameters):
                    path = ("slices", i) if s else ("parameters",) if r.parameters else ("merge_method",)
                    out.append(
                        Problem(
                            f"{method.name} needs parameter '{spec.name}' (set it under 'parameters')", **r.where(*path)
                        )
                    )
            continue
        inputs: list[tuple[str, Parameters | None, Parameters | None, tuple, str | None]] = []
        for i, m in enumerate(r.models or []):
            inputs.append((m.model, m.parameters, None, ("models", i), r.base_model))
        for i, s in enumerate(r.slices or []):
            for j, src in enumerate(s.sources):
                inputs.append(
                    (src.model, src.parameters, s.parameters, ("slices", i, "sources", j), s.base_model or r.base_model)
                )
        for ref, own, slice_params, path, base in inputs:
            if ref == base and not spec.base_too:
                continue
            if not any(p and spec.name in p for p in (own, slice_params, global_params)):
                out.append(Problem(f"{method.name} needs parameter '{spec.name}' for model '{ref}'", **r.where(*path)))
    return out
