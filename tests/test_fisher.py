"""`medmerge fisher` and the `fisher` merge method (Matena & Raffel 2022): the estimate against an independent
oracle, the paper's merge on hand-computed values and through a recipe, and bad inputs as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmerge.cli import main
from medmerge_common.errors import UserError
from merge.methods.fisher import fisher_average
from merge.methods.linear import linear
from merge.run import run_merge
from tests.conftest import load_weights

TEXTS = ["Which organ produces insulin? The pancreas.", "Scurvy comes from a lack of vitamin C.", "The heart pumps."]


@pytest.fixture(scope="module")
def fishers(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fisher")
    data = root / "calibration.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    out = {"data": data}
    for name in ("ft1", "ft2"):
        out[name] = root / name
        assert main(["fisher", str(tiny[name]), "--data", str(data), "-o", str(out[name]), "--quiet"]) == 0
    out["empirical"] = root / "empirical"
    argv = ["fisher", str(tiny["ft1"]), "--data", str(data), "-o", str(out["empirical"]), "--quiet"]
    assert main([*argv, "--estimator", "empirical"]) == 0
    return out


def test_fisher_average_hand_computed() -> None:
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([3.0, 6.0, 0.0])
    f_a, f_b = torch.tensor([1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    # (1·1 + 1·3)/2 = 2;  (3·2 + 1·6)/4 = 3;  both Fishers below ε: floored equal, the plain mean 2
    assert fisher_average([a, b], [f_a, f_b], [1.0, 1.0], 1e-6).tolist() == [2.0, 3.0, 2.0]
    # λ weights the Fishers: (2·1·1 + 1·1·3) / 3
    assert fisher_average([a, b], [f_a, f_b], [2.0, 1.0], 1e-6)[0].item() == pytest.approx(5 / 3)


def test_equal_fishers_are_the_weighted_average() -> None:
    g = torch.Generator().manual_seed(0)
    models = [torch.round(torch.randn(64, 32, generator=g) * 64) / 64 for _ in range(3)]
    weights = [0.5, 0.25, 0.25]
    powers = 2.0 ** torch.randint(-4, 5, (64, 32), generator=g).float()  # per entry, shared: every product is exact
    assert torch.equal(fisher_average(models, [powers] * 3, weights, 1e-6), linear(models, weights))
    same = torch.rand(64, 32, generator=g) + 0.5  # any shared Fisher: the same up to rounding
    assert torch.allclose(fisher_average(models, [same] * 3, weights, 1e-6), linear(models, weights), atol=1e-6)


def test_the_estimate_is_the_mean_squared_gradient_of_the_texts(tiny, fishers) -> None:
    """The empirical Fisher against an oracle built another way: transformers' own loss (mean token
    cross-entropy), times the token count, differentiated per text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((fishers["empirical"] / "fisher.json").read_text())
    assert record["estimator"] == "empirical" and record["texts"] == 3
    tokenizer = AutoTokenizer.from_pretrained(tiny["ft1"])
    model = AutoModelForCausalLM.from_pretrained(tiny["ft1"], dtype=torch.float32).eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        model.zero_grad()
        (model(ids, labels=ids).loss * (ids.shape[1] - 1)).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.square()
    estimate = load_weights(fishers["empirical"])
    checkpoint = load_weights(tiny["ft1"])
    assert set(checkpoint) <= set(estimate)  # every tensor the checkpoint holds has its Fisher
    for name, value in expected.items():
        assert torch.allclose(estimate[name], value / 3, rtol=1e-4, atol=1e-12), name
    sampled = load_weights(fishers["ft1"])
    assert all((f >= 0).all() for f in sampled.values()) and any(f.sum() > 0 for f in sampled.values())
    assert not torch.equal(sampled["lm_head.weight"], estimate["lm_head.weight"])  # y sampled, not the text's


def test_fisher_recipe_merges_by_the_papers_formula(tiny, fishers, tmp_path) -> None:
    recipe = tmp_path / "fisher.yaml"
    recipe.write_text(
        f"merge_method: fisher\ndtype: float32\nmodels:\n"
        f"  - model: {tiny['ft1']}\n    parameters: {{fisher: {fishers['ft1']}, weight: 2.0}}\n"
        f"  - model: {tiny['ft2']}\n    parameters: {{fisher: {fishers['ft2']}}}\n"
    )
    run_merge(recipe, tmp_path / "out")
    merged, a, b = (load_weights(d) for d in (tmp_path / "out", tiny["ft1"], tiny["ft2"]))
    f_a, f_b = load_weights(fishers["ft1"]), load_weights(fishers["ft2"])
    for name in merged:
        assert torch.equal(merged[name], fisher_average([a[name], b[name]], [f_a[name], f_b[name]], [2.0, 1.0], 1e-6))
    # a Fisher computed for another model is refused before anything is read or written
    recipe.write_text(recipe.read_text().replace(str(fishers["ft2"]), str(fishers["data"].parent)))
    with pytest.raises(UserError, match="holds no tensors"):
        run_merge(recipe, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bad_fisher_inputs_are_one_line(tiny, fishers, tmp_path, capsys) -> None:
    wide = tmp_path / "wide"
    assert main(["fisher", str(tiny["wide"]), "--data", str(fishers["data"]), "-o", str(wide), "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # --quiet: nothing, not even transformers' loading bar
    recipe = tmp_path / "r.yaml"
    for models, message in [
        (f"  - model: {tiny['ft1']}\n    parameters: {{fisher: {wide}}}\n", "has shape"),
        (f"  - model: {tiny['ft1']}\n    parameters: {{fisher: [a, b]}}\n", "a path"),
        (f"  - model: {tiny['ft1']}\n", "fisher"),
    ]:
        recipe.write_text(
            f"merge_method: fisher\ndtype: float32\nmodels:\n{models}"
            f"  - model: {tiny['ft2']}\n    parameters: {{fisher: {fishers['ft2']}}}\n"
        )
        assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[0] and "Traceback" not in "\n".join(err), err
        assert not (tmp_path / "out").exists()
    recipe.write_text(
        f"merge_method: fisher\ndtype: float32\ntokenizer_source: union\nmodels:\n"
        f"  - model: {tiny['ft1']}\n    parameters: {{fisher: {fishers['ft1']}}}\n"
        f"  - model: {tiny['ft2']}\n    parameters: {{fisher: {fishers['ft2']}}}\n"
    )
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert "cannot merge over a changed vocabulary" in capsys.readouterr().err
    assert main(["fisher", str(tiny["ft1"]), "--data", str(tmp_path / "none.txt"), "-o", str(tmp_path / "f")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "f").exists()
