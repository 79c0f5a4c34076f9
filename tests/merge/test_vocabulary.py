"""tokenizer_source / tokenizer: models with different vocabularies merged on one output vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmerge_common.errors import UserError
from merge.recipe import load_recipe
from merge.run import run_merge
from merge.vocabulary import align_rows
from tests.conftest import load_weights

MEDICAL = ["hemoglobin erythrocyte leukocyte thrombocyte nephron glomerulus hepatocyte"] * 3


@pytest.fixture(scope="module")
def vocabularies(tiny, tmp_path_factory) -> dict[str, Path]:
    """`other_vocab`: a model whose tokenizer (420 tokens, other ids, medical words) differs from tiny's."""
    from medmerge.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("vocab")
    build_tokenizer(root / "tokenizer", vocab_size=420, extra_text=MEDICAL)
    build_model(root / "other_vocab", root / "tokenizer", seed=21)
    return {"other_vocab": root / "other_vocab"}


def vocab_of(directory: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory)).get_vocab()


def test_align_rows_follows_each_rule() -> None:
    """Output tokens 0..5 against 3 models (model 0 the base); rows[m][j] = -1 where model m lacks token j."""
    e = [torch.arange(12.0).reshape(6, 2) + 100 * m for m in range(3)]
    rows = [
        torch.tensor([0, 1, -1, -1, 4, 5]),  # base
        torch.tensor([0, -1, 2, -1, -1, 5]),
        torch.tensor([0, -1, 3, -1, 1, 5]),
    ]
    aligned = align_rows(e, rows, base_index=0, rules={5: ("zero", None, None, True)}, size=8)
    row = [[aligned[m][j] for j in range(6)] for m in range(3)]
    for m in range(3):
        assert torch.equal(row[m][0], e[m][0])  # everyone has it: own rows
        assert torch.equal(row[m][1], e[0][1])  # only the base has it: its row
        assert torch.equal(row[m][3], torch.zeros(2))  # nobody has it: zero
        assert torch.equal(row[m][5], torch.zeros(2))  # forced to zero for everyone
        assert torch.equal(aligned[m][6], aligned[m][:6].mean(0)) and torch.equal(aligned[m][7], aligned[m][6])
    assert torch.equal(row[0][2], (e[1][2] + e[2][3]) / 2)  # two non-base models have it: their mean
    assert torch.equal(row[1][2], e[1][2]) and torch.equal(row[2][2], e[2][3])
    assert torch.equal(row[1][4], e[0][4]) and torch.equal(row[2][4], e[2][1])  # the base's row for the one lacking
    without_base = align_rows(e, rows, base_index=None, rules={}, size=6)
    assert torch.equal(without_base[1][4], (e[0][4] + e[2][1]) / 2)
    by_id = align_rows(e, rows, base_index=0, rules={3: ("model_token", 2, 4, False)}, size=6)
    assert torch.equal(by_id[0][3], e[2][4])


def union_recipe(tiny: dict[str, Path], other: Path, **extra: object) -> dict:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(tiny["base"]), "parameters": {"weight": 0.75}},
            {"model": str(other), "parameters": {"weight": 0.25}},
        ],
        "dtype": "float32",
        "tokenizer_source": "union",
        **extra,
    }


