"""YAML loading that remembers where every key and list item sits, so errors can name the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from merge.errors import Problem, RecipeError, did_you_mean

Path_ = tuple[str | int, ...]


def load_yaml(path: str | Path) -> tuple[Any, dict[Path_, int]]:
    """Parse a YAML file; return (data, lines) where lines maps a key path such as ("models", 1, "model")
    to its 1-based line. Syntax errors become a RecipeError naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("file not found", file=path) from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read: {exc}", file=path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"invalid YAML: {reason}", file=path, line=line) from None
    if node is None:
        raise RecipeError("the file is empty", file=path)
    lines: dict[Path_, int] = {(): node.start_mark.line + 1}
    _record_lines(node, (), lines)
    data = yaml.safe_load(text)
    return data, lines


def _record_lines(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, lines)


def line_of(lines: dict[Path_, int], path: Path_) -> int | None:
    """The line of `path`, or of its nearest ancestor that has one."""
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


def field_name(path: Path_) -> str:
    """("models", 1, "parameters", "weight") -> "models[1].parameters.weight"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate_model(model: type[BaseModel], data: Any, file: str | Path, lines: dict[Path_, int]) -> BaseModel:
    """Validate `data` against a pydantic model; every error becomes a Problem with file, line and field."""
    if not isinstance(data, dict):
        raise RecipeError("expected a mapping of keys to values at the top level", file=file, line=1)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            if err["type"] == "extra_forbidden":
                key = str(loc[-1])
                known = _known_keys(model, loc[:-1])
                message = f"unknown key '{key}'{did_you_mean(key, known)}"
            elif err["type"] == "missing":
                message = "required but missing"
            else:
                message = err["msg"][0].lower() + err["msg"][1:]
            problems.append(Problem(message, file, line_of(lines, loc), field_name(loc)))
        raise RecipeError(problems=problems) from None


def _known_keys(model: type[BaseModel], loc: Path_) -> list[str]:
    """The field names of the pydantic model found at `loc` below `model` (for did-you-mean)."""
    import typing

    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return []
        current = _model_in(field.annotation, typing)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _model_in(annotation: Any, typing: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg, typing)
        if found is not None:
            return found
    return None
