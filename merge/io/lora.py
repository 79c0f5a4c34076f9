"""`model: BASE+ADAPTER`: a PEFT LoRA adapter applied to its base tensor by tensor, as the merge reads it.

The adapter (adapter_config.json + adapter_model.safetensors or .bin) is indexed and checked against the
base's tensor shapes when the model is opened; `read` then returns the base tensor with the adapter's change,
so the adapted model is never loaded whole nor written to disk. The arithmetic is PEFT's `merge_and_unload`
(what mergekit runs before merging), element for element.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medmerge_common.errors import UserError
from merge.io.checkpoint import Checkpoint, TensorInfo, index_file, read_json_object

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
PREFIX = "base_model.model."
# adapter options that change what merging means; refused rather than ignored
UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vectors",
    "lora_bias": "LoRA biases",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token indices",
}


def split_adapter(ref: str) -> tuple[str, str | None]:
    """'org/base+path/to/lora' -> ('org/base', 'path/to/lora'); a reference without '+' has no adapter."""
    base, plus, adapter = ref.partition("+")
    return base, (adapter if plus else None)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, transpose: bool) -> torch.Tensor:
    """The low-rank change of one weight (Hu et al. 2021, https://arxiv.org/abs/2106.09685):

        ΔW = s · B A,   B: [out, r], A: [r, in],   s = α / r   (rank-stabilised, Kalajdzievski 2023: s = α / √r)

    transposed for layers that store W as [in, out] (`fan_in_fan_out`, and embeddings, whose A is [r, vocab]).
    Half-precision factors are multiplied in float32, as PEFT does on CPU."""
    a = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    b = b.float() if b.dtype in (torch.float16, torch.bfloat16) else b
    product = b @ a
    return (product.T if transpose else product) * scaling


@dataclass(frozen=True)
class Change:
    """What the adapter does to one base tensor: replace it (a saved module or base layer), add B A, or both."""

    replacement: str | None = None  # adapter tensor that replaces the base tensor first
    a: str | None = None
    b: str | None = None
    scaling: float = 0.0
    transpose: bool = False
    embedding: bool = False


class AdaptedCheckpoint(Checkpoint):
    """A base checkpoint seen through a LoRA adapter: same names, shapes and dtypes, adapted values."""

    def __init__(self, ref: str, base: Checkpoint, adapter: Checkpoint, changes: dict[str, Change]):
        super().__init__(ref, base.directory, base.config, base.tensors)
        self.base = base
        self.adapter = adapter
        self.changes = changes

    @property
    def directories(self) -> list[Path]:
        return self.base.directories + self.adapter.directories

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = self.base.read(name)
        change = self.changes.get(name)
        if change is not None:
            stored = weight.dtype
            if change.replacement is not None:
                weight = self.adapter.read(change.replacement).to(stored)
            if change.a is not None and change.b is not None:
                delta = lora_delta(
                    self.adapter.read(change.a), self.adapter.read(change.b), change.scaling, change.transpose
                )
                # as PEFT merges: a linear layer's W += ΔW is computed in float32 and rounded once to W's dtype;
                # an embedding's ΔW is rounded to W's dtype first, then added in that dtype
                if change.embedding:
                    delta = delta.to(stored)
                weight = (weight.to(torch.promote_types(stored, delta.dtype)) + delta).to(stored)
        return weight.to(dtype) if dtype is not None and dtype != weight.dtype else weight

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def adapt(ref: str, base: Checkpoint, adapter_dir: Path) -> AdaptedCheckpoint:
    """Index the adapter in `adapter_dir` and check every tensor it changes against `base`."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"model '{ref}': {adapter_dir} is not a PEFT adapter (it has no adapter_config.json)")
    config = read_json_object(config_path)
    _check_config(config, config_path)
    weights_file = _weights_file(ref, adapter_dir)
    adapter = Checkpoint(ref, adapter_dir, config, index_file(weights_file))
    changes = _changes(config, adapter, base, weights_file)
    return AdaptedCheckpoint(ref, base, adapter, changes)


def _check_config(config: dict[str, Any], path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{config.get('peft_type')!r}: medmerge applies LoRA adapters only",
            file=path,
            field="peft_type",
        )
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise UserError(f"{what} cannot be merged by medmerge yet", file=path, field=key)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise UserError(f"must be a positive integer, got {r!r}", file=path, field="r")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise UserError(f"must be a number, got {alpha!r}", file=path, field="lora_alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in pattern.values()
        ):
            raise UserError("must map module patterns to positive numbers", file=path, field=key)


def _weights_file(ref: str, adapter_dir: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise UserError(f"model '{ref}': the adapter in {adapter_dir} has no adapter_model.safetensors or .bin")


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's per-module override: the first pattern that matches the end of the module's dotted name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


LOW_RANK = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def _changes(config: dict[str, Any], adapter: Checkpoint, base: Checkpoint, weights_file: Path) -> dict[str, Change]:
    """Every base tensor the adapter changes, checked against the base's names, shapes and dtypes."""
    if not adapter.tensors:
        raise UserError("the adapter holds no tensors", file=weights_file)

    def fail(message: str) -> UserError:
        return UserError(f"{message} (adapter for '{base.ref}')", file=weights_file)

    def target_info(name: str, key: str) -> TensorInfo:
        info = base.tensors.get(name)
        if info is None:
            raise fail(f"tensor '{key}' changes '{name}', which the base model does not have")
        if not info.dtype.is_floating_point:
            raise fail(f"tensor '{key}' changes '{name}', which is not a floating-point tensor")
        return info

    factors: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key, info in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise fail(f"tensor '{key}' is not named as PEFT names adapter tensors ({PREFIX}...)")
        name = key.removeprefix(PREFIX)
        found = LOW_RANK.match(name)
        if found:
            factors.setdefault(found["module"], {})[found["kind"]] = key
            continue
        if "lora_" in name:
            raise fail(f"tensor '{key}' is a kind of LoRA tensor medmerge does not know")
        target = name.replace(".base_layer.", ".")  # PEFT saves the embedding it resized as `<module>.base_layer.*`
        target_info(target, key)
        if base.tensors[target].shape != info.shape:
            raise fail(
                f"tensor '{key}' is {list(info.shape)}, but the base's '{target}' is {list(base.tensors[target].shape)}"
            )
        replaced[target] = key

    r, alpha = config["r"], config["lora_alpha"]
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    changes = {target: Change(replacement=key) for target, key in replaced.items()}
    for module, kinds in factors.items():
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_kind not in kinds or b_kind not in kinds:
            raise fail(f"module '{module}' has {' and '.join(sorted(kinds))} but not both A and B")
        target = f"{module}.weight"
        shape = target_info(target, kinds[a_kind]).shape
        rank = int(_pattern_value(config.get("rank_pattern") or {}, module, r))
        a_shape, b_shape = adapter.tensors[kinds[a_kind]].shape, adapter.tensors[kinds[b_kind]].shape
        transpose = embedding or fan_in_fan_out
        out_features, in_features = (shape[::-1] if transpose else shape) if len(shape) == 2 else (-1, -1)
        if a_shape != (rank, in_features) or b_shape != (out_features, rank):
            raise fail(
                f"module '{module}': A {list(a_shape)} and B {list(b_shape)} do not fit the base's "
                f"'{target}' {list(shape)} at rank {rank}"
                + (" (fan_in_fan_out)" if fan_in_fan_out and not embedding else "")
            )
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        scaling = module_alpha / math.sqrt(rank) if config.get("use_rslora") else module_alpha / rank
        changes[target] = Change(replaced.get(target), kinds[a_kind], kinds[b_kind], scaling, transpose, embedding)
    return changes
