"""Lazy, header-first access to a model directory's weights.

Safetensors files are indexed from their JSON headers alone (shapes and dtypes are known before any
weight is read) and each tensor is read with one positioned file read, so memory holds only what the
current merge step needs. `.bin` checkpoints are opened with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.errors import RecipeError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `dtype` and `shape` takes on disk."""
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. `offset` is absolute in `file`; None for `.bin` and header-only entries."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str
    offset: int | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise RecipeError("not a safetensors file (too short)", file=path)
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise RecipeError("not a safetensors file (implausible header size)", file=path)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RecipeError("not a safetensors file (unreadable header)", file=path) from None
    return tensors_from_header(header, path.name, data_start=8 + length)


def tensors_from_header(header: dict[str, Any], file: str, data_start: int | None) -> dict[str, TensorInfo]:
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise RecipeError(f"tensor '{name}' has dtype {entry['dtype']}, which medmerge cannot merge", file=file)
        offset = None if data_start is None else data_start + entry["data_offsets"][0]
        out[name] = TensorInfo(name, dtype, tuple(entry["shape"]), file, offset)
    return out


class Checkpoint:
    """One model: its config and a name -> TensorInfo index, with tensors read on demand."""

    def __init__(self, ref: str, directory: Path | None, config: dict[str, Any], tensors: dict[str, TensorInfo]):
        self.ref = ref
        self.directory = directory
        self.config = config
        self.tensors = tensors
        self._files: dict[str, Any] = {}
        self._bin_state: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, ref: str, directory: Path) -> Checkpoint:
        """Index a local model directory from config.json and the weight files' headers."""
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise RecipeError(f"model '{ref}' has no config.json in {directory}")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise RecipeError(f"invalid JSON: {exc}", file=config_path) from None
        return cls(ref, directory, config, index_weights(ref, directory))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor from disk (optionally cast to `dtype`)."""
        info = self.tensors[name]
        if self.directory is None:
            raise RuntimeError(f"{self.ref} was opened from headers only")
        if info.offset is None:
            tensor = self._bin(info.file)[name]
            tensor = tensor.to(dtype) if dtype is not None else tensor.clone()
            return tensor
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(self.directory / info.file, "rb")  # noqa: SIM115
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        f.seek(info.offset)
        if f.readinto(buffer.numpy()) != info.nbytes:
            raise RecipeError(f"tensor '{name}' is truncated", file=self.directory / info.file)
        tensor = buffer.view(info.dtype).reshape(info.shape)
        return tensor.to(dtype) if dtype is not None and dtype != info.dtype else tensor

    def _bin(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._bin_state:
            path = self.directory / file  # type: ignore[operator]
            try:
                self._bin_state[file] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                self._bin_state[file] = torch.load(path, map_location="cpu", weights_only=True)
        return self._bin_state[file]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._bin_state.clear()


def index_weights(ref: str, directory: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo for every weight of a model directory (safetensors preferred over .bin)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            break
    else:
        if (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        elif (directory / "pytorch_model.bin").is_file():
            files = ["pytorch_model.bin"]
        else:
            raise RecipeError(f"model '{ref}' has no weights (model.safetensors or pytorch_model.bin) in {directory}")
    out: dict[str, TensorInfo] = {}
    for file in files:
        path = directory / file
        if not path.is_file():
            raise RecipeError(f"model '{ref}' is missing weight file {file}", file=directory)
        if file.endswith(".safetensors"):
            out.update(read_safetensors_header(path))
        else:
            state = torch.load(path, map_location="meta", weights_only=True)
            out.update({n: TensorInfo(n, t.dtype, tuple(t.shape), file) for n, t in state.items()})
    return out
