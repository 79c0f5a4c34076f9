"""`model: BASE+ADAPTER` inputs: a PEFT LoRA adapter applied tensor by tensor, equal to PEFT's own merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medmerge_common.errors import UserError
from merge.io.lora import lora_delta
from merge.recipe import load_recipe
from merge.run import run_merge
from tests.conftest import load_weights


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> dict[str, Path]:
    """PEFT adapters built by peft itself: `plain` (q/v, r 4) on tiny base; `full` on a bfloat16 base (rsLoRA,
    rank and alpha patterns, embedding LoRA, lm_head saved whole); `bin` (.bin weights); `wide` (other shapes)."""
    from medmerge.tiny import build_lora, build_model

    root = tmp_path_factory.mktemp("lora")
    build_model(root / "base_bf16", tiny["tokenizer"], layers=2, dtype=torch.bfloat16, seed=11)
    build_lora(tiny["base"], root / "plain", seed=1)
    build_lora(
        root / "base_bf16",
        root / "full",
        seed=2,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
        modules_to_save=["lm_head"],
    )
    build_lora(tiny["base"], root / "bin", seed=3, safetensors=False, target_modules=["o_proj", "gate_proj"])
    build_lora(tiny["wide"], root / "wide", seed=4)
    return {"base_bf16": root / "base_bf16", **{n: root / n for n in ("plain", "full", "bin", "wide")}}


def passthrough(write_recipe, model: str) -> Path:
    return write_recipe({"merge_method": "passthrough", "models": [{"model": model}]})


@pytest.mark.parametrize(("base", "adapter"), [("base", "plain"), ("base_bf16", "full"), ("base", "bin")])
def test_adapter_applied_equals_peft_merge_and_unload(tiny, adapters, write_recipe, tmp_path, base, adapter) -> None:
    from medmerge.tiny import merged_lora_state

    base_dir = tiny.get(base) or adapters[base]
    run_merge(passthrough(write_recipe, f"{base_dir}+{adapters[adapter]}"), tmp_path / "out")
    ours, original = load_weights(tmp_path / "out"), load_weights(base_dir)
    reference = merged_lora_state(base_dir, adapters[adapter])
    assert ours.keys() == original.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == original[name].dtype, name
        assert torch.equal(tensor, reference[name]), name
    changed = [n for n in ours if not torch.equal(ours[n], original[n])]
    expected = {"plain": 2 * 4, "full": 3 * 2 + 2, "bin": 2 * 4}[adapter]  # per layer, + embed_tokens and lm_head
    assert len(changed) == expected


def test_adapted_model_merges_like_the_merged_model_on_disk(tiny, adapters, write_recipe, tmp_path) -> None:
    """base+adapter in a TIES merge gives what the same merge gives with PEFT's merged model saved to disk."""
    from medmerge.tiny import merged_lora_state

    merged_dir = tmp_path / "merged"
    shutil.copytree(tiny["base"], merged_dir)
    (merged_dir / "model.safetensors").unlink()
    from safetensors.torch import save_file

    reference = merged_lora_state(tiny["base"], adapters["plain"])
    save_file({k: v.contiguous() for k, v in reference.items()}, merged_dir / "model.safetensors")

    def ties(ft: str) -> Path:
        return write_recipe(
            {
                "merge_method": "ties",
                "base_model": str(tiny["base"]),
                "dtype": "float32",
                "models": [
                    {"model": str(tiny["base"])},
                    {"model": ft, "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": str(tiny["ft2"]), "parameters": {"weight": 0.4, "density": 0.5}},
                ],
            },
            name=f"{Path(ft).name}.yaml",
        )

    run_merge(ties(f"{tiny['base']}+{adapters['plain']}"), tmp_path / "a")
    run_merge(ties(str(merged_dir)), tmp_path / "b")
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_delta_is_the_scaled_low_rank_product() -> None:
    a, b = torch.randn(4, 10), torch.randn(6, 4)
    assert torch.allclose(lora_delta(a, b, 2.0, transpose=False), 2.0 * b @ a)
    assert lora_delta(a, b, 0.5, transpose=True).shape == (10, 6)
    half = lora_delta(a.bfloat16(), b.bfloat16(), 1.0, transpose=False)
    assert half.dtype == torch.float32  # half-precision factors are multiplied in float32, as PEFT does


def test_adapter_for_other_shapes_is_one_line_before_any_write(tiny, adapters, write_recipe, tmp_path) -> None:
    with pytest.raises(UserError) as err:
        run_merge(passthrough(write_recipe, f"{tiny['base']}+{adapters['wide']}"), tmp_path / "out")
    message = str(err.value)
    assert "adapter_model.safetensors" in message and "do not fit the base's" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def edited_adapter(adapters: dict[str, Path], tmp_path: Path, **config: object) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(adapters["plain"], copy)
    path = copy / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return copy


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"peft_type": "IA3"}, "adapter_config.json: peft_type: 'IA3': medmerge applies LoRA adapters only"),
        ({"use_dora": True}, "adapter_config.json: use_dora: DoRA's magnitude vectors cannot be merged"),
        ({"r": 0}, "adapter_config.json: r: must be a positive integer, got 0"),
        ({"r": 8}, "module 'model.layers.0.self_attn.q_proj': A [4, 64] and B [64, 4] do not fit"),
        ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern: must map module patterns to positive numbers"),
    ],
)
def test_bad_adapter_config_names_file_and_field(tiny, adapters, write_recipe, tmp_path, config, expected) -> None:
    adapter = edited_adapter(adapters, tmp_path, **config)
    with pytest.raises(UserError) as err:
        run_merge(passthrough(write_recipe, f"{tiny['base']}+{adapter}"), None, dry_run=True)
    assert expected in str(err.value)


def test_not_an_adapter_and_bad_references(tiny, adapters, write_recipe, tmp_path) -> None:
    with pytest.raises(UserError, match="is not a PEFT adapter .it has no adapter_config.json"):
        run_merge(passthrough(write_recipe, f"{tiny['base']}+{tiny['ft1']}"), None, dry_run=True)
    for ref, expected in [
        (f"{tiny['base']}+{adapters['plain']}+x", "has more than one '+'"),
        (f"{tiny['base']}+/no/such/adapter", "adapter '/no/such/adapter' is neither an existing directory"),
    ]:
        with pytest.raises(UserError) as err:
            load_recipe(passthrough(write_recipe, ref))
        assert expected in str(err.value) and "recipe.yaml:3: models[0].model:" in str(err.value)


def test_adapter_tensor_for_a_missing_module_is_refused(tiny, adapters, write_recipe, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = edited_adapter(adapters, tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    weights["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(UserError, match="changes 'model.layers.9.self_attn.q_proj.weight', which the base model"):
        run_merge(passthrough(write_recipe, f"{tiny['base']}+{adapter}"), None, dry_run=True)
