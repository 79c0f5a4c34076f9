"""Inputs a careless or hostile user gives: every one is one line per problem, exit 2, no traceback, no output.

Bad recipe numbers, NaN/Inf in the weights, headers that lie, pickles, hostile YAML, duplicate inputs, devices.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmerge.cli import main
from medmerge_common.errors import UserError
from merge.recipe import load_recipe
from merge.run import run_merge
from tests.conftest import load_weights


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Run `medmerge ...` in-process: (exit status, stderr lines). An exception escaping main fails the test."""
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def linear_recipe(tiny: dict[str, Path], weight_a: object = 0.5, **extra: object) -> dict:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(tiny["ft1"]), "parameters": {"weight": weight_a}},
            {"model": str(tiny["ft2"]), "parameters": {"weight": 0.5}},
        ],
        **extra,
    }


def slerp_recipe(tiny: dict[str, Path], t: object) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": str(tiny["base"]),
        "parameters": {"t": t},
        "models": [{"model": str(tiny["base"])}, {"model": str(tiny["ft1"])}],
    }


# --- 1. numbers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (".nan", "expected a finite number, got nan"),
        (".inf", "expected a finite number, got inf"),
        ("-.inf", "expected a finite number, got -inf"),
        ("1.0e+39", "1e+39 is beyond float32's range"),
        ("'1e39'", "'1e39' is beyond float32's range"),
        ("1e-320", "is too small for float32 arithmetic"),
    ],
)
def test_non_finite_and_unrepresentable_weights_are_refused(
    tiny, write_recipe, tmp_path, capsys, text: str, message: str
) -> None:
    recipe = json.dumps(linear_recipe(tiny)).replace('"weight": 0.5}', f'"weight": {text}}}', 1)
    path = write_recipe(recipe)
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"medmerge: error: {path}:1: models[0].parameters.weight: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("t", [".nan", ".inf"])
def test_slerp_t_must_be_finite(tiny, write_recipe, tmp_path, capsys, t: str) -> None:
    path = write_recipe(json.dumps(slerp_recipe(tiny, 0.5)).replace('"t": 0.5', f'"t": {t}'))
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1 and "parameters.t: expected a finite number" in lines[0]


def test_slerp_t_outside_0_1_merges_with_a_warning(tiny, write_recipe, tmp_path, capsys) -> None:
    path = write_recipe(slerp_recipe(tiny, [0, 1.5]))
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--quiet")
    assert code == 0
    assert lines == [
        f"medmerge: warning: {path}:4: parameters.t: t = 1.5 is outside [0, 1] (0 gives the base model, 1 the "
        "other): the merge extrapolates"
    ]


def test_density_bound_comes_from_the_declaration(tiny, write_recipe) -> None:
    from merge.methods import METHODS

    assert str(METHODS["ties"].param("density").bounds) == "(0, 1]"
    assert METHODS["slerp"].param("t").bounds.strict is False


def write_nonfinite_copy(src: Path, dst: Path, value: float) -> str:
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = weights[name].clone()
    weights[name][0, :3] = value
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("method", ["slerp", "dare_ties"])
def test_nan_in_an_input_stops_the_merge_naming_model_and_tensor(tiny, write_recipe, tmp_path, capsys, method) -> None:
    broken = tmp_path / "ft1_nan"
    name = write_nonfinite_copy(tiny["ft1"], broken, float("nan"))
    recipe = slerp_recipe(tiny, 0.5)
    if method == "dare_ties":
        recipe = {**recipe, "merge_method": "dare_ties", "parameters": {"weight": 0.5, "density": 0.5}}
    recipe["models"][1]["model"] = str(broken)
    path = write_recipe(recipe)
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--quiet")
    assert code == 2
    assert lines == [
        f"medmerge: error: model '{broken}' tensor '{name}' holds 3 NaN/Inf value(s); nothing was merged "
        "(--allow-nonfinite merges it anyway)"
    ]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--quiet", "--allow-nonfinite")
    assert code == 0 and lines == [
        f"medmerge: warning: model '{broken}' tensor '{name}' holds 3 NaN/Inf value(s); merged anyway "
        "(--allow-nonfinite)"
    ]
    merged = load_weights(tmp_path / "out")
    assert not torch.isfinite(merged[name]).all()  # carried on, as asked
    assert all(torch.isfinite(t).all() for n, t in merged.items() if n != name)


def test_a_merge_that_overflows_from_finite_inputs_writes_nothing(tiny, write_recipe, tmp_path, capsys) -> None:
    path = write_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tiny["base"]),
            "dtype": "float16",
            "models": [{"model": str(tiny["base"])}, {"model": str(tiny["ft1"]), "parameters": {"weight": 1e30}}],
        }
    )
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--quiet")
    assert code == 2 and len(lines) == 1
    assert "NaN/Inf value(s) from finite inputs" in lines[0] and "nothing was written" in lines[0]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- 4. headers that lie ---------------------------------------------------------------------------------------------


