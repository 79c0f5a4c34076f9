"""Every recipe shipped in recipes/ validates and plans (`--dry-run`) without downloading anything.

The hub models are stood in for by header fixtures in a MEDMERGE_MODEL_DIR mirror: each holds a real
Mistral-7B config.json and a safetensors file that has the real tensor names, dtypes and shapes in its
header and a data area that is a hole in a sparse file (no disk used) — exactly what validation and
planning read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from merge.moe.build import build_moe
from merge.moe.config import load_moe_config
from merge.recipe import load_recipe
from merge.run import run_merge

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
MOE_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "recipes" / "moe").glob("*.yaml"))
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


def mistral_7b_header() -> dict:
    h, inter, v, kv = 4096, 14336, 32000, 1024
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for i in range(32):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": [h, h],
            p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h],
            p + "self_attn.o_proj.weight": [h, h],
            p + "mlp.gate_proj.weight": [inter, h],
            p + "mlp.up_proj.weight": [inter, h],
            p + "mlp.down_proj.weight": [h, inter],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        }
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header


@pytest.fixture(scope="module")
def header_mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    header = mistral_7b_header()
    encoded = json.dumps(header).encode()
    data_bytes = max(entry["data_offsets"][1] for entry in header.values())
    refs = {ref for path in RECIPES for ref in load_recipe(path).model_refs()}
    refs |= {ref for path in MOE_CONFIGS for ref in load_moe_config(path).model_refs()}
    for ref in refs:
        directory = root / ref
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps(MISTRAL_7B))
        with open(directory / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            f.truncate(f.tell() + data_bytes)  # the data area is a hole: a sparse file, no disk used
    return root


def test_recipes_exist() -> None:
    # BioMistral x {Instruct v0.1, Instruct v0.2, InternistAI} x {published gradient SLERP, TIES, DARE-TIES, and the
    # merging study's constant-alpha SLERP and plain DARE}
    assert [p.name for p in RECIPES] == sorted(
        f"biomistral-{pairing}-{kind}.yaml"
        for pairing in ("instruct", "instruct-v0.2", "internist")
        for kind in ("slerp", "ties", "dare-ties", "slerp-alpha05", "dare")
    )
    for path in RECIPES:  # each says where its settings come from
        assert path.read_text().startswith("# BioMistral-7B x "), path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_plans_without_download(path: Path, header_mirror: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDMERGE_MODEL_DIR", str(header_mirror))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(path)
    assert recipe.dtype == "bfloat16" and "BioMistral/BioMistral-7B" in recipe.model_refs()
    result = run_merge(path, tmp_path / "out", dry_run=True)
    assert len(result.plan.jobs) == 3 + 32 * 9 and result.plan.num_layers == 32
    assert not (tmp_path / "out").exists()
    if path.stem.endswith("slerp-alpha05"):  # the study's constant alpha
        assert {j.params["t"] for j in result.plan.jobs} == {0.5}
    elif path.stem.endswith("-dare"):  # the study's plain DARE: density and weight 0.5, no sign election
        assert recipe.merge_method == "dare_linear"
        assert {(s.params["weight"], s.params["density"]) for j in result.plan.jobs for s in j.sources if s.params} == {
            (0.5, 0.5)
        }
    elif recipe.merge_method == "slerp":  # BioMistral's gradient: self_attn 0 at layer 0, 1 at layer 31
        t = {j.output.name: j.params["t"] for j in result.plan.jobs}
        assert t["model.layers.0.self_attn.q_proj.weight"] == 0.0
        assert t["model.layers.31.self_attn.q_proj.weight"] == 1.0
        assert t["model.layers.31.mlp.up_proj.weight"] == 0.0
        assert t["model.embed_tokens.weight"] == 0.5 and t["lm_head.weight"] == 0.5


@pytest.mark.parametrize("path", MOE_CONFIGS, ids=[p.name for p in MOE_CONFIGS])
def test_shipped_moe_config_plans_without_download(
    path: Path, header_mirror: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("MEDMERGE_MODEL_DIR", str(header_mirror))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = build_moe(path, tmp_path / "out", dry_run=True).plan
    assert plan.layout.name == "Mixtral" and plan.num_layers == 32 and len(plan.config.experts) == 2
    assert len(plan.tensors) == (3 + 32 * 6) + 32 * 2 * 3 + 32  # base's non-MLP tensors, experts' MLPs, routers
    assert "BioMistral/BioMistral-7B" in plan.config.model_refs() and not (tmp_path / "out").exists()
