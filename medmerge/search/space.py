"""The search file: a recipe with ranges where numbers go, and a `search:` block that says how to search.

    merge_method: ties                      # or {choice: [ties, dare_ties]}
    base_model: models/base
    models:
      - model: models/parent_a
        parameters: {weight: {range: [0.1, 1.0]}, density: {range: [0.2, 1.0]}}
      - model: models/parent_b
        parameters: {weight: 0.5, density: {range: [0.2, 1.0]}}
    parameters:
      t: [0, {range: [0, 1]}, 1]             # a gradient entry; filters' `value:` take ranges too
    search:
      fitness: [{task: medmerge_mmlu_med_validation, metric: acc, weight: 1}]

`{range: [low, high]}` (a real number) and `{choice: [a, b, ...]}` (one of the values) may stand wherever a
parameter value goes (global, per slice, per model, per filter, gradient entries) and `choice` also for
`merge_method`. Either may carry `start: value` (the hand-picked setting): the search then scores that point
first and starts from it, so its result is measured against it. Everything else is an ordinary recipe; a point
of the space is checked exactly as a recipe file.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from medmerge.experiment import LmEvalSettings, MergeSettings
from medmerge_common.errors import UserError
from merge.recipe import Recipe, recipe_from_data
from merge.yamlfile import Path_, field_name, line_of, parse_yaml, read_text, validate_model

Value = float | str | bool | int | None
Point = dict[str, Value]  # dimension name -> value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FitnessTerm(_Strict):
    task: str  # an lm-eval task or group, on held-out data
    metric: str = "acc"
    weight: float = 1.0


class SearchSettings(_Strict):
    """The `search:` block (the README's "Searching merge parameters" lists every key)."""

    fitness: list[FitnessTerm] = Field(min_length=1)
    optimizer: Literal["cma", "tpe"] = "cma"
    trials: int | None = Field(default=None, gt=0)  # budget in trials ...
    time_budget: str | float | None = None  # ... and/or wall time: seconds, or "90s", "30m", "2h"
    seed: int = 0
    batch: int | None = Field(default=None, gt=0)  # trials asked (and run side by side) at a time
    sigma: float = Field(default=0.25, gt=0, le=1)  # CMA-ES's first step, as a fraction of each range
    fewshot_set: int = 1
    test_tasks: list[str] = Field(default_factory=list)  # the final comparison against the parents
    data_dir: str | None = None  # a dataset mirror (MEDMERGE_DATA_DIR), relative to the search file
    workers: int = Field(default=1, gt=0)  # model copies evaluating trials side by side (Ray when more than one)
    cache_inputs: bool = False  # keep the parents' tensors in memory (merge dtype, merge device) between trials
    merge: MergeSettings = Field(default_factory=MergeSettings)
    lm_eval: LmEvalSettings = Field(default_factory=LmEvalSettings)


@dataclass(frozen=True)
class Dimension:
    """One searched value: a real range or a list of choices, at `path` in the recipe."""

    path: Path_
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Value, ...] = ()
    start: Value = None  # the hand-picked value the search starts from (None: the middle)

    @property
    def name(self) -> str:
        return field_name(self.path)

    def from_unit(self, u: float) -> Value:
        """The value at u in [0, 1] (CMA-ES searches the unit cube): linear in a range, equal slices for choices."""
        u = min(max(u, 0.0), 1.0)
        if self.choices:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        return self.low + u * (self.high - self.low)

    def to_unit(self, value: Value) -> float:
        """Where `value` lies in [0, 1]: from_unit's inverse (a choice: the middle of its slice)."""
        if self.choices:
            return (self.choices.index(value) + 0.5) / len(self.choices)
        assert isinstance(value, int | float)
        return (float(value) - self.low) / (self.high - self.low)

    def starting_value(self) -> Value:
        return self.from_unit(0.5) if self.start is None else self.start

    def corners(self) -> list[Value]:
        """The values a whole range is checked at: both ends, or every choice."""
        return list(self.choices) if self.choices else [self.low, self.high]


@dataclass
class SearchSpace:
    file: Path
    text: str
    data: dict[str, Any]  # the recipe part, ranges in place
    lines: dict[Path_, int]
    dimensions: list[Dimension]
    settings: SearchSettings

    @property
    def start(self) -> Point | None:
        """The hand-picked point (every `start:` given, the middle elsewhere), or None if no range gives one."""
        if all(d.start is None for d in self.dimensions):
            return None
        return {d.name: d.starting_value() for d in self.dimensions}

    def recipe_data(self, point: Point) -> dict[str, Any]:
        data = copy.deepcopy(self.data)
        for dim in self.dimensions:
            _set(data, dim.path, point[dim.name])
        return data

    def recipe(self, point: Point) -> Recipe:
        """The recipe at `point`, checked as a recipe file is; errors name the search file's lines."""
        return recipe_from_data(self.recipe_data(point), self.file, self.lines, self.recipe_text(point))

    def recipe_text(self, point: Point, header: str = "") -> str:
        body = yaml.safe_dump(self.recipe_data(point), sort_keys=False, allow_unicode=True)
        return "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + body

    def where(self, *path: str | int) -> dict[str, Any]:
        return {"file": self.file, "line": line_of(self.lines, path), "field": field_name(path)}