def rewrite_header(directory: Path, edit) -> None:
    """Apply `edit(header) -> header` to model.safetensors' JSON header, keeping the data bytes."""
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + length]))
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def _entries(h: dict) -> list[str]:
    return sorted((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"][0])


def _point_at_other(h: dict) -> dict:
    a, b = _entries(h)[:2]
    if h[a]["shape"] == h[b]["shape"]:
        h[a]["data_offsets"] = list(h[b]["data_offsets"])
    else:
        h[a]["data_offsets"] = [h[b]["data_offsets"][0], h[b]["data_offsets"][0] + h[a]["data_offsets"][1]]
    return h


def _relabel(h: dict) -> dict:
    h[_entries(h)[0]]["dtype"] = "F16"  # float32 bytes read as float16: half the size the offsets span
    return h


def _gap(h: dict) -> dict:
    last = _entries(h)[-1]
    h[last]["data_offsets"] = [o + 4 for o in h[last]["data_offsets"]]
    return h


def _huge(h: dict) -> dict:
    last = _entries(h)[-1]
    begin = h[last]["data_offsets"][0]
    h[last] = {"dtype": "U8", "shape": [2 << 40], "data_offsets": [begin, begin + (2 << 40)]}
    return h


HEADER_LIES = {
    "offsets point at another tensor": (_point_at_other, "invalid header entry"),
    "dtype relabelled": (_relabel, "data_offsets span"),
    "gap between tensors": (_gap, "leaves a gap of 4 bytes"),
    "negative offset": (lambda h: {**h, _entries(h)[0]: {**h[_entries(h)[0]], "data_offsets": [-8, 0]}}, "non-neg"),
    "negative dim": (lambda h: {**h, _entries(h)[0]: {**h[_entries(h)[0]], "shape": [-1, 64]}}, "non-negative"),
    "2 TiB tensor": (_huge, "the header describes"),
    "header is a list": (lambda h: list(h), "the header is not a JSON object"),
    "entry lacks dtype": (
        lambda h: {**h, _entries(h)[0]: {k: v for k, v in h[_entries(h)[0]].items() if k != "dtype"}},
        "it needs dtype, shape and data_offsets",
    ),
    "metadata not strings": (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__ must map"),
}


@pytest.mark.parametrize("case", list(HEADER_LIES))
def test_headers_that_lie_are_one_line_at_dry_run_and_safetensors_agrees(
    tiny, write_recipe, tmp_path, capsys, case: str
) -> None:
    from safetensors import safe_open

    edit, message = HEADER_LIES[case]
    liar = tmp_path / "liar"
    shutil.copytree(tiny["ft1"], liar)
    rewrite_header(liar, edit)
    # the safetensors library refuses the same file
    with pytest.raises(Exception), safe_open(liar / "model.safetensors", "pt") as f:  # noqa: B017
        [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
    path = write_recipe(linear_recipe(tiny) | {"models": [{"model": str(liar), "parameters": {"weight": 1}}]})
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--dry-run")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"medmerge: error: {liar / 'model.safetensors'}: ") and message in lines[0]


def test_valid_headers_still_pass_strict_validation(tiny) -> None:
    from merge.io.checkpoint import index_weights

    for name in ("base", "base_sharded", "llama_tied"):
        assert index_weights(name, tiny[name])  # real files written by transformers


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({"metadata": {}}, "weight_map is missing or empty"),
        ([1, 2], "not a weight index"),
        ({"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}, "not a file name in the model dir"),
    ],
)
def test_index_files_that_lie_are_refused(tiny, write_recipe, tmp_path, capsys, index, message) -> None:
    model = tmp_path / "sharded"
    shutil.copytree(tiny["base_sharded"], model)
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    path = write_recipe(linear_recipe(tiny) | {"models": [{"model": str(model), "parameters": {"weight": 1}}]})
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--dry-run")
    assert code == 2 and len(lines) == 1 and message in lines[0]


def test_an_index_that_misplaces_a_tensor_is_refused(tiny) -> None:
    from merge.io.checkpoint import index_weights

    model = tiny["base_sharded"].parent / "misplaced"
    shutil.copytree(tiny["base_sharded"], model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    shared = [f for f in files if list(index["weight_map"].values()).count(f) > 1]  # a file that stays in the index
    name = next(n for n, f in index["weight_map"].items() if f == shared[0])
    files = [shared[0], next(f for f in files if f != shared[0])]
    index["weight_map"][name] = files[1]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"the index puts tensor '{name}' in {files[1]}, but it is in {files[0]}"):
        index_weights("misplaced", model)
    shutil.rmtree(model)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[1, 2]", "config.json must be a JSON object"),
        ("layers=6", "config.json says 6 layers, but its weights hold 4 (layers 0-3)"),
    ],
)
def test_configs_that_lie_are_refused(tiny, write_recipe, tmp_path, capsys, config, message) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny["ft1"], model)
    if config == "layers=6":
        data = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(data | {"num_hidden_layers": 6}))
    else:
        (model / "config.json").write_text(config)
    recipe = linear_recipe(tiny)
    recipe["models"][0]["model"] = str(model)
    path = write_recipe(recipe)
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--dry-run")
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


