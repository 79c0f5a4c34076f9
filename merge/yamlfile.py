"""YAML loading that remembers where every key and list item sits, so errors can name the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from medmerge_common.errors import Problem, UserError, did_you_mean

Path_ = tuple[str | int, ...]


# YAML tags a recipe may use: the plain scalars, mappings, sequences and merge keys (`<<: *anchor`). Anything
# else (`!!python/object`, `!custom`, `!!binary`, ...) is refused rather than constructed.
ALLOWED_TAGS = {
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "map", "seq", "merge", "timestamp")
}
MAX_NODES = 100_000  # after alias expansion: a 1 KB "billion laughs" file stops here, in milliseconds
MAX_DEPTH = 64


def load_yaml(path: str | Path) -> tuple[Any, dict[Path_, int]]:
    """Read and parse a YAML file: see :func:`parse_yaml`."""
    return parse_yaml(read_text(path), path)


def read_text(path: str | Path) -> str:
    """A file's text; a missing or unreadable file is a UserError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("file not found", file=path) from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise UserError(f"cannot read: {exc}", file=path) from None


def parse_yaml(text: str, path: str | Path) -> tuple[Any, dict[Path_, int]]:
    """Parse the YAML text of file `path`; return (data, lines) where lines maps a key path such as
    ("models", 1, "model") to its 1-based line. Syntax errors, duplicate keys, tags other than plain data, alias
    cycles, and alias expansions beyond MAX_NODES become a UserError naming the line."""
    path = Path(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"invalid YAML: {reason}", file=path, line=line) from None
    except RecursionError:
        raise UserError(f"invalid YAML: nested deeper than {MAX_DEPTH} levels", file=path) from None
    if node is None:
        raise UserError("the file is empty", file=path)
    _check_nodes(node, path)
    lines: dict[Path_, int] = {(): node.start_mark.line + 1}
    _record_lines(node, (), lines)
    try:
        data = yaml.SafeLoader("").construct_document(node)
    except yaml.YAMLError as exc:  # e.g. a merge key (<<) whose value is not a mapping
        mark = getattr(exc, "problem_mark", None)
        raise UserError(
            f"invalid YAML: {getattr(exc, 'problem', exc)}", file=path, line=mark.line + 1 if mark else None
        ) from None
    return data, lines


def _check_nodes(root: yaml.Node, file: Path) -> None:
    """Refuse what yaml.safe_load would accept but a recipe must not contain: tags that are not plain data,
    duplicate keys (YAML keeps the last one silently), aliases that contain themselves, nesting beyond
    MAX_DEPTH and alias expansions beyond MAX_NODES nodes. Sizes are memoised per node, so the check is
    linear in the file, not in its expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def fail(message: str, node: yaml.Node) -> None:
        raise UserError(message, file=file, line=node.start_mark.line + 1)

    def size(node: yaml.Node, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            fail("an alias refers to the anchor that contains it (a cycle)", node)
        if depth > MAX_DEPTH:
            fail(f"nested deeper than {MAX_DEPTH} levels", node)
        if node.tag not in ALLOWED_TAGS:
            fail(f"YAML tag '{node.tag.replace('tag:yaml.org,2002:', '!!')}' is not allowed in a recipe", node)
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        fail(f"duplicate key '{key.value}' (first on line {seen[key.value]})", key)
                    seen[key.value] = key.start_mark.line + 1
                total += size(key, depth + 1) + size(value, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item, depth + 1) for item in node.value)
        open_nodes.discard(id(node))
        if total > MAX_NODES:
            fail(f"the document expands to more than {MAX_NODES} values (aliases repeated too often)", node)
        sizes[id(node)] = total
        return total

    size(root, 0)


def _record_lines(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # a complex key: schema validation names it
                continue
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
        raise UserError("expected a mapping of keys to values at the top level", file=file, line=1)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = _data_path(data, err["loc"])
            if err["type"] == "extra_forbidden":
                key = str(loc[-1])
                known = _known_keys(model, loc[:-1])
                message = f"unknown key '{key}'{did_you_mean(key, known)}"
            elif err["type"] == "missing":
                message = "required but missing"
            else:
                message = err["msg"][0].lower() + err["msg"][1:]
            problems.append(Problem(message, file, line_of(lines, loc), field_name(loc)))
        raise UserError(problems=problems) from None


def _data_path(data: Any, loc: tuple[str | int, ...]) -> Path_:
    """The part of a pydantic error location that names places in `data`. The location also holds union tags
    ('list[float]', 'int', ...), which a user's own key could look like, so they are told apart by walking the data:
    a part is kept where the data has it, or where it is the last part and names a key missing from a mapping."""
    path: list[str | int] = []
    for index, part in enumerate(loc):
        found = (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        )
        if found:
            data = data[part]  # type: ignore[index]
        elif not (isinstance(data, dict) and index == len(loc) - 1):
            continue
        path.append(part)
    return tuple(path)


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
