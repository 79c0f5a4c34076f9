"""Output directories that appear whole or not at all, and never at the cost of what a user owns.

    with atomic_output_dir(out, overwrite, markers=MODEL_MARKERS) as staging:
        ...write into staging...          # a hidden sibling: .<name>.partial-<host>-<pid>
    # only now does `out` exist (or change), in one step

What is guaranteed:
  * An existing non-empty `out` is replaced only with `overwrite`, and only when it holds one of `markers`
    (a file that says medmerge — or mergekit — wrote it); anything else the user must remove.
  * `out` is never one of the `inputs`, never inside one, never contains one (resolved paths, symlinks too).
  * An error, Ctrl-C or SIGTERM while writing removes the staging directory; `out` is as it was.
  * Replacing is one atomic exchange (Linux renameat2 RENAME_EXCHANGE) where the file system offers it;
    elsewhere two renames with SIGINT/SIGTERM held back between them. A rename that fails (a mount point,
    another device) leaves the finished output visible beside `out` and says where.
  * Staging directories of processes that died (SIGKILL, power loss) are removed by the next run on the same
    host, which says so; an old output that a dead process had moved aside is put back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from medmerge_common.errors import UserError

# files only a merge tool's output holds: merges and MoEs by medmerge and mergekit
ROUTER_TRAINING_LOG = "router_training.json"  # `medmerge moe train-router`'s log, beside the model it trained
MODEL_MARKERS = ("medmerge_recipe.yaml", "mergekit_config.yml", "medmerge_moe.yaml", "mergekit_moe_config.yml")
Say = Callable[[str], None]


def check_output_dir(
    out: Path, overwrite: bool, *, markers: Sequence[str] = MODEL_MARKERS, inputs: Sequence[Path] = ()
) -> None:
    """Refuse an `out` that would lose a user's files: a file in its place, an input (or a directory with an
    input in it, or inside one), or an existing non-empty directory — unless `overwrite` and it holds one of
    `markers`."""
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"output path {out} exists and is not a directory")
    except OSError as exc:  # a name over 255 bytes, a directory we may not read
        raise UserError(f"output path {out}: {exc.strerror or exc}") from None
    target = out.resolve()
    for source in inputs:
        source = source.resolve()
        relation = (
            "is"
            if target == source
            else "lies inside"
            if source in target.parents
            else "contains"
            if target in source.parents
            else None
        )
        if relation:
            raise UserError(f"output directory {out} {relation} the input {source}: choose another OUT_DIR")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"output directory {out} exists and is not empty (use --overwrite to replace it)")
    if not any((out / marker).is_file() for marker in markers):
        raise UserError(
            f"output directory {out} was not written by medmerge (it has no {' or '.join(markers)}), so "
            "--overwrite will not delete it: remove it yourself or choose another OUT_DIR"
        )


@contextmanager
def atomic_output_dir(
    out: Path,
    overwrite: bool,
    *,
    markers: Sequence[str] = MODEL_MARKERS,
    inputs: Sequence[Path] = (),
    say: Say | None = None,
) -> Iterator[Path]:
    """Yield a hidden staging directory beside `out`; it becomes `out` only if the block completes."""
    out = Path(os.path.abspath(out))  # "." and "dir/.." have a real name and parent only once made absolute
    check_output_dir(out, overwrite, markers=markers, inputs=inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(out, say or (lambda _: None))
        staging = out.parent / f".{out.name}.partial-{_owner()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise UserError(f"cannot create the output directory {out}: {exc.strerror or exc}") from None
    try:
        yield staging
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _clean_stale(out: Path, say: Say) -> None:
    """Remove staging directories that dead processes of this host left beside `out`; put back an old output
    that one of them had moved aside and not replaced."""
    host = socket.gethostname()
    for kind in ("old", "partial"):  # an old output first: it may have to become `out` again
        for path in sorted(out.parent.glob(f".{_glob_escape(out.name)}.{kind}-{_glob_escape(host)}-*")):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                path.rename(out)
                say(f"restored {out} from {path.name}, which an interrupted run (pid {pid}) had moved aside")
            else:
                shutil.rmtree(path, ignore_errors=True)
                say(f"removed {path}, left behind by an interrupted run (pid {pid})")


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(staging: Path, out: Path) -> None:
    """Make `staging` become `out`, replacing an existing `out` in one step where possible."""
    try:
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            staging.replace(out)  # rename(2) replaces an empty directory atomically
        elif _exchange(staging, out):  # staging now holds the old output
            shutil.rmtree(staging, ignore_errors=True)
        else:
            old = out.parent / f".{out.name}.old-{_owner()}"
            try:
                with _signals_held():  # out is missing between these renames: no Ctrl-C in there
                    out.rename(old)
                    try:
                        staging.rename(out)
                    except OSError:
                        old.rename(out)
                        raise
            finally:
                if out.exists():
                    shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        visible = out.parent / f"{out.name}.medmerge-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            staging.rename(visible)
        except OSError:
            raise UserError(f"cannot move the finished output into {out}: {exc.strerror or exc}") from None
        raise UserError(
            f"cannot move the finished output into {out} ({exc.strerror or exc}); it is complete in {visible}"
        ) from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the file system cannot exchange: rename instead
        return False
    raise OSError(code, os.strerror(code))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration of the block (main thread only: Python runs its signal
    handlers there), then act on them as usual."""
    caught: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        caught.append(signum)

    try:
        previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handler of ours could run in between anyway
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in caught:  # the usual handler runs now (KeyboardInterrupt for Ctrl-C)
            signal.raise_signal(signum)