def test_union_merges_each_token_row_and_writes_the_union_tokenizer(tiny, vocabularies, write_recipe, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = vocabularies["other_vocab"]
    run_merge(write_recipe(union_recipe(tiny, other)), tmp_path / "out")
    out_vocab, base_vocab, other_vocab = vocab_of(tmp_path / "out"), vocab_of(tiny["base"]), vocab_of(other)
    new = sorted(set(other_vocab) - set(base_vocab), key=other_vocab.__getitem__)
    assert {t: out_vocab[t] for t in base_vocab} == base_vocab  # the base's ids are kept
    assert [out_vocab[t] for t in new] == list(range(len(base_vocab), len(base_vocab) + len(new)))  # then by id
    merged, a, b = load_weights(tmp_path / "out"), load_weights(tiny["base"]), load_weights(other)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(out_vocab)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == (len(out_vocab), 64)
        for token, index in out_vocab.items():
            in_a, in_b = token in base_vocab, token in other_vocab
            row_a = a[name][base_vocab[token]] if in_a else b[name][other_vocab[token]]
            row_b = b[name][other_vocab[token]] if in_b else a[name][base_vocab[token]]
            assert torch.allclose(merged[name][index], 0.75 * row_a + 0.25 * row_b, atol=1e-6), (name, token)
    assert torch.equal(merged["model.norm.weight"], 0.75 * a["model.norm.weight"] + 0.25 * b["model.norm.weight"])
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ids = tokenizer("hemoglobin and the heart", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(out_vocab)


def test_tokens_and_padding(tiny, vocabularies, write_recipe, tmp_path) -> None:
    other = vocabularies["other_vocab"]
    other_vocab = vocab_of(other)
    settings = {
        "source": "base",
        "pad_to_multiple_of": 64,
        "tokens": {
            "<new>": {"source": {"kind": "zero"}},
            "<s>": {"source": {"kind": "model_token", "model": str(other), "token": "</s>"}, "force": True},
        },
    }
    run_merge(write_recipe(union_recipe(tiny, other, tokenizer_source=None, tokenizer=settings)), tmp_path / "out")
    out_vocab, base_vocab = vocab_of(tmp_path / "out"), vocab_of(tiny["base"])
    assert set(out_vocab) == set(base_vocab) | {"<new>"}  # base: the other model's tokens are not added
    merged, b = load_weights(tmp_path / "out"), load_weights(other)
    embed = merged["model.embed_tokens.weight"]
    assert embed.shape[0] == 448 and json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 448
    assert torch.equal(embed[out_vocab["<new>"]], torch.zeros(64))
    assert torch.equal(embed[out_vocab["<s>"]], b["model.embed_tokens.weight"][other_vocab["</s>"]])  # both took it
    # each model's padding rows are its mean row; linear in the rows, so the merge's are the merged mean row
    pad = embed[: len(out_vocab)].mean(0).expand(448 - len(out_vocab), 64)
    assert torch.allclose(embed[len(out_vocab) :], pad, atol=1e-7)


def test_same_vocabulary_copies_the_tokenizer_files(tiny, write_recipe, tmp_path) -> None:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tiny["ft1"]), "parameters": {"weight": 1}}, {"model": str(tiny["ft2"])}],
        "parameters": {"weight": 1},
        "tokenizer_source": str(tiny["ft2"]),
    }
    run_merge(write_recipe(recipe), tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tiny["ft2"] / name).read_bytes()


def test_vocabulary_mismatch_without_tokenizer_source_is_one_line_with_the_fix(
    tiny, vocabularies, write_recipe, tmp_path
) -> None:
    recipe = union_recipe(tiny, vocabularies["other_vocab"], tokenizer_source=None)
    with pytest.raises(UserError) as err:
        run_merge(write_recipe(recipe), tmp_path / "out", dry_run=True)
    assert "tensor 'model.embed_tokens.weight' has different shapes" in str(err.value)
    assert "merge with tokenizer_source: union" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"tokenizer": {"source": "base"}}, "recipe.yaml:11: tokenizer: give tokenizer_source or tokenizer, not both"),
        ({"tokenizer_source": "unoin"}, "tokenizer_source: 'unoin' is not 'union', 'base' or one of the recipe's"),
        (
            {"tokenizer_source": None, "tokenizer": {"tokens": {"x": {"source": "/elsewhere"}}}},
            "tokenizer.tokens.x.source: model '/elsewhere' is not one of the recipe's models",
        ),
        (
            {
                "tokenizer_source": None,
                "tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "a"}}}},
            },
            "give exactly one of token_id and token",
        ),
        ({"tokenizer_source": None, "tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ],
)
def test_bad_tokenizer_settings_name_the_field(tiny, vocabularies, write_recipe, extra, expected) -> None:
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(union_recipe(tiny, vocabularies["other_vocab"], **extra)))
    assert expected in str(err.value)


def test_token_source_that_lacks_the_token_names_the_field(tiny, vocabularies, write_recipe, tmp_path) -> None:
    settings = {"tokens": {"hemoglobin": {"source": str(tiny["base"])}}}
    recipe = union_recipe(tiny, vocabularies["other_vocab"], tokenizer_source=None, tokenizer=settings)
    with pytest.raises(UserError, match=r"tokenizer.tokens.hemoglobin.source: model '.*base' does not have the token"):
        run_merge(write_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dry_run_describes_the_vocabulary(tiny, vocabularies, write_recipe) -> None:
    from medmerge.console import describe_plan

    result = run_merge(write_recipe(union_recipe(tiny, vocabularies["other_vocab"])), None, dry_run=True)
    out_vocab = result.plan.vocabulary
    assert out_vocab is not None
    lacking = int((out_vocab.rows[str(tiny["base"])] < 0).sum())
    assert lacking == len(out_vocab.tokens) - 384 > 0
    assert f"vocabulary  {len(out_vocab.tokens)} tokens (union), {len(out_vocab.tokens)} rows; " in describe_plan(
        result.plan
    )