# --- 7. hostile YAML -------------------------------------------------------------------------------------------------

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (BILLION_LAUGHS, 6, "expands to more than 100000 values"),
        ("merge_method: linear\nmodels: &m\n  - model: *m\n", 2, "a cycle"),
        ("merge_method: !!python/object/apply:os.system [echo hi]\n", 1, "tag '!!python/object/apply:os.system'"),
        ("merge_method: !custom linear\n", 1, "YAML tag '!custom' is not allowed"),
        ("merge_method: linear\nmerge_method: ties\n", 2, "duplicate key 'merge_method' (first on line 1)"),
        ("x: " + "[" * 200 + "]" * 200 + "\n", None, "nested deeper than 64 levels"),
    ],
    ids=["billion-laughs", "self-reference", "python-tag", "custom-tag", "duplicate-key", "deep-nesting"],
)
def test_hostile_yaml_is_one_line(write_recipe, tmp_path, capsys, text: str, line: int | None, message: str) -> None:
    path = write_recipe(text)
    start = time.perf_counter()
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"))
    assert time.perf_counter() - start < 5  # a 1 KB file used to take 30 s and 2.5 GB
    assert code == 2 and len(lines) == 1, lines
    where = f"{path}:{line}: " if line else f"{path}"
    assert lines[0].startswith(f"medmerge: error: {where}") and message in lines[0], lines


def test_merge_keys_and_anchors_still_work(tiny, write_recipe) -> None:
    text = (
        f"merge_method: linear\nmodels:\n  - model: {tiny['ft1']}\n    parameters: &half {{weight: 0.5}}\n"
        f"  - model: {tiny['ft2']}\n    parameters:\n      <<: *half\n"
    )
    recipe = load_recipe(write_recipe(text))
    assert recipe.models[1].parameters == {"weight": 0.5}


# --- 8. the remaining tracebacks -------------------------------------------------------------------------------------


class Payload:
    """Any object that is not a tensor makes a checkpoint need the unsafe unpickler."""


def test_a_pickled_bin_is_refused_not_unpickled(tiny, write_recipe, tmp_path, capsys) -> None:
    model = tmp_path / "pickled"
    shutil.copytree(tiny["base_bin"], model)

    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": Payload()}, model / "pytorch_model.bin")
    path = write_recipe(linear_recipe(tiny) | {"models": [{"model": str(model), "parameters": {"weight": 1}}]})
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--dry-run")
    assert code == 2
    assert lines == [
        f"medmerge: error: {model / 'pytorch_model.bin'}: not a plain state dict (it holds pickled Python objects), "
        "so it was not loaded; convert it to safetensors where you trust its origin"
    ]


def test_a_model_listed_twice_is_refused_before_merging(tiny, write_recipe, tmp_path, capsys) -> None:
    path = write_recipe(
        {
            "merge_method": "ties",
            "base_model": str(tiny["base"]),
            "models": [
                {"model": str(tiny["base"])},
                {"model": str(tiny["base"])},
                {"model": str(tiny["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
            ],
        }
    )
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--dry-run")
    assert code == 2
    assert lines == [
        f"medmerge: error: {path}:5: models[1].model: model '{tiny['base']}' is listed twice here (first as item 0); "
        "list each input once"
    ]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("banana", "--device banana: not a device name (use cpu, cuda or cuda:N)"),
        ("mps", "--device mps: medmerge merges on cpu or cuda"),
        ("meta", "--device meta: medmerge merges on cpu or cuda"),
        ("cuda:7", "--device cuda:7: "),
    ],
)
def test_bad_devices_are_one_line(tiny, write_recipe, tmp_path, capsys, device: str, message: str) -> None:
    path = write_recipe(linear_recipe(tiny))
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--device", device)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"medmerge: error: {message}")


def test_a_problem_in_every_tensor_is_said_once_with_a_count(tiny, write_recipe, tmp_path, capsys) -> None:
    path = write_recipe(linear_recipe(tiny) | {"models": [{"model": str(tiny["ft1"])}, {"model": str(tiny["wide"])}]})
    path = write_recipe(path.read_text().replace("models:", "parameters: {weight: 1}\nmodels:"))
    code, lines = cli(capsys, "merge", str(path), str(tmp_path / "out"), "--dry-run")
    n_float = len(load_file(tiny["ft1"] / "model.safetensors"))
    assert code == 2 and len(lines) == 1, lines
    assert "has different shapes" in lines[0] and lines[0].endswith(f"(and {n_float - 1} more tensor(s) like it)")


def test_weights_summing_to_zero_are_said_once(tiny, write_recipe, tmp_path, capsys) -> None:
    recipe = linear_recipe(tiny, weight_a=-0.5)
    code, lines = cli(capsys, "merge", str(write_recipe(recipe)), str(tmp_path / "out"), "--dry-run")
    assert code == 2 and len(lines) == 1 and "sum to zero" in lines[0] and "more tensor(s) like it" in lines[0]


def test_run_merge_raises_recipe_error_for_a_bad_device(tiny, write_recipe, tmp_path) -> None:
    with pytest.raises(UserError, match="not a device name"):
        run_merge(write_recipe(linear_recipe(tiny)), tmp_path / "out", device="cuda:x")
