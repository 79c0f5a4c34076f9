"""merge/io/writer.py's StreamFile: the bytes written, in any chunking, are the file; direct I/O where the system
allows, the page cache where it refuses (at open or at the first write); an aborted file keeps nothing staged."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge.io import writer
from merge.io.checkpoint import OutputTensor
from merge.io.writer import ShardedWriter, StreamFile


def chunks(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [0, 1, 7, writer.ALIGN - 1, writer.ALIGN, writer.ALIGN + 1, 3 * 4096 + 5, 70_001]
    return [rng.randbytes(rng.choice(sizes)) for _ in range(40)]


@pytest.mark.parametrize("direct", [True, False])
def test_the_file_holds_exactly_the_bytes_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct) -> None:
    monkeypatch.setattr(writer, "STAGE", 4 * writer.ALIGN)  # many stage flushes, chunks across stage boundaries
    for seed in range(6):
        parts = chunks(seed)
        path = tmp_path / f"{seed}.bin"
        f = StreamFile(path, direct=direct)
        for part in parts:
            f.write(part)
        f.close()
        assert path.read_bytes() == b"".join(parts)


def test_direct_io_is_used_where_the_file_system_takes_it(tmp_path: Path) -> None:
    f = StreamFile(tmp_path / "x.bin")
    f.write(b"abc")
    f.close()
    if not hasattr(os, "O_DIRECT"):
        assert not f.direct
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here")
    monkeypatch.setattr(writer, "STAGE", 2 * writer.ALIGN)
    real_pwrite = os.pwrite
    refused = []

    def pwrite(fd: int, data, offset: int) -> int:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    parts = chunks(7)
    f = StreamFile(tmp_path / "y.bin")
    assert f.direct
    for part in parts:
        f.write(part)
    f.close()
    assert refused == [0] and not f.direct
    assert (tmp_path / "y.bin").read_bytes() == b"".join(parts)


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer.os, "pwrite", full)
    f = StreamFile(tmp_path / "z.bin")
    f.write(b"x" * 10)
    with pytest.raises(OSError) as info:
        f.close()
    assert info.value.errno == errno.ENOSPC


def test_sharded_output_loads_and_an_abort_writes_nothing_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here: nothing is staged")
    monkeypatch.setattr(writer, "DIRECT_FROM", 0)  # every shard direct, so staged
    tensors = {f"t{i}": torch.randn(i + 1, 3 + i).bfloat16() for i in range(5)}
    planned = [OutputTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    w = ShardedWriter(tmp_path, planned, max_shard_bytes=100)
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
    loaded: dict[str, torch.Tensor] = {}
    for name in w.file_names:
        loaded |= load_file(tmp_path / name)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())

    aborted = tmp_path / "aborted"
    aborted.mkdir()
    w = ShardedWriter(aborted, planned, max_shard_bytes=0)
    w.write("t0", tensors["t0"])
    w.abort()
    assert (aborted / "model.safetensors").stat().st_size == 0  # the header was staged, never written


def test_only_large_shards_are_written_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensor = torch.zeros(64, 64)
    planned = [OutputTensor("w", tensor.dtype, tuple(tensor.shape))]
    for limit, expected in ((writer.DIRECT_FROM, False), (0, hasattr(os, "O_DIRECT"))):
        monkeypatch.setattr(writer, "DIRECT_FROM", limit)
        out = tmp_path / str(limit)
        out.mkdir()
        w = ShardedWriter(out, planned, max_shard_bytes=0)
        w.write("w", tensor)
        assert w._file is not None and w._file.direct == expected
        w.close()
        assert torch.equal(load_file(out / "model.safetensors")["w"], tensor)
