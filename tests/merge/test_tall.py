"""TALL masks as compression (`medmerge tall masks` / `restore`): a task is restored exactly where only it moved,
by the paper's formula everywhere, and bad inputs are one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmerge.cli import main
from merge.methods.task_vectors import tall_mask
from merge.run import run_merge
from tests.conftest import load_weights

STEP = 2.0**-10  # every value below is a multiple of it: sums and differences are exact in float32


def variant(source: Path, target: Path, change) -> Path:
    """A copy of a one-file model directory with change(name, tensor) applied to every float tensor."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    save_file(
        {n: change(n, t) if t.is_floating_point() else t for n, t in tensors.items()}, target / "model.safetensors"
    )
    return target


@pytest.fixture(scope="module")
def tasks(tiny, tmp_path_factory) -> dict[str, Path]:
    """A base on the STEP grid; task a moves the even entries of every tensor, task b the odd ones; their
    task-arithmetic merge (weights 1) holds both."""
    root = tmp_path_factory.mktemp("tall")
    base = variant(tiny["base"], root / "base", lambda _, t: torch.round(t / STEP) * STEP)
    generator = torch.Generator().manual_seed(0)

    def moved(parity: int):
        def change(_: str, t: torch.Tensor) -> torch.Tensor:
            steps = torch.randint(1, 9, t.shape, generator=generator) * (
                torch.randint(0, 2, t.shape, generator=generator) * 2 - 1
            )
            where = (torch.arange(t.numel()).reshape(t.shape) % 2) == parity
            return t + torch.where(where, steps * STEP, torch.zeros(()))

        return change

    a = variant(base, root / "a", moved(0))
    b = variant(base, root / "b", moved(1))
    recipe = root / "ta.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: 1.0}}\n"
    )
    run_merge(recipe, root / "merged")
    return {"base": base, "a": a, "b": b, "merged": root / "merged", "root": root}


def test_tall_mask_hand_computed() -> None:
    tau = torch.tensor([1.0, 0.0, -2.0, 0.5, 0.0])
    multi = torch.tensor([1.5, 1.0, -2.0, -0.5, 0.0])  # others' sum: [0.5, 1, 0, -1, 0]
    assert tall_mask(tau, multi, 0.4).tolist() == [True, False, True, True, True]  # 1 ≥ .2, 0 ≥ .4, 2 ≥ 0, .5 ≥ .4
    assert tall_mask(tau, multi, 0.6).tolist() == [True, False, True, False, True]


def test_each_task_is_restored_exactly_where_only_it_moved(tasks, tmp_path, capsys) -> None:
    masks = tmp_path / "masks"
    argv = ["tall", "masks", str(tasks["merged"]), "--base", str(tasks["base"]), "-o", str(masks)]
    assert main([*argv, "--model", f"a={tasks['a']}", "--model", f"b={tasks['b']}"]) == 0
    err = capsys.readouterr().err
    assert "a: keeps 50.0% of the merged task vector (λ = 0.4)" in err and "b: keeps 50.0%" in err
    record = json.loads((masks / "tall_masks.json").read_text())
    assert set(record["tasks"]) == {"a", "b"} and record["base"] == str(tasks["base"])
    merged_bytes = sum(p.stat().st_size for p in tasks["merged"].glob("*.safetensors"))
    mask_bytes = (masks / "a" / "model.safetensors").stat().st_size
    assert mask_bytes < merged_bytes / 25  # one bit per float32 weight (1/32 of its bytes), plus the header
    for task in ("a", "b"):
        out = tmp_path / task
        assert main(["tall", "restore", str(tasks["merged"]), str(masks), "--task", task, "-o", str(out)]) == 0
        restored, own = load_weights(out), load_weights(tasks[task])
        assert restored.keys() == own.keys() and all(torch.equal(restored[n], own[n]) for n in own), task
        assert (out / "config.json").read_bytes() == (tasks["merged"] / "config.json").read_bytes()
        assert "tall-masks" in (out / "README.md").read_text()


def test_overlapping_tasks_restore_by_the_formula(tasks, tmp_path) -> None:
    """Where both moved, θ_a = θ_base + m_a ⊙ (θ_merged − θ_base): checked tensor by tensor against tall_mask."""
    both = variant(tasks["a"], tmp_path / "both", lambda _, t: t + 3 * STEP)  # a, and every entry moved
    masks, out = tmp_path / "masks", tmp_path / "out"
    argv = ["tall", "masks", str(tasks["merged"]), "--base", str(tasks["base"]), "--model", f"both={both}"]
    assert main([*argv, "--lambda", "0.3", "-o", str(masks), "--quiet"]) == 0
    assert main(["tall", "restore", str(tasks["merged"]), str(masks), "--task", "both", "-o", str(out)]) == 0
    base, merged, own, restored = (load_weights(d) for d in (tasks["base"], tasks["merged"], both, out))
    for name, theta in base.items():
        multi = merged[name] - theta
        mask = tall_mask(own[name] - theta, multi, 0.3)
        assert torch.equal(restored[name], theta + mask * multi), name


def test_bad_inputs_are_one_line_and_write_nothing(tasks, tmp_path, capsys) -> None:
    masks = tmp_path / "masks"
    merged, base = str(tasks["merged"]), str(tasks["base"])
    assert main(["tall", "masks", merged, "--base", base, "--model", f"a={tasks['a']}", "-o", str(masks)]) == 0
    capsys.readouterr()
    cases = [
        (["tall", "masks", merged, "--base", base, "--model", "a", "-o", str(tmp_path / "x")], "expected NAME=MODEL"),
        (["tall", "masks", merged, "--base", base, "--model", "a/b=m", "-o", str(tmp_path / "x")], "task name 'a/b'"),
        (["tall", "restore", merged, str(masks), "--task", "c", "-o", str(tmp_path / "x")], "no task 'c'"),
        (["tall", "restore", str(tasks["a"]), str(masks), "--task", "a", "-o", str(tmp_path / "x")], "not the merged"),
        (["tall", "restore", merged, str(tmp_path), "--task", "a", "-o", str(tmp_path / "x")], "tall_masks.json"),
        (
            [
                "tall",
                "masks",
                merged,
                "--base",
                str(tasks["root"].parent / "nowhere"),
                "--model",
                f"a={tasks['a']}",
                "-o",
                str(tmp_path / "x"),
            ],
            "nowhere",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], (argv, err)
        assert not (tmp_path / "x").exists()
