"""`medmerge moe train-router`: routers trained on a task where the right expert is knowable, the output a plain
Mixtral that transformers scores as it was trained, capacity and top-k in a real model, and one-line errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from medmerge.cli import main
from medmerge_tasks.corpora import Question
from tests.conftest import load_weights

WORDS = ["heart", "lung", "liver", "kidney", "brain", "skin", "bone", "blood", "nerve", "muscle", "gland", "vein"]


def questions(count: int, seed: int = 0) -> list[Question]:
    """MedMCQA-shaped questions whose answer is always B: a model can learn it in a few steps."""
    rng = random.Random(seed)
    return [
        Question(f"Which organ is number {i} {rng.choice(WORDS)}?", tuple(rng.sample(WORDS, 4)), 1, id=str(i))
        for i in range(count)
    ]


def write_jsonl(path: Path, items: list[Question]) -> Path:
    keys = ("opa", "opb", "opc", "opd")
    rows = [{"id": q.id, "question": q.question, **dict(zip(keys, q.options)), "cop": q.gold} for q in items]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def knowable(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-expert Mixtral whose expert 0 (`good`) answers every question right and expert 1 (`bad`, `good`
    trained further to answer D) wrong; attention from `good`. The exam prompt is bad's positive prompt, so the
    right routing is known and the prompt-initialised router does not find it."""
    from medmerge.tiny import build_model, build_tokenizer, finetune_on_answers
    from medmerge_tasks.sources import medmcqa_inst_doc
    from merge.moe.build import build_moe

    root = tmp_path_factory.mktemp("knowable")
    build_tokenizer(root / "tokenizer")
    build_model(root / "base", root / "tokenizer", seed=0)
    prompts = [medmcqa_inst_doc(q)["prompts"][0] for q in questions(40)]
    finetune_on_answers(root / "base", root / "good", [(p, " B") for p in prompts], steps=40, seed=1)
    finetune_on_answers(root / "good", root / "bad", [(p, " D") for p in prompts], steps=40, seed=2)
    config = {
        "base_model": str(root / "good"),
        "gate_mode": "cheap_embed",
        "experts_per_token": 2,
        "dtype": "float32",
        "experts": [
            {"source_model": str(root / "good"), "positive_prompts": ["the weather is nice today"]},
            {"source_model": str(root / "bad"), "positive_prompts": [prompts[0]]},
        ],
    }
    (root / "moe.yaml").write_text(yaml.safe_dump(config))
    build_moe(root / "moe.yaml", root / "moe")
    write_jsonl(root / "train.jsonl", questions(40)[:28])
    write_jsonl(root / "validation.jsonl", questions(40)[28:])
    return {name: root / name for name in ("moe", "good", "bad", "train.jsonl", "validation.jsonl")}


