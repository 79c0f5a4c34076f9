"""A recipe parameter's value for one tensor: filters, layer gradients, and precedence.

A setting is one of
  * a scalar                      -> that value everywhere;
  * a list of numbers (gradient)  -> interpolated piecewise-linearly over the layers of a slice: layer i of
                                     n sits at t = i/(n-1) (t = 1 when n == 1); embeddings, the final norm
                                     and lm_head sit at t = 0, i.e. they take the gradient's *first* value;
  * a list of {filter, value}     -> the first entry whose filter is a substring of the tensor name (or has
                                     no filter, or "*") gives the value; none matching falls through to the
                                     next, lower-precedence place the parameter is set.
Precedence: a source's parameters > its slice's parameters > the recipe's global `parameters`
(parameters shared by all inputs, like slerp's `t`, are read from the slice and the global ones only).
These are mergekit's rules, to the float.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

# Recipe numbers are applied in float32 arithmetic: they must be finite there, and not so small that they flush
# to zero (weights of 1e-320 would "normalise" to a division by zero).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38


def layer_position(index: int, num_layers: int) -> float:
    """Where layer `index` of a slice of `num_layers` sits on a gradient, in [0, 1]."""
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def check_setting(value: Any) -> str | None:
    """Why a parameter setting is malformed, or None when it is well formed."""
    if _is_scalar(value):
        return None
    if isinstance(value, list) and value:
        if all(_is_scalar(v) for v in value):
            return None
        for entry in value:
            if not isinstance(entry, dict):
                return "a list must be all numbers (a gradient) or all {filter, value} entries"
            unknown = set(entry) - {"filter", "value"}
            if unknown:
                return f"unknown key '{sorted(unknown)[0]}' in a filtered value (keys: filter, value)"
            if "value" not in entry:
                return "a filtered entry needs a 'value'"
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                return "a filter must be a string (a substring of tensor names)"
            inner = check_setting(entry["value"])
            if inner or isinstance(entry["value"], list) and not all(_is_scalar(v) for v in entry["value"]):
                return inner or "a filtered value must be a scalar or a gradient"
        return None
    if isinstance(value, dict):
        return check_setting([value])
    return "expected a scalar, a gradient list, or a list of {filter, value}" if value != [] else "empty list"


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool, str))


def evaluate(setting: Any, tensor_name: str, t: float, kind: type) -> Any:
    """The value of one well-formed setting for `tensor_name` at gradient position `t` (None: no filter matched)."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return convert(setting, kind)
    if all(_is_scalar(v) for v in setting):
        values = [convert(v, kind) for v in setting]
        if kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        value = (1 - frac) * values[i0] + frac * values[i1]
        return round(value) if kind is int else value
    for entry in setting:
        name_filter = entry.get("filter")
        if name_filter is None or name_filter == "*" or name_filter in tensor_name:
            return evaluate(entry["value"], tensor_name, t, kind)
    return None


def convert(value: Any, kind: type) -> Any:
    """YAML scalar -> float, int, bool or str (a path), as the parameter's type asks (strings like '1e-3' are
    numbers; an int parameter takes whole numbers, and a gradient of them is rounded to the nearest at each
    layer)."""
    if kind is str:  # a path: a file parameter (its tensors are read by the runner)
        if isinstance(value, str) and value.strip():
            return value
        raise ValueError(f"expected a path, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"expected true or false, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    if abs(number) > FLOAT32_MAX:
        raise ValueError(f"{value!r} is beyond float32's range (±3.4e38), in which merges compute")
    if 0 < abs(number) < FLOAT32_TINY:
        raise ValueError(f"{value!r} is too small for float32 arithmetic (use 0 or a number above 1.2e-38)")
    if kind is int:
        if not number.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        return int(number)
    return number


def resolve(name: str, kind: type, scopes: Iterable[Mapping[str, Any] | None], tensor_name: str, t: float) -> Any:
    """The first value a scope in `scopes` (highest precedence first) gives for `name`, or None."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t, kind)
            if value is not None:
                return value
    return None
