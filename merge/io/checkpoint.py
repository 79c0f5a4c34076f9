"""Lazy, header-first access to a model directory's weights.

Safetensors files are indexed from their JSON headers alone (shapes and dtypes are known before any
weight is read) and each tensor is read on its own, so memory holds only what the current merge step needs:
a tensor of MAP_FROM bytes or more is a private (copy-on-write) mapping of the file's pages, faulted in by
the reading thread and unmapped when the tensor is freed; smaller ones, and any a mapping cannot hold, come
with one positioned read. `.bin` checkpoints are opened with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import pickle
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medmerge_common.errors import UserError

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
# Mapping instead of copying saves the page-cache copy and the fresh pages it lands in: a model_stock merge of the
# 0.89B benchmark spent 23% of its CPU samples in the read copy and its page faults (5.9-6.6 -> 5.5 s, sys time
# 3.4-4.0 -> 2.3 s). Below 256 KiB a read costs less than setting up a mapping.
MAP_FROM = 256 << 10
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; older kernels fault pages in on use


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


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the merge will write: known from the plan before any weight is read."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Index one safetensors file from its header, validated as strictly as the safetensors library does."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise UserError("not a safetensors file (too short)", file=path)
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER_BYTES or 8 + length > file_size:
                raise UserError("not a safetensors file (implausible header size)", file=path)
            header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError("not a safetensors file (unreadable header)", file=path) from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror or exc}", file=path) from None
    return tensors_from_header(header, path, data_start=8 + length, data_size=file_size - 8 - length)


def tensors_from_header(
    header: Any, file: str | Path, data_start: int | None, data_size: int | None = None
) -> dict[str, TensorInfo]:
    """TensorInfo per tensor of a safetensors header, after the checks the safetensors library makes: a JSON
    object of {dtype, shape, data_offsets} entries whose offsets match dtype x shape and tile the data area
    exactly (no gaps, no overlaps; it ends where the file ends when `data_size` is known). A header that lies
    about where a tensor is would otherwise merge another tensor's bytes."""
    if not isinstance(header, dict):
        raise UserError("not a safetensors file (the header is not a JSON object)", file=file)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError("safetensors __metadata__ must map names to strings", file=file)
    out = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue

        def bad(why: str, name: str = name) -> UserError:
            return UserError(f"tensor '{name}' has an invalid header entry: {why}", file=file)

        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise bad("it needs dtype, shape and data_offsets")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(shape, (list, tuple)) or not all(_natural(d) for d in shape):
            raise bad(f"shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, (list, tuple)) and len(offsets) == 2 and all(map(_natural, offsets))):
            raise bad(f"data_offsets {offsets!r} are not two non-negative integers")
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise UserError(f"tensor '{name}' has dtype {dtype_name}, which medmerge cannot merge", file=file)
        begin, end = offsets
        if end - begin != tensor_nbytes(dtype, tuple(shape)):
            raise bad(
                f"data_offsets span {end - begin} bytes, but {dtype_name} {shape} takes "
                f"{tensor_nbytes(dtype, tuple(shape))}"
            )
        spans.append((begin, end, name))
        offset = None if data_start is None else data_start + begin
        out[name] = TensorInfo(name, dtype, tuple(shape), Path(file).name, offset)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            why = "overlaps another tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise UserError(f"tensor '{name}' has an invalid header entry: its data {why}", file=file)
        position = end
    if data_size is not None and position != data_size:
        raise UserError(
            f"the header describes {position} bytes of tensor data, but the file holds {data_size}", file=file
        )
    return out


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Checkpoint:
    """One model: its config and a name -> TensorInfo index, with tensors read on demand."""

    def __init__(self, ref: str, directory: Path | None, config: dict[str, Any], tensors: dict[str, TensorInfo]):
        self.ref = ref
        self.directory = directory
        self.config = config
        self.tensors = tensors
        self._files: dict[str, Any] = {}
        self._bin_state: dict[str, dict[str, torch.Tensor]] = {}
        self._opening = threading.Lock()  # reads are positioned, so threads share the open files

    @property
    def directories(self) -> list[Path]:
        """The local directories this model is read from (none when opened from hub headers)."""
        return [self.directory] if self.directory is not None else []

    @classmethod
    def open(cls, ref: str, directory: Path) -> Checkpoint:
        """Index a local model directory from config.json and the weight files' headers."""
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise UserError(f"model '{ref}' has no config.json in {directory}")
        return cls(ref, directory, read_json_object(config_path), index_weights(ref, directory))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor from disk (optionally cast to `dtype`)."""
        info = self.tensors[name]
        if self.directory is None:
            raise RuntimeError(f"{self.ref} was opened from headers only")
        if info.offset is None:
            tensor = self._bin(info.file)[name]
            tensor = tensor.to(dtype) if dtype is not None else tensor.clone()
            return tensor
        try:
            with self._opening:
                f = self._files.get(info.file)
                if f is None:
                    f = self._files[info.file] = open(self.directory / info.file, "rb")  # noqa: SIM115
            if os.fstat(f.fileno()).st_size < info.offset + info.nbytes:
                raise UserError(f"tensor '{name}' is truncated", file=self.directory / info.file)
            buffer = _mapped(f.fileno(), info.offset, info.nbytes, info.dtype.itemsize)
            if buffer is None:  # a positioned read into new memory
                buffer = torch.empty(info.nbytes, dtype=torch.uint8)
                if not _read_at(f.fileno(), memoryview(buffer.numpy()), info.offset):
                    raise UserError(f"tensor '{name}' is truncated", file=self.directory / info.file)
        except OSError as exc:
            raise UserError(
                f"cannot read tensor '{name}': {exc.strerror or exc}", file=self.directory / info.file
            ) from None
        tensor = buffer.view(info.dtype).reshape(info.shape)
        return tensor.to(dtype) if dtype is not None and dtype != info.dtype else tensor

    def _bin(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._bin_state:
            path = self.directory / file  # type: ignore[operator]
            try:
                self._bin_state[file] = load_state_dict(path, mmap=True)
            except UserError:
                raise
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                self._bin_state[file] = load_state_dict(path)
        return self._bin_state[file]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._bin_state.clear()


def _mapped(fd: int, offset: int, nbytes: int, itemsize: int) -> torch.Tensor | None:
    """The bytes [offset, offset + nbytes) of file `fd` as a uint8 tensor over a private mapping of the page cache
    (writes to it stay in this process), its pages faulted in now, read-only until written (MADV_POPULATE_READ:
    the reading thread pays for the faults, and a cold file is read from disk there, ahead of the compute);
    None where a mapping cannot hold them (small, misaligned for the dtype, no POSIX mmap, a file system that
    refuses). The file must not be truncated while the tensor lives (a mapping would fault, SIGBUS)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    if nbytes < MAP_FROM or (offset - start) % itemsize or not hasattr(mmap, "MAP_PRIVATE"):
        return None
    try:
        mapping = mmap.mmap(
            fd, offset - start + nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start
        )
    except OSError:
        return None
    with contextlib.suppress(OSError):  # before Linux 5.14 the pages fault in as they are used
        mapping.madvise(MADV_POPULATE_READ, offset - start - (offset - start) % mmap.PAGESIZE)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset - start)


