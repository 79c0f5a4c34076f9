"""`medmerge moe`: a mixture of experts from dense tiny models — structure, gate rows, seeds, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medmerge.cli import main
from merge.moe.build import PromptRun, build_moe
from merge.moe.gates import normalize, prompt_tokenizer, tokenize_prompts
from tests.conftest import load_weights

MEDICAL = ["The heart pumps blood through the arteries", "Insulin is produced by the beta cells of the pancreas"]
EXAM = ["Question: Options: A. B. C. D. E. [INST] Solve this Multiple Choice Question [/INST] Answer:"]


def moe_config(tiny: dict[str, Path], **settings: object) -> dict:
    return {
        "base_model": str(tiny["base"]),
        "gate_mode": "cheap_embed",
        "experts": [
            {"source_model": str(tiny["ft1"]), "positive_prompts": MEDICAL},
            {"source_model": str(tiny["ft2"]), "positive_prompts": EXAM, "negative_prompts": ["anatomy genetics"]},
        ],
        **settings,
    }


@pytest.fixture
def write_config(tmp_path: Path):
    def write(config: dict | str, name: str = "moe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
        return path

    return write


def test_mixtral_holds_the_base_attention_and_each_experts_mlp(tiny, write_config, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "moe"
    build_moe(write_config(moe_config(tiny, experts_per_token=1)), out)
    weights, base, ft1, ft2 = (load_weights(d) for d in (out, tiny["base"], tiny["ft1"], tiny["ft2"]))
    assert torch.equal(weights["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(
        weights["model.layers.3.self_attn.q_proj.weight"], base["model.layers.3.self_attn.q_proj.weight"]
    )
    assert not any(".mlp." in name for name in weights)
    for layer in range(4):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        for expert, source in ((0, ft1), (1, ft2)):
            for param, projection in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                mine = weights[f"{prefix}.experts.{expert}.{param}.weight"]
                assert torch.equal(mine, source[f"model.layers.{layer}.mlp.{projection}.weight"])
        assert weights[f"{prefix}.gate.weight"].shape == (2, 64)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 2
    assert model.config.num_experts_per_tok == 1 and model.config.sliding_window is None
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
    card = (out / "README.md").read_text()
    assert str(tiny["ft1"]) in card.split("---")[1] and "cheap_embed" in card
    assert (out / "medmerge_moe.yaml").is_file() and (out / "tokenizer.json").read_bytes() == (
        tiny["base"] / "tokenizer.json"
    ).read_bytes()


def test_cheap_embed_rows_are_the_normalised_prompt_embeddings_and_route_their_own_prompts(
    tiny, write_config, tmp_path
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "moe"
    build_moe(write_config(moe_config(tiny)), out)
    gate = load_weights(out)["model.layers.0.block_sparse_moe.gate.weight"]
    embed = load_weights(tiny["base"])["model.embed_tokens.weight"]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny["base"]))

    def bag(prompts: list[str]) -> torch.Tensor:  # n(Σ over prompts and their tokens, BOS included, of E[x])
        ids = [
            i for p in prompts for i in [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]
        ]
        return normalize(embed[ids].sum(0))

    expected = [bag(MEDICAL), normalize(bag(EXAM) - bag(["anatomy genetics"]))]
    for row, want in zip(gate, expected):
        torch.testing.assert_close(row.float(), want, rtol=0, atol=1e-6)
    # every layer routes a medical prompt's bag of embeddings to expert 0 and the exam prompt's to expert 1
    assert int((gate.float() @ bag(MEDICAL)).argmax()) == 0 and int((gate.float() @ bag(EXAM)).argmax()) == 1


@pytest.mark.parametrize(("prompt_dtype", "tolerance"), [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_hidden_rows_come_from_the_base_models_hidden_states(
    tiny, write_config, tmp_path, prompt_dtype, tolerance
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "moe"
    build_moe(write_config(moe_config(tiny, gate_mode="hidden")), out, prompt_run=PromptRun(dtype=prompt_dtype))
    weights = load_weights(out)
    model = AutoModelForCausalLM.from_pretrained(str(tiny["base"]), dtype=torch.float32)
    tokenizer = prompt_tokenizer(AutoTokenizer.from_pretrained(str(tiny["base"])))
    with torch.no_grad():
        states = model(**tokenize_prompts(tokenizer, MEDICAL), output_hidden_states=True).hidden_states
    for layer in range(4):  # the state entering layer l at the last position, averaged over the prompts
        want = normalize(states[layer][:, -1, :].mean(0))
        got = weights[f"model.layers.{layer}.block_sparse_moe.gate.weight"][0]
        assert got.dtype == torch.float32  # the base's dtype
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance)  # bf16: rounded sums, as mergekit's


def test_random_gates_and_expert_noise_depend_only_on_the_seed(tiny, write_config, tmp_path) -> None:
    config = moe_config(tiny, gate_mode="random")
    config["experts"][0]["noise_scale"] = 0.01
    path = write_config(config)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        build_moe(path, tmp_path / name, seed=seed)
        runs[name] = load_weights(tmp_path / name)
    gate, noisy = "model.layers.2.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"][gate], runs["c"][gate]) and not torch.equal(runs["a"][noisy], runs["c"][noisy])
    noise = runs["a"][noisy] - load_weights(tiny["ft1"])["model.layers.1.mlp.gate_proj.weight"]
    assert 0.008 < float(noise.std()) < 0.012  # N(0, noise_scale²)
    clean = "model.layers.1.block_sparse_moe.experts.1.w1.weight"
    assert torch.equal(runs["a"][clean], load_weights(tiny["ft2"])["model.layers.1.mlp.gate_proj.weight"])

    build_moe(write_config(moe_config(tiny, gate_mode="uniform_random")), tmp_path / "u")
    uniform = load_weights(tmp_path / "u")[gate]
    assert float(uniform.abs().max()) <= 64**-0.5 and float(uniform.std()) > 0.05


def test_residual_scale_multiplies_only_the_down_projection(tiny, write_config, tmp_path) -> None:
    config = moe_config(tiny)
    config["experts"][1]["residual_scale"] = 0.5
    build_moe(write_config(config), tmp_path / "moe")
    weights, ft2 = load_weights(tmp_path / "moe"), load_weights(tiny["ft2"])
    prefix = "model.layers.0.block_sparse_moe.experts.1"
    assert torch.equal(weights[f"{prefix}.w2.weight"], ft2["model.layers.0.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(weights[f"{prefix}.w1.weight"], ft2["model.layers.0.mlp.gate_proj.weight"])


def test_qwen_moe_from_mistral_models_gets_a_shared_expert_and_zero_attention_biases(
    tiny, write_config, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    config = moe_config(tiny, architecture="qwen", dtype="bfloat16")
    config["shared_experts"] = [{"source_model": str(tiny["base"]), "positive_prompts": ["nutrition"]}]
    build_moe(write_config(config), tmp_path / "moe")
    weights, base = load_weights(tmp_path / "moe"), load_weights(tiny["base"])
    assert torch.equal(weights["model.layers.0.self_attn.k_proj.bias"], torch.zeros(32, dtype=torch.bfloat16))
    assert torch.equal(
        weights["model.layers.2.mlp.shared_expert.up_proj.weight"],
        base["model.layers.2.mlp.up_proj.weight"].to(torch.bfloat16),
    )
    assert weights["model.layers.2.mlp.shared_expert_gate.weight"].shape == (1, 64)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"))
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 2


def test_dry_run_reads_no_weights_and_writes_nothing(tiny, write_config, tmp_path, capsys) -> None:
    path = write_config(moe_config(tiny))
    assert main(["moe", "build", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "Mixtral: 2 experts x 4 layers, 2 per token, gate_mode cheap_embed" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


BAD_CONFIGS = {
    "unknown key": ({"gate_mod": "hidden"}, "gate_mod: unknown key 'gate_mod' (did you mean 'gate_mode'?)"),
    "gate mode": ({"gate_mode": "hiden"}, "gate_mode: input should be 'hidden'"),
    "too many per token": ({"experts_per_token": 3}, "experts_per_token: 3 experts per token, but only 2 experts"),
    "architecture": ({"architecture": "deepseek"}, "architecture: unknown architecture 'deepseek'"),
    "qwen3 from mistral": ({"architecture": "qwen3"}, "Qwen3 MoE is built from qwen3 models, not mistral"),
    "dtype": ({"dtype": "fp8"}, "dtype: unknown dtype 'fp8'"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs_are_one_line_with_file_line_and_field(tiny, write_config, tmp_path, capsys, case) -> None:
    settings, message = BAD_CONFIGS[case]
    path = write_config(moe_config(tiny, **settings))
    err = _error(["moe", str(path), str(tmp_path / "out")], capsys)
    assert err.startswith(f"medmerge: error: {path}:") and message in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_expert_problems_name_the_expert(tiny, write_config, tmp_path, capsys) -> None:
    config = moe_config(tiny, gate_mode="hidden")
    del config["experts"][1]["positive_prompts"]
    err = _error(["moe", str(write_config(config)), str(tmp_path / "out")], capsys)
    assert ":8: experts[1]: gate_mode hidden builds each gate row from prompts" in err

    config = moe_config(tiny)
    config["experts"][1] |= {"positive_prompts": MEDICAL, "negative_prompts": None}
    err = _error(["moe", str(write_config(config)), str(tmp_path / "out")], capsys)
    assert "experts: every expert has the same prompts" in err

    config = moe_config(tiny)
    config["experts"][1]["source_model"] = config["experts"][0]["source_model"]
    err = _error(["moe", str(write_config(config)), str(tmp_path / "out")], capsys)
    assert "every expert is the same model" in err and "--allow-all-same" in err
    assert main(["moe", str(write_config(config)), str(tmp_path / "same"), "--allow-all-same", "--quiet"]) == 0

    text = yaml.safe_dump(moe_config(tiny), sort_keys=False).replace(
        "  negative_prompts:", "  noise_scale: .nan\n  negative_prompts:"
    )
    err = _error(["moe", str(write_config(text)), str(tmp_path / "out")], capsys)
    assert ":12: experts[1].noise_scale: must be a finite number, got nan" in err

    config = moe_config(tiny)
    config["experts"][1]["source_model"] = str(tiny["wide"])
    err = _error(["moe", str(write_config(config)), str(tmp_path / "out")], capsys)
    assert "experts[1].source_model: model" in err and "every expert needs the base's hidden and intermediate" in err

    config = moe_config(tiny)
    config["experts"][0]["source_model"] = str(tiny["llama_tied"])
    err = _error(["moe", str(write_config(config)), str(tmp_path / "out")], capsys)
    assert "base_model: no MoE architecture can hold these models" in err and "llama, mistral" in err
    assert not (tmp_path / "out").exists()
