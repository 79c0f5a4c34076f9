"""End-to-end merges of tiny real models: outputs, properties, validation against headers, atomicity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from medmerge_common.errors import UserError
from merge.methods import METHODS
from merge.run import run_merge
from tests.conftest import load_weights


def ties_recipe(tiny: dict[str, Path], method: str = "ties", **extra: object) -> dict:
    return {
        "merge_method": method,
        "base_model": str(tiny["base"]),
        "dtype": "bfloat16",
        "models": [
            {"model": str(tiny["base"])},
            {"model": str(tiny["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(tiny["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        **extra,
    }


def test_linear_weights_one_zero_reproduces_model_a(tiny, write_recipe, tmp_path) -> None:
    path = write_recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tiny["ft1"]), "parameters": {"weight": 1.0}},
                {"model": str(tiny["ft2"]), "parameters": {"weight": 0.0}},
            ],
        }
    )
    run_merge(path, tmp_path / "out")
    merged, a = load_weights(tmp_path / "out"), load_weights(tiny["ft1"])
    assert merged.keys() == a.keys() and all(torch.equal(merged[k], a[k]) for k in a)


def test_slerp_t0_gives_base_and_output_loads_in_transformers(tiny, write_recipe, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    path = write_recipe(
        {
            "merge_method": "slerp",
            "base_model": str(tiny["base"]),
            "parameters": {"t": 0},
            "models": [{"model": str(tiny["base"])}, {"model": str(tiny["ft1"])}],
        }
    )
    run_merge(path, tmp_path / "out")
    merged, base = load_weights(tmp_path / "out"), load_weights(tiny["base"])
    assert all(torch.equal(merged[k], base[k]) for k in base)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 12]])
    reference = AutoModelForCausalLM.from_pretrained(tiny["base"])
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_output_directory_contents(tiny, write_recipe, tmp_path) -> None:
    path = write_recipe(ties_recipe(tiny, name="tiny-ties"))
    run_merge(path, tmp_path / "out")
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "medmerge_recipe.yaml",
        "README.md",
        "model.safetensors",
    } <= names
    assert (out / "medmerge_recipe.yaml").read_text() == path.read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {
        "base_model": [str(tiny["base"]), str(tiny["ft1"]), str(tiny["ft2"])],
        "library_name": "transformers",
        "tags": ["merge", "medmerge"],
    }
    assert "# tiny-ties" in card and "arxiv.org/abs/2306.01708" in card
    assert all(t.dtype == torch.bfloat16 for t in load_weights(out).values())
    assert not list(tmp_path.glob(".out.*"))  # no staging directory left behind


def test_sharded_output_and_index(tiny, write_recipe, tmp_path) -> None:
    path = write_recipe(ties_recipe(tiny))
    run_merge(path, tmp_path / "one")
    run_merge(path, tmp_path / "many", shard_bytes=20_000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # every shard respects the limit unless it holds one oversized tensor
        tensors = [n for n, f in index["weight_map"].items() if f == shard]
        assert (tmp_path / "many" / shard).stat().st_size <= 20_000 + 4096 or len(tensors) == 1
    one, many = load_weights(tmp_path / "one"), load_weights(tmp_path / "many")
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in many.values())


def test_sharded_and_bin_inputs_read_like_a_single_file(tiny, write_recipe, tmp_path) -> None:
    outs = []
    for source in ("base", "base_sharded", "base_bin"):
        path = write_recipe(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(tiny[source]), "parameters": {"weight": 0.7}},
                    {"model": str(tiny["ft1"]), "parameters": {"weight": 0.3}},
                ],
            },
            name=f"{source}.yaml",
        )
        run_merge(path, tmp_path / source)
        outs.append(load_weights(tmp_path / source))
    assert all(torch.equal(outs[0][k], o[k]) for o in outs[1:] for k in outs[0])


def test_dare_is_reproducible_whatever_order_shards_or_threads(tiny, write_recipe, tmp_path) -> None:
    path = write_recipe(ties_recipe(tiny, "dare_ties", parameters={"int8_mask": True}))
    run_merge(path, tmp_path / "a", seed=42)
    run_merge(path, tmp_path / "b", seed=42, shard_bytes=15_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_merge(path, tmp_path / "c", seed=42)
    finally:
        torch.set_num_threads(threads)
    run_merge(path, tmp_path / "d", seed=43)
    a, b, c, d = (load_weights(tmp_path / x) for x in "abcd")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], d[k]) for k in a)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


def test_random_draws_depend_on_tensor_name_not_plan_order(tiny) -> None:
    # merging the jobs in reverse order gives the same tensors
    import tempfile

    from merge.recipe import load_recipe
    from merge.run import merge_tensor, method_rng, plan_merge

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        for method in ("dare_linear", "della"):
            path.write_text(yaml.safe_dump(ties_recipe(tiny, method)))
            plan, models = plan_merge(load_recipe(path), weights=True)

            def merged(job, plan=plan, models=models):
                inputs = [models[s.model].read(s.tensor, torch.bfloat16) for s in job.sources]
                return merge_tensor(job, inputs, plan, method_rng(job, plan, seed=1))

            forward = {j.output.name: merged(j) for j in plan.jobs}
            backward = {j.output.name: merged(j) for j in reversed(plan.jobs)}
            assert all(torch.equal(forward[k], backward[k]) for k in forward), method


def test_passthrough_slices_stack_layers_and_update_config(tiny, write_recipe, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    path = write_recipe(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(tiny["base"]), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(tiny["ft1"]), "layer_range": [1, 4]}]},
            ],
        }
    )
    run_merge(path, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    merged, base, ft1 = load_weights(tmp_path / "out"), load_weights(tiny["base"]), load_weights(tiny["ft1"])
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.3.mlp.up_proj.weight"], ft1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(merged["lm_head.weight"], ft1["lm_head.weight"])  # post tensors from the last slice
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 6


def test_tied_embedding_llama_merges_without_lm_head(tiny, write_recipe, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    path = write_recipe(
        {
            "merge_method": "ties",
            "base_model": str(tiny["llama_tied"]),
            "models": [{"model": str(tiny["llama_tied_ft"]), "parameters": {"weight": 1.0, "density": 0.5}}],
        }
    )
    run_merge(path, tmp_path / "out")
    assert "lm_head.weight" not in load_weights(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (
        model.config.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )


def test_gradient_parameters_reach_each_layer(tiny, write_recipe, tmp_path) -> None:
    # linear with a weight gradient on ft1 over 4 layers: layer i gets weight i/3 (ft2 weight 1 - i/3 via filter)
    path = write_recipe(
        {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": str(tiny["ft1"]), "parameters": {"weight": [0.0, 1.0]}},
                {"model": str(tiny["ft2"]), "parameters": {"weight": [1.0, 0.0]}},
            ],
        }
    )
    run_merge(path, tmp_path / "out")
    merged, a, b = load_weights(tmp_path / "out"), load_weights(tiny["ft1"]), load_weights(tiny["ft2"])
    name = "model.layers.{}.self_attn.o_proj.weight"
    assert torch.equal(merged[name.format(0)], b[name.format(0)])
    assert torch.equal(merged[name.format(3)], a[name.format(3)])
    w = 1 / 3
    expected = (a[name.format(1)] * w + b[name.format(1)] * (1 - w)) / (w + (1 - w))
    assert torch.allclose(merged[name.format(1)], expected, atol=1e-6)
    assert torch.equal(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # t = 0


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda t: {
                "merge_method": "linear",
                "models": [
                    {"model": str(t["base"]), "parameters": {"weight": 1}},
                    {"model": str(t["llama_tied"]), "parameters": {"weight": 1}},
                ],
            },
            "only models of one architecture",
        ),
        (
            lambda t: {
                "merge_method": "linear",
                "models": [
                    {"model": str(t["base"]), "parameters": {"weight": 1}},
                    {"model": str(t["wide"]), "parameters": {"weight": 1}},
                ],
            },
            "has different shapes",
        ),
        (
            lambda t: {
                "merge_method": "linear",
                "models": [
                    {"model": str(t["base"]), "parameters": {"weight": 1}},
                    {"model": str(t["ft1"]), "parameters": {"weight": -1}},
                ],
            },
            "sum to zero",
        ),
        (
            lambda t: {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": str(t["base"]), "layer_range": [0, 9]}]}],
            },
            "out of bounds: model",
        ),
    ],
)
def test_mismatches_found_from_headers_before_any_output(tiny, write_recipe, tmp_path, make, expected) -> None:
    path = write_recipe(make(tiny))
    with pytest.raises(UserError) as info:
        run_merge(path, tmp_path / "out")
    assert expected in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_layer_range_error_names_its_line(tiny, write_recipe, tmp_path) -> None:
    path = write_recipe(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {tiny['base']}\n"
        "        layer_range: [0, 9]\n"
    )
    with pytest.raises(UserError) as info:
        run_merge(path, tmp_path / "out")
    assert str(info.value).startswith(f"{path}:5: slices[0].sources[0].layer_range: layer_range [0, 9] is out of")


def test_refuses_non_empty_output_unless_overwrite(tiny, write_recipe, tmp_path) -> None:
    path = write_recipe(ties_recipe(tiny))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="exists and is not empty"):
        run_merge(path, out)
    # --overwrite replaces only what a merge tool wrote: a directory of the user's own stays as it is
    with pytest.raises(UserError, match="was not written by medmerge .* remove it yourself"):
        run_merge(path, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    run_merge(path, out)
    first = (out / "model.safetensors").stat().st_ino
    run_merge(path, out, overwrite=True)
    assert (out / "model.safetensors").exists() and (out / "model.safetensors").stat().st_ino != first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_mid_merge_leaves_nothing_behind(tiny, write_recipe, tmp_path, monkeypatch) -> None:
    import merge.run

    path = write_recipe(ties_recipe(tiny))
    calls = {"n": 0}
    original = merge.run.merge_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(merge.run, "merge_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        run_merge(path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [path]


def test_dry_run_reads_no_weights_and_writes_nothing(tiny, write_recipe, tmp_path, monkeypatch) -> None:
    from merge.io.checkpoint import Checkpoint

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(Checkpoint, "read", no_reading)
    result = run_merge(write_recipe(ties_recipe(tiny)), tmp_path / "out", dry_run=True)
    assert len(result.plan.jobs) == 39 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("breadcrumbs", {}),
        ("breadcrumbs_ties", {"parameters": {"normalize": True}}),
        ("della", {"parameters": {"lambda": 0.9}}),
        ("della_linear", {}),
        ("model_stock", {"parameters": {"filter_wise": True}}),
        ("nuslerp", {"parameters": {"nuslerp_flatten": False}}),
        ("multislerp", {}),
        ("karcher", {"parameters": {"max_iter": 20}}),
        ("sce", {"parameters": {"select_topk": 0.5}}),
        ("ram", {"parameters": {"epsilon": 0.05}}),
        ("ramplus_tl", {"parameters": {"epsilon": 0.05, "r": 0.5}}),
        ("arcee_fusion", {}),
        ("consensus_ta", {"parameters": {"k": 1}}),
        ("consensus_ties", {}),
    ],
)
def test_new_methods_merge_three_models_into_a_loadable_model(tiny, write_recipe, tmp_path, method, extra) -> None:
    from transformers import AutoModelForCausalLM

    recipe = ties_recipe(tiny, method, **extra)
    spec = METHODS[method]
    for m in recipe["models"]:  # only the per-model parameters the method has (model_stock: the angle decides)
        own = {k: v for k, v in m.pop("parameters", {}).items() if spec.param(k)}
        m.update({"parameters": own} if own else {})
    recipe["models"] = recipe["models"][: 1 + (spec.max_models or 2)]  # arcee_fusion: the base and one model
    out = tmp_path / "out"
    run_merge(write_recipe(recipe), out, seed=5)
    merged, base = load_weights(out), load_weights(tiny["base"])
    assert set(merged) == set(base) and all(torch.isfinite(t.float()).all() for t in merged.values())
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    card = (out / "README.md").read_text()
    assert method in card and spec.paper in card
    AutoModelForCausalLM.from_pretrained(out)


def test_inputs_a_method_cannot_merge_name_the_tensor_and_leave_nothing(tiny, write_recipe, tmp_path) -> None:
    negated = tmp_path / "negated"
    shutil.copytree(tiny["ft1"], negated)
    weights = load_weights(tiny["ft1"])
    save_file({k: -v if v.is_floating_point() else v for k, v in weights.items()}, negated / "model.safetensors")
    recipe = {
        "merge_method": "multislerp",  # opposed directions with equal weights: no mean direction for three inputs
        "models": [
            {"model": str(tiny["ft1"]), "parameters": {"weight": 1}},
            {"model": str(negated), "parameters": {"weight": 1}},
            {"model": str(tiny["base"]), "parameters": {"weight": 0}},
        ],
    }
    with pytest.raises(UserError, match=r"^multislerp cannot merge tensor 'model\.embed_tokens\.weight': the weighted"):
        run_merge(write_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_nearswap_recipe(tiny, write_recipe, tmp_path) -> None:
    recipe = {
        "merge_method": "nearswap",
        "base_model": str(tiny["base"]),
        "dtype": "float32",
        "models": [{"model": str(tiny["base"])}, {"model": str(tiny["ft1"])}],
        "parameters": {"t": 0.001},
    }
    run_merge(write_recipe(recipe), tmp_path / "out")
    out, base, ft1 = load_weights(tmp_path / "out"), load_weights(tiny["base"]), load_weights(tiny["ft1"])
    name = "model.layers.0.mlp.up_proj.weight"
    near = (base[name] - ft1[name]).abs() <= 0.001
    assert torch.equal(out[name][near], ft1[name][near])  # within t: the other model's value


def test_della_density_and_epsilon_outside_0_1_is_one_line_before_merging(tiny, write_recipe, tmp_path) -> None:
    recipe = ties_recipe(tiny, "della")
    recipe["models"][1]["parameters"] |= {"density": 0.1, "epsilon": 0.15}
    with pytest.raises(UserError) as info:
        run_merge(write_recipe(recipe), tmp_path / "out")
    (problem,) = info.value.problems
    assert "density 0.1 ± epsilon 0.15 must lie inside (0, 1)" in str(problem) and "more tensor(s)" in str(problem)
    assert not (tmp_path / "out").exists()
