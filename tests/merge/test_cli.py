"""The `medmerge merge` command as a user runs it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medmerge.cli import main, parse_size
from merge.methods import METHODS


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medmerge.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_parse_size() -> None:
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("4GiB") == 4 * 1024**3
    assert parse_size("1000") == 1000
    assert parse_size("1.5kb") == 1500


def test_bad_recipe_is_one_line_exit_2_no_traceback_no_output(write_recipe, tmp_path) -> None:
    path = write_recipe("merge_method: tiess\nbase_model: a/b\nmodels:\n  - model: a/b\n")
    result = run_cli("merge", str(path), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"medmerge: error: {path}:1: merge_method: unknown merge method 'tiess' (did you mean 'ties'?); "
        f"known: {', '.join(METHODS)}"
    ]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_offline_hub_reference_fails_fast_with_one_line(write_recipe, tmp_path) -> None:
    path = write_recipe(
        "merge_method: linear\nmodels:\n  - model: BioMistral/BioMistral-7B\n    parameters: {weight: 1}\n"
    )
    result = run_cli(
        "merge",
        str(path),
        str(tmp_path / "out"),
        "--dry-run",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("medmerge: error: model 'BioMistral/BioMistral-7B': not available locally")


def test_model_mirror_directory_resolves_hub_ids(tiny, write_recipe, tmp_path, monkeypatch, capsys) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "org").mkdir(parents=True)
    (mirror / "org" / "tiny-base").symlink_to(tiny["base"])
    monkeypatch.setenv("MEDMERGE_MODEL_DIR", str(mirror))
    path = write_recipe("merge_method: linear\nmodels:\n  - model: org/tiny-base@main\n    parameters: {weight: 1}\n")
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_dry_run_prints_the_plan(tiny, write_recipe, tmp_path, capsys) -> None:
    path = write_recipe(f"""\
merge_method: slerp
base_model: {tiny["base"]}
models:
  - model: {tiny["base"]}
  - model: {tiny["ft1"]}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - value: 0.5
""")
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method      slerp" in out and "4 layers, 39 tensors" in out
    assert "model.layers.3.self_attn.q_proj.weight  [position 1.000]  t=1  <-" in out
    assert "model.embed_tokens.weight  [position 0.000]  t=0.5  <-" in out
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(path), "--dry-run"]) == 0  # no OUT_DIR needed to check a recipe
    assert capsys.readouterr().out == out


def test_out_dir_is_needed_without_dry_run(write_recipe, tmp_path, capsys) -> None:
    path = write_recipe("merge_method: linear\nmodels:\n  - model: a/b\n")
    assert main(["merge", str(path)]) == 2
    assert capsys.readouterr().err.startswith("medmerge: error: give OUT_DIR")


def test_merge_then_overwrite_guard(tiny, write_recipe, tmp_path) -> None:
    path = write_recipe(f"merge_method: linear\nmodels:\n  - model: {tiny['ft1']}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    first = run_cli("merge", str(path), str(out), "--quiet")
    assert first.returncode == 0, first.stderr
    second = run_cli("merge", str(path), str(out))
    assert second.returncode == 2 and "use --overwrite" in second.stderr
    assert run_cli("merge", str(path), str(out), "--overwrite", "--quiet").returncode == 0


@pytest.mark.parametrize("argv", [["merge", "--out-shard-size", "lots", "r.yaml", "o"], ["merge"]])
def test_argument_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_cuda_requested_without_gpu(write_recipe, tiny, tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path = write_recipe(f"merge_method: linear\nmodels:\n  - model: {tiny['ft1']}\n    parameters: {{weight: 1}}\n")
    result = run_cli("merge", str(path), str(tmp_path / "o"), "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr and not Path(tmp_path / "o").exists()
