"""merge/io/checkpoint.py reads each safetensors tensor as safetensors does, by mapping (large tensors) or by a
positioned read (small ones, misaligned ones, where mapping is refused); a mapped tensor is private to the
process, outlives the checkpoint, and a file truncated after it was indexed is one clear error."""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmerge_common.errors import UserError
from merge.io import checkpoint
from merge.io.checkpoint import Checkpoint, index_weights


def model_dir(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text("{}")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    big = checkpoint.MAP_FROM // 2 + 4097  # bfloat16 entries: over MAP_FROM bytes, not a whole number of pages
    return {
        "big.bf16": torch.randn(big, generator=g).bfloat16(),
        "big.f32": torch.randn(3, big // 3, generator=g),
        "small": torch.randn(5, 7, generator=g).bfloat16(),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(checkpoint.MAP_FROM, dtype=torch.int64),
    }


def test_every_tensor_reads_as_safetensors_loads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = model_dir(tmp_path, tensors())
    expected = load_file(str(directory / "model.safetensors"))
    maps = []
    real_mapped = checkpoint._mapped
    monkeypatch.setattr(checkpoint, "_mapped", lambda *a: maps.append(r := real_mapped(*a)) or r)
    model = Checkpoint.open("m", directory)
    for name, want in expected.items():
        got = model.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
    assert sum(m is not None for m in maps) == 3  # the three large tensors are mapped, the others read
    assert torch.equal(model.read("big.bf16", torch.float32), expected["big.bf16"].float())


def test_a_mapped_tensor_is_private_and_outlives_the_checkpoint(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, tensors())
    before = (directory / "model.safetensors").read_bytes()
    model = Checkpoint.open("m", directory)
    x = model.read("big.bf16")
    model.close()
    x.add_(1)  # copy-on-write: the file and a fresh read keep the old values
    assert (directory / "model.safetensors").read_bytes() == before
    assert torch.equal(Checkpoint.open("m", directory).read("big.bf16") + 1, x)


def test_reads_fall_back_to_a_copy_where_mapping_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = model_dir(tmp_path, tensors())

    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(19, "No such device")  # a file system without mmap

    monkeypatch.setattr(checkpoint.mmap, "mmap", refuse)
    assert torch.equal(Checkpoint.open("m", directory).read("big.f32"), tensors()["big.f32"])


def test_a_misaligned_tensor_is_read_not_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand-written file: one byte of U8 first puts the following float32 data at an odd offset."""
    big = torch.arange(checkpoint.MAP_FROM // 4 + 3, dtype=torch.float32)
    header = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "F32", "shape": [big.numel()], "data_offsets": [1, 1 + 4 * big.numel()]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp_path.joinpath("config.json").write_text("{}")
    tmp_path.joinpath("model.safetensors").write_bytes(
        struct.pack("<Q", len(raw)) + raw + b"\x07" + big.numpy().tobytes()
    )
    maps = []
    real_mapped = checkpoint._mapped
    monkeypatch.setattr(checkpoint, "_mapped", lambda *a: maps.append(r := real_mapped(*a)) or r)
    assert torch.equal(Checkpoint.open("m", tmp_path).read("b"), big)
    assert maps == [None]  # float32 at an odd address: numba would compile unaligned variants of its kernels


def test_a_file_truncated_after_indexing_is_one_error(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, tensors())
    model = Checkpoint.open("m", directory)
    path = directory / "model.safetensors"
    info = index_weights("m", directory)["big.f32"]
    with open(path, "r+b") as f:
        f.truncate(info.offset + 10)
    with pytest.raises(UserError, match="'big.f32' is truncated"):
        model.read("big.f32")