def load_search(path: str | Path) -> SearchSpace:
    """Read and check a search file: its settings, every range, and the recipe at every range's ends (so a bound
    the method refuses fails now, naming its line)."""
    path = Path(path)
    text = read_text(path)
    data, lines = parse_yaml(text, path)
    if not isinstance(data, dict):
        raise UserError("expected a recipe with a 'search:' block", file=path, line=1)
    if "search" not in data:
        raise UserError("no 'search:' block (fitness, optimizer, budget): see `medmerge search --help`", file=path)
    search_lines = {key[1:]: line for key, line in lines.items() if key[:1] == ("search",)}
    if not isinstance(data["search"], dict):
        raise UserError("'search' must be a mapping", **_where(path, lines, "search"))
    settings = validate_model(SearchSettings, data["search"], path, search_lines)
    assert isinstance(settings, SearchSettings)
    if settings.time_budget is not None:
        seconds(settings.time_budget, path, lines)
    if settings.lm_eval.model != "hf":
        raise UserError(
            f"a search scores its trials in memory through lm-eval's hf model, not '{settings.lm_eval.model}'",
            **_where(path, lines, "search", "lm_eval", "model"),
        )
    recipe_part = {key: value for key, value in data.items() if key != "search"}
    dimensions = [_dimension(value, where, path, lines) for where, value in _searched(recipe_part, ())]
    if not dimensions:
        raise UserError(
            "nothing to search: put {range: [low, high]} or {choice: [...]} where a parameter's value goes",
            file=path,
        )
    space = SearchSpace(path, text, recipe_part, lines, dimensions, settings)
    first = space.start or {d.name: d.from_unit(0.5) for d in dimensions}
    space.recipe(first)  # the space as a whole, once; then every end of every range
    for dim in dimensions:
        for value in dim.corners():
            try:
                space.recipe(first | {dim.name: value})
            except UserError as error:
                for problem in error.problems:
                    problem.message += f" (with {dim.name} = {value}, an end of its searched range)"
                raise UserError(problems=error.problems) from None
    return space


def seconds(budget: str | float, file: Path, lines: dict[Path_, int]) -> float:
    """A wall-time budget in seconds: a number, or '90s', '30m', '2h'."""
    if isinstance(budget, int | float):
        value = float(budget)
    else:
        units = {"s": 1, "m": 60, "h": 3600}
        text = budget.strip()
        try:
            value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
        except ValueError:
            value = math.nan
    if not value > 0 or math.isinf(value):
        raise UserError(
            f"time_budget '{budget}' is not a positive duration (seconds, or like 90s, 30m, 2h)",
            **_where(file, lines, "search", "time_budget"),
        )
    return value


def _where(file: Path, lines: dict[Path_, int], *path: str | int) -> dict[str, Any]:
    return {"file": file, "line": line_of(lines, path), "field": field_name(path)}


def _is_searched(value: Any) -> bool:
    return isinstance(value, dict) and len(value.keys() & {"range", "choice"}) == 1


def _searched(value: Any, path: Path_) -> Iterator[tuple[Path_, Any]]:
    """Every {range: ...} / {choice: ...} node in the recipe data, with its path."""
    if _is_searched(value):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _searched(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _searched(item, (*path, index))


def _dimension(node: dict[str, Any], path: Path_, file: Path, lines: dict[Path_, int]) -> Dimension:
    where = _where(file, lines, *path)
    if path != ("merge_method",) and "parameters" not in path and path[:1] != ("lines",):
        raise UserError(
            "only parameter values, lines' alpha and beta (and merge_method, as a choice) can be searched", **where
        )
    kind = "choice" if "choice" in node else "range"
    unknown = sorted(set(node) - {kind, "start"}, key=str)
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}' beside {kind} (a searched value takes {kind} and start)", **where)
    spec, start = node[kind], node.get("start")
    start_where = _where(file, lines, *path, "start") if "start" in node else where
    if "start" in node and start is None:
        raise UserError("start needs a value (or leave it out: the search starts in the middle)", **start_where)
    if kind == "choice":
        if not isinstance(spec, list) or len(spec) < 2 or any(isinstance(v, dict | list) for v in spec):
            raise UserError("choice takes a list of at least two plain values", **where)
        if len(set(map(repr, spec))) < len(spec):
            raise UserError("choice lists a value twice", **where)
        if start is not None and start not in spec:
            raise UserError(f"start {start!r} is not one of the choices {spec}", **start_where)
        return Dimension(path, choices=tuple(spec), start=start)
    if path == ("merge_method",):
        raise UserError("merge_method is searched as {choice: [method, ...]}, not a range", **where)
    numbers = spec if isinstance(spec, list) and len(spec) == 2 and all(_is_number(v) for v in spec) else None
    if numbers is None:
        raise UserError("range takes two numbers: {range: [low, high]}", **where)
    low, high = (float(v) for v in numbers)
    if not low < high:
        raise UserError(f"range [{low:g}, {high:g}]: low must be below high", **where)
    if start is not None and not (_is_number(start) and low <= start <= high):
        raise UserError(f"start {start!r} is not a number in the range [{low:g}, {high:g}]", **start_where)
    return Dimension(path, low=low, high=high, start=None if start is None else float(start))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _set(data: Any, path: Path_, value: Value) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value
