"""Streaming safetensors writer: shard layout and headers fixed up front, tensors appended as they arrive.

Every output tensor's name, dtype and shape is known before the merge starts, so the shard layout and
each shard's header are fixed up front; tensors are then appended to the open shard as they are computed
and never held back in memory. Shards split when the next tensor would push one past `max_shard_bytes`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from medmerge_common.errors import UserError
from medmerge_common.outdir import Say, atomic_output_dir
from merge.io.checkpoint import DTYPE_NAMES, OutputTensor


def plan_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Greedy split in order: a shard closes when the next tensor would exceed the limit (a lone oversized
    tensor gets a shard of its own). `max_shard_bytes <= 0` means one shard."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and max_shard_bytes > 0 and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and memory (a multiple of every common block size)
STAGE = 32 << 20  # bytes gathered before each direct write
DIRECT_FROM = 128 << 20  # smaller shards go through the page cache: their copy is short, and a direct write waits
# for the disk


class StreamFile:
    """A new file written front to back, around the page cache where the system allows it (O_DIRECT).

    A buffered write copies every byte into freshly allocated page-cache pages, which on some machines (VMs whose
    memory the host backs lazily) runs at 0.4 GB/s of kernel time and becomes the slowest stage of a merge. Here
    bytes gather in one reused, page-aligned buffer of STAGE bytes and go to the disk with aligned direct writes;
    the last block is padded and the file truncated to its length. Where O_DIRECT is missing or refused (tmpfs,
    some network file systems, macOS) the same calls write through the page cache."""

    def __init__(self, path: Path, direct: bool = True):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._fd = -1
        if self.direct:
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self._fd < 0:
            self._fd = os.open(path, flags, 0o644)
        self._stage = mmap.mmap(-1, STAGE) if self.direct else None
        self._filled = 0  # bytes in the stage
        self._offset = 0  # file offset of the stage's first byte

    def write(self, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        if self._stage is None:
            self._write_all(data, self._offset)
            self._offset += len(data)
            return
        while len(data):
            n = min(len(data), STAGE - self._filled)
            self._stage[self._filled : self._filled + n] = data[:n]
            self._filled += n
            data = data[n:]
            if self._filled == STAGE:
                self._flush(STAGE)

    def _flush(self, length: int) -> None:
        """Write the stage's first `length` bytes (a multiple of ALIGN) at the stage's offset."""
        assert self._stage is not None
        try:
            self._write_all(memoryview(self._stage)[:length], self._offset)
        except OSError as exc:  # a file system that opens with O_DIRECT but refuses the writes
            if exc.errno != errno.EINVAL:
                raise
            import fcntl  # POSIX only, like O_DIRECT itself

            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False
            self._write_all(memoryview(self._stage)[:length], self._offset)
        self._offset += length
        self._filled = 0

    def _write_all(self, data: memoryview, offset: int) -> None:
        while len(data):
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def close(self) -> None:
        """Write what is staged and close (the file then holds exactly the bytes written)."""
        if self._fd < 0:
            return
        try:
            if self._stage is not None and self._filled:
                size = self._offset + self._filled
                padded = -(-self._filled // ALIGN) * ALIGN
                self._stage[self._filled : padded] = bytes(padded - self._filled)
                self._flush(padded)
                os.ftruncate(self._fd, size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without writing what is staged (the file is being discarded)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._stage is not None:
            with suppress(BufferError):  # a view of it lives on in a write error's traceback: freed with that
                self._stage.close()
            self._stage = None


class ShardedWriter:
    """Write tensors, in the declared order, into `directory` as (sharded) safetensors plus an index."""

    def __init__(
        self,
        directory: Path,
        tensors: Sequence[OutputTensor],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ):
        self.directory = directory
        self.shards = plan_shards(tensors, max_shard_bytes)
        n = len(self.shards)
        self.file_names = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue: Iterator[tuple[int, OutputTensor]] = ((i, t) for i, s in enumerate(self.shards) for t in s)
        self._shard_index = -1
        self._file: StreamFile | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, expected = next(self._queue)
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected.name, expected.dtype, expected.shape):
            raise RuntimeError(f"writer expected {expected}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if shard_index != self._shard_index:
            self._open_shard(shard_index)
        assert self._file is not None
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)

    def _open_shard(self, index: int) -> None:
        self._close_file()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for t in self.shards[index]:
            header[t.name] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        self._file = StreamFile(self.directory / self.file_names[index], direct=offset >= DIRECT_FROM)
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._shard_index = index

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish the last shard and write the index (for more than one shard)."""
        if next(self._queue, None) is not None:
            raise RuntimeError("writer closed before every planned tensor was written")
        self._close_file()
        if len(self.shards) > 1:
            weight_map = {t.name: self.file_names[i] for i, s in enumerate(self.shards) for t in s}
            total = sum(t.nbytes for s in self.shards for t in s)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None


@contextmanager
def model_output(
    out: Path,
    tensors: Sequence[OutputTensor],
    *,
    overwrite: bool,
    inputs: Sequence[Path],
    shard_bytes: int,
    metadata: dict[str, str],
    say: Say,
) -> Iterator[tuple[Path, ShardedWriter]]:
    """(staging directory, writer) for a model directory `out` that appears whole when the block ends (or not at
    all); every planned tensor must have been written. A full disk or a read-only file system is one line."""
    with atomic_output_dir(out, overwrite, inputs=inputs, say=say) as staging:
        writer = ShardedWriter(staging, tensors, shard_bytes, metadata)
        try:
            yield staging, writer
            writer.close()
        except OSError as exc:  # a full disk, a read-only file system, a name too long
            raise UserError(f"cannot write the output into {out}: {exc.strerror or exc}") from None
        finally:
            writer.abort()