def _read_at(fd: int, buffer: memoryview, offset: int) -> bool:
    """Fill `buffer` from `offset` of file `fd` with positioned reads (no shared file position, so threads may read
    one file at once); False if the file ends first."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            return False
        done += n
    return True


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, adapter_config.json)."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"invalid JSON: {exc}", file=path) from None
    if not isinstance(value, dict):
        raise UserError(f"{path.name} must be a JSON object", file=path)
    return value


def config_int(config: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` that a model config holds as an integer, at its top level or in its `text_config`
    (multimodal models keep the language model's sizes there)."""
    for key in keys:
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return config_int(text, *keys) if isinstance(text, dict) else None


def load_state_dict(path: Path, *, map_location: str = "cpu", mmap: bool = False) -> dict[str, torch.Tensor]:
    """A `.bin` state dict through torch's weights-only unpickler; anything else in the pickle is refused, and
    never loaded with the unsafe unpickler."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(
            "not a plain state dict (it holds pickled Python objects), so it was not loaded; "
            "convert it to safetensors where you trust its origin",
            file=path,
        ) from None
    except (EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"not a readable PyTorch checkpoint ({type(exc).__name__})", file=path) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("not a state dict of tensors", file=path)
    return state


def index_weights(ref: str, directory: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo for every weight of a model directory (safetensors preferred over .bin)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            weight_map = _weight_map(index_path)
            files = sorted(set(weight_map.values()))
            break
    else:
        weight_map = {}
        if (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        elif (directory / "pytorch_model.bin").is_file():
            files = ["pytorch_model.bin"]
        else:
            raise UserError(f"model '{ref}' has no weights (model.safetensors or pytorch_model.bin) in {directory}")
    out: dict[str, TensorInfo] = {}
    for file in files:
        path = directory / file
        if not path.is_file():
            raise UserError(f"model '{ref}' is missing weight file {file}", file=directory)
        found = index_file(path)
        for name in found.keys() & out.keys():
            raise UserError(f"tensor '{name}' is stored twice ({out[name].file} and {file})", file=directory)
        out.update(found)
    for name, file in weight_map.items():
        if name not in out or out[name].file != file:
            where = f"is in {out[name].file}" if name in out else "is in no weight file"
            raise UserError(f"the index puts tensor '{name}' in {file}, but it {where}", file=index_path)
    return out


def index_file(path: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo for one weight file: a safetensors header, or a `.bin` loaded onto the meta device."""
    if path.name.endswith(".safetensors"):
        return read_safetensors_header(path)
    return {
        n: TensorInfo(n, t.dtype, tuple(t.shape), path.name)
        for n, t in load_state_dict(path, map_location="meta").items()
    }


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's tensor -> file map; every file a plain name inside the model directory."""
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError("not a weight index (a JSON object with a weight_map)", file=index_path) from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError("weight_map is missing or empty", file=index_path)
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
            raise UserError(
                f"weight_map names {file!r} for '{name}': not a file name in the model directory", file=index_path
            )
    return weight_map