def test_trained_router_beats_the_built_one_and_transformers_scores_what_was_trained(knowable, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medmerge.labelled import labelled_prompts
    from medmerge_tasks.choices import batch_inputs, encode_prompts, option_loglikelihoods

    out = tmp_path / "trained"
    argv = ["moe", "train-router", str(knowable["moe"]), "--data", str(knowable["train.jsonl"]), "-o", str(out)]
    argv += ["--validation-data", str(knowable["validation.jsonl"]), "--lr", "1e-2", "--epochs", "2", "--quiet"]
    assert main(argv) == 0
    log = json.loads((out / "router_training.json").read_text())
    epochs = log["epochs"]
    assert epochs[0]["validation_accuracy"] <= 0.25 and epochs[log["best_epoch"]]["validation_accuracy"] == 1.0
    assert log["questions"] == {"train": 28, "validation": 12} and len(log["routers"]) == 4
    good_share = [sum(layer[0] for layer in e["validation_weights"]) / 4 for e in (epochs[0], epochs[-1])]
    assert good_share[1] > good_share[0] + 0.1  # the good expert's mean routing weight rose with training

    built, trained = load_weights(knowable["moe"]), load_weights(out)
    assert built.keys() == trained.keys()
    changed = {name for name in built if not torch.equal(built[name], trained[name])}
    assert changed == set(log["routers"])  # only the routers moved
    assert (out / "tokenizer.json").read_bytes() == (knowable["moe"] / "tokenizer.json").read_bytes()
    assert "## Router training" in (out / "README.md").read_text()

    # the plain checkpoint, routed by transformers' own Mixtral router, scores what training logged
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    encoded = encode_prompts(tokenizer, labelled_prompts(str(knowable["validation.jsonl"]), "--data"))
    ids, mask = batch_inputs(encoded, tokenizer.eos_token_id, "cpu")
    with torch.no_grad():
        scores = option_loglikelihoods(model(input_ids=ids, attention_mask=mask).logits, encoded)
    accuracy = sum(int(s.argmax()) == q.gold for q, s in zip(encoded, scores)) / len(encoded)
    loss = -sum(float(s[q.gold]) for q, s in zip(encoded, scores)) / len(encoded)
    assert accuracy == epochs[log["best_epoch"]]["validation_accuracy"]
    assert loss == pytest.approx(epochs[log["best_epoch"]]["validation_loss"], rel=1e-5)


def test_noisy_top1_with_capacity_and_balancing_drops_slots_and_writes_top_k(knowable, tmp_path) -> None:
    from transformers import AutoConfig

    out = tmp_path / "top1"
    argv = ["moe", "train-router", str(knowable["moe"]), "--data", str(knowable["train.jsonl"]), "-o", str(out)]
    argv += ["--router", "noisy_topk", "--noise", "0.5", "--top-k", "1", "--capacity-factor", "0.6"]
    argv += ["--load-balancing", "0.1", "--epochs", "1", "--lr", "1e-2", "--validation-fraction", "0.25", "--quiet"]
    assert main(argv) == 0
    log = json.loads((out / "router_training.json").read_text())
    assert log["questions"] == {"train": 21, "validation": 7}
    first = log["epochs"][1]
    assert 0.3 < first["dropped_fraction"] < 0.5  # capacity 0.6 of an even share: at least 40% of slots over
    assert first["load_balancing_loss"] >= 1.0 - 1e-6 and math.isfinite(first["validation_loss"])
    tokens = [sum(layer) for layer in first["train_choices"]]
    assert len(set(tokens)) == 1  # every layer routes every (non-padding) token once, before capacity
    assert all(sum(layer) == sum(log["epochs"][0]["validation_choices"][0]) for layer in first["validation_choices"])
    assert AutoConfig.from_pretrained(str(out)).num_experts_per_tok == 1
    again = tmp_path / "again"
    assert main([*argv[:6], str(again), *argv[7:]]) == 0  # the same seed: the same routers, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(load_weights(out).values(), load_weights(again).values()))
    untimed = [{k: v for k, v in e.items() if k != "seconds"} for e in log["epochs"]]
    again_log = json.loads((again / "router_training.json").read_text())
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in again_log["epochs"]] == untimed


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line_and_write_nothing(knowable, tiny, tmp_path, capsys) -> None:
    moe, data = str(knowable["moe"]), str(knowable["train.jsonl"])
    out = tmp_path / "out"
    cases = {
        "not a MoE": ([str(tiny["base"]), "--data", data], "model_type 'mistral', not a mixture of experts"),
        "noise on linear": ([moe, "--data", data, "--noise", "1"], "--noise belongs to --router noisy_topk"),
        "top-k past experts": ([moe, "--data", data, "--top-k", "3"], "--top-k 3: the MoE has 2 experts"),
        "top-1 without balancing": ([moe, "--data", data, "--top-k", "1"], "no gradient to the router"),
        "capacity 0": ([moe, "--data", data, "--capacity-factor", "0"], "--capacity-factor 0.0: expected"),
        "missing data": ([moe, "--data", str(tmp_path / "none.jsonl")], "--data: "),
        "medmcqa test split": ([moe, "--data", "medmcqa:validation"], "only MedMCQA's train split"),
    }
    for name, (args, expected) in cases.items():
        err = _error(["moe", "train-router", *args, "-o", str(out)], capsys)
        assert expected in err, (name, err)
        assert not out.exists(), name
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}\n\n'
        '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}\n'
    )
    err = _error(["moe", "train-router", moe, "--data", str(bad), "-o", str(out)], capsys)
    assert f"--data: {bad}:3: cop: expected the answer's index 0-3" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    err = _error(["moe", "train-router", moe, "--data", data, "-o", str(tmp_path / "mine"), "--overwrite"], capsys)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
