"""Output directories: nothing a user owns is deleted, nothing half-written is left, not even after SIGTERM/SIGKILL."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import medmerge_common.outdir as outdir
from medmerge.cli import main
from medmerge_common.errors import UserError
from medmerge_common.outdir import atomic_output_dir
from tests.merge.test_cli import run_cli


@pytest.fixture(autouse=True)
def interruptible():
    """Ctrl-C reaches these tests and the processes they start even when pytest itself was started with SIGINT
    ignored (a background job of a non-interactive shell, `nohup`): children inherit an ignored signal, and Python
    installs its KeyboardInterrupt handler only where SIGINT is not ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def recipe_for(tiny: dict[str, Path]) -> dict:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(tiny["ft1"]), "parameters": {"weight": 0.5}},
            {"model": str(tiny["ft2"]), "parameters": {"weight": 0.5}},
        ],
    }


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def merge_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["merge", *args, "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines()


# --- 2. --overwrite never deletes inputs or a user's directory -------------------------------------------------------


@pytest.mark.parametrize("where", ["is", "inside", "contains", "symlink"])
def test_out_dir_that_is_in_or_around_an_input_is_refused_even_with_overwrite(
    tiny, write_recipe, tmp_path, capsys, where: str
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny["ft1"], models / "ft1")
    (models / "notes.txt").write_text("mine")
    recipe = recipe_for(tiny)
    recipe["models"][0]["model"] = str(models / "ft1")
    path = write_recipe(recipe)
    out = {
        "is": models / "ft1",
        "inside": models / "ft1" / "merged",
        "contains": models,
        "symlink": tmp_path / "link",
    }[where]
    if where == "symlink":
        out.symlink_to(models / "ft1")
    before = sorted(p.relative_to(models) for p in models.rglob("*"))
    code, lines = merge_cli(capsys, str(path), str(out), "--overwrite")
    assert code == 2 and len(lines) == 1
    relation = {"is": "is", "inside": "lies inside", "contains": "contains", "symlink": "is"}[where]
    assert f"{relation} the input {(models / 'ft1').resolve()}" in lines[0]
    assert sorted(p.relative_to(models) for p in models.rglob("*")) == before


def test_overwrite_replaces_a_mergekit_output(tiny, write_recipe, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mergekit_config.yml").write_text("merge_method: linear\n")
    (out / "model.safetensors").write_bytes(b"old")
    code, _ = merge_cli(capsys, str(write_recipe(recipe_for(tiny))), str(out), "--overwrite")
    assert code == 0 and not (out / "mergekit_config.yml").exists() and (out / "medmerge_recipe.yaml").exists()
    assert hidden(tmp_path) == []


# --- 5. interrupted runs ---------------------------------------------------------------------------------------------


def test_stale_partials_of_dead_processes_are_removed_and_said_and_live_ones_kept(
    tiny, write_recipe, tmp_path, capsys
) -> None:
    host = socket.gethostname()
    dead = tmp_path / f".out.partial-{host}-{2**22 + 12345}"  # above Linux's pid_max default: never alive
    alive = tmp_path / f".out.partial-{host}-{os.getppid()}"
    elsewhere = tmp_path / f".out.partial-otherhost-{2**22 + 1}"  # another node of a shared file system
    for d in (dead, alive, elsewhere):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    code, lines = merge_cli(capsys, str(write_recipe(recipe_for(tiny))), str(tmp_path / "out"))
    assert code == 0
    assert lines == [f"medmerge: warning: removed {dead}, left behind by an interrupted run (pid {2**22 + 12345})"]
    assert sorted(hidden(tmp_path)) == sorted([alive.name, elsewhere.name])


def test_an_old_output_moved_aside_by_a_killed_run_is_put_back(tiny, tmp_path) -> None:
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{socket.gethostname()}-{2**22 + 7}"
    old.mkdir()
    (old / "medmerge_recipe.yaml").write_text("x")
    said: list[str] = []
    with atomic_output_dir(out, overwrite=True, say=said.append) as staging:
        assert out.is_dir() and (out / "medmerge_recipe.yaml").exists()  # restored before anything else
        (staging / "medmerge_recipe.yaml").write_text("new")
    assert (out / "medmerge_recipe.yaml").read_text() == "new" and hidden(tmp_path) == []
    assert said == [f"restored {out} from {old.name}, which an interrupted run (pid {2**22 + 7}) had moved aside"]


def test_replacing_is_one_atomic_exchange(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "medmerge_recipe.yaml").write_text("old")
    inode = out.stat().st_ino
    with atomic_output_dir(out, overwrite=True) as staging:
        (staging / "medmerge_recipe.yaml").write_text("new")
        new_inode = staging.stat().st_ino
    assert (out / "medmerge_recipe.yaml").read_text() == "new" and out.stat().st_ino == new_inode != inode
    assert hidden(tmp_path) == []


def test_a_signal_between_the_two_renames_waits_until_out_is_whole(tmp_path, monkeypatch) -> None:
    """Where no atomic exchange exists, `out` is missing between two renames: Ctrl-C there must not lose it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "medmerge_recipe.yaml").write_text("old")
    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    real_rename = Path.rename
    seen = []

    def rename_then_interrupt(self: Path, target: Path) -> Path:
        result = real_rename(self, target)
        if not seen:
            seen.append(target)
            signal.raise_signal(signal.SIGINT)  # arrives right after out was moved aside
        return result

    monkeypatch.setattr(Path, "rename", rename_then_interrupt)
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out, overwrite=True) as staging:
        (staging / "medmerge_recipe.yaml").write_text("new")
    assert (out / "medmerge_recipe.yaml").read_text() == "new"  # the interrupt was acted on after the swap
    assert hidden(tmp_path) == []


def test_a_failed_final_rename_leaves_the_finished_output_visible(tmp_path, monkeypatch) -> None:
    out = tmp_path / "mnt"
    monkeypatch.setattr(
        Path, "replace", lambda self, target: (_ for _ in ()).throw(OSError(errno.EBUSY, "Device or resource busy"))
    )
    with pytest.raises(UserError) as caught, atomic_output_dir(out, overwrite=False) as staging:
        (staging / "model.safetensors").write_text("done")
    [visible] = tmp_path.glob("mnt.medmerge-*")
    assert str(caught.value) == (
        f"cannot move the finished output into {out} (Device or resource busy); it is complete in {visible}"
    )
    assert (visible / "model.safetensors").read_text() == "done" and hidden(tmp_path) == []


def test_out_dir_dot_is_replaced_through_its_real_name(tiny, write_recipe, tmp_path, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = write_recipe(recipe_for(tiny))
    monkeypatch.chdir(work)
    code, _ = merge_cli(capsys, str(path), ".")
    assert code == 0 and (work / "model.safetensors").exists() and hidden(tmp_path) == []


SLOW_MERGE = """
import sys, time
from pathlib import Path
import merge.run
original = merge.run.merge_tensor
def slow(*args, **kwargs):
    Path(sys.argv[1]).touch()  # tell the test the merge is under way
    time.sleep(0.2)
    return original(*args, **kwargs)
merge.run.merge_tensor = slow
from medmerge.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_mid_merge_leave_nothing_behind(tiny, write_recipe, tmp_path, signum) -> None:
    started = tmp_path / "started"
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, str(started), "merge", str(write_recipe(recipe_for(tiny))), str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hidden(tmp_path), "the merge should be writing into a staging directory by now"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    assert err.strip().splitlines()[-1] == "medmerge: interrupted; nothing was left half-written"
    assert "Traceback" not in err and not out.exists() and hidden(tmp_path) == []


def test_sigint_during_start_up_is_one_line(tmp_path) -> None:
    """Ctrl-C while medmerge is still importing torch and lm-eval: one line, never a traceback."""
    for delay in (0.3, 0.8, 1.5):
        proc = subprocess.Popen(
            [sys.executable, "-m", "medmerge.cli", "merge", str(tmp_path / "none.yaml"), str(tmp_path / "o")],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        # on a fast machine the command can finish (the recipe does not exist) before the signal arrives
        finished = [f"medmerge: error: {tmp_path / 'none.yaml'}: file not found"]
        interrupted = ["medmerge: interrupted; nothing was left half-written"]
        assert err.strip().splitlines()[-1:] in ([], interrupted, finished), err
        # 130, or killed by SIGINT after that line: an interrupt that lands inside torch's C start-up code (which
        # runs Python through PyRun_String) makes CPython re-raise SIGINT at exit, the shell convention for ^C
        assert proc.returncode in (2, 130, -signal.SIGINT), (delay, proc.returncode, err)


# --- 8. the disk says no ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(
    tiny, write_recipe, tmp_path, capsys, monkeypatch, code: int
) -> None:
    from merge.io.writer import ShardedWriter

    def refuse(self, name, tensor) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ShardedWriter, "write", refuse)
    out = tmp_path / "out"
    status, lines = merge_cli(capsys, str(write_recipe(recipe_for(tiny))), str(out))
    assert status == 2
    assert lines == [f"medmerge: error: cannot write the output into {out}: {os.strerror(code)}"]
    assert not out.exists() and hidden(tmp_path) == []


def test_a_path_component_over_255_bytes_is_one_line(tiny, write_recipe, tmp_path, capsys) -> None:
    out = tmp_path / ("x" * 300)
    code, lines = merge_cli(capsys, str(write_recipe(recipe_for(tiny))), str(out))
    assert code == 2 and len(lines) == 1 and "File name too long" in lines[0]
    assert hidden(tmp_path) == []


def test_the_cli_subprocess_agrees(tiny, write_recipe, tmp_path) -> None:
    """The same guarantees through the installed entry point: a user's directory survives --overwrite."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = run_cli("merge", str(write_recipe(recipe_for(tiny))), str(out), "--overwrite")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_heavy_imports_waits_for_them_then_stops(signum) -> None:
    """torch's import runs Python from C++, where a KeyboardInterrupt aborts the process: held, then raised."""
    from medmerge.cli import Terminated, interrupts_held

    finished = False
    with pytest.raises(KeyboardInterrupt) as info, interrupts_held():
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # Python would run a handler here: it only records the signal
        finished = True
    assert finished and isinstance(info.value, Terminated) == (signum == signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
