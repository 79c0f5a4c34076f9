"""Trained fusion: combiners that learn to follow the member that is right, members' features equal to what lm-eval's
hf model scores, members run once (the cache), `--model medmerge-fusion` scoring what training measured, and
members that are not the trained ones refused."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from medmerge import fixtures
from medmerge.cli import main
from medmerge.fusion.train import FusionConfig, fit_combiner
from medmerge_tasks.fusion.combiners import COMBINERS
from tests.conftest import our_tasks

WORDS = ["heart", "lung", "liver", "kidney", "brain", "skin", "bone", "blood", "nerve", "muscle", "gland", "vein"]


@pytest.mark.parametrize("combiner", COMBINERS)
def test_combiner_learns_to_follow_the_member_that_is_always_right(combiner: str) -> None:
    """Member 0 puts its highest score on the right option (with noise), member 1 on a random one; the members'
    plain average is misled whenever member 1 is confident, the trained combiner is not."""
    generator = torch.Generator().manual_seed(0)
    questions, options = 400, 4
    gold = torch.randint(options, (questions,), generator=generator)
    wrong = torch.randint(options, (questions,), generator=generator)
    right_member = torch.randn(questions, options, generator=generator) + 2.0 * torch.nn.functional.one_hot(gold)
    noisy_member = 3.0 * torch.randn(questions, options, generator=generator) + 6.0 * torch.nn.functional.one_hot(wrong)
    features = torch.stack([right_member, noisy_member], dim=1)
    config = FusionConfig(members=[{"pretrained": "a"}, {"pretrained": "b"}], combiner=combiner, epochs=60, lr=0.02)
    state, log = fit_combiner(config, options, features[:300], gold[:300], features[300:], gold[300:], seed=0)
    best = max(log, key=lambda e: (e.validation_accuracy, -e.validation_loss))
    follows = float((right_member[300:].argmax(-1) == gold[300:]).float().mean())
    assert log[0].validation_accuracy < 0.75 if combiner != "transformer" else True  # the plain average
    assert best.validation_accuracy >= follows - 0.03 and best.validation_accuracy > 0.8
    if combiner == "weighted":
        assert torch.softmax(state["member_logits"], 0)[0] > 0.8  # the learned weight went to the right member


def write_questions(path: Path, count: int, seed: int) -> Path:
    """MedMCQA-schema questions with answers in every position."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        options = rng.sample(WORDS, 4)
        rows.append(
            {"id": str(i), "question": f"Which one is {options[i % 4]}?", "cop": i % 4}
            | dict(zip(("opa", "opb", "opc", "opd"), options))
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.build_data_mirror(tmp_path_factory.mktemp("mirror"), per_corpus=3)


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny members whose tokenizer has " A".." D" as single tokens, as Mistral's has."""
    from medmerge.tiny import build_model, build_tokenizer, perturbed_copy

    root = tmp_path_factory.mktemp("members")
    build_tokenizer(root / "tokenizer", extra_text=["Answer: A B C D"] * 20)
    build_model(root / "a", root / "tokenizer", seed=0)
    perturbed_copy(root / "a", root / "b", 0.5, seed=1)
    return {"a": root / "a", "b": root / "b"}


@pytest.fixture
def fusion_config(members: dict[str, Path], tmp_path: Path) -> Path:
    write_questions(tmp_path / "questions.jsonl", 24, seed=0)
    config = {
        "members": [{"pretrained": str(members["a"])}, {"pretrained": str(members["b"])}],
        "data": "questions.jsonl",  # relative to the config file
        "validation_fraction": 0.25,
        "epochs": 5,
        "seeds": [0, 1],
        "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "fusion.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "fusion.yaml"


def test_members_features_are_what_lm_evals_hf_model_scores(members: dict[str, Path], tmp_path: Path) -> None:
    """The cached per-option log-likelihoods equal lm-eval's own hf model's on the same requests, and the option
    logits are the last context position's logits (up to the per-question log-normaliser)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from medmerge.labelled import labelled_prompts
    from medmerge_tasks.fusion.features import Member, member_features

    path = write_questions(tmp_path / "questions.jsonl", 6, seed=1)
    prompts = labelled_prompts(str(path), "data")
    features, _, ran = member_features(
        Member(pretrained=str(members["a"])), prompts, device="cpu", batch_size=4, cache=None
    )
    assert ran == 6 and features["loglikelihoods"].shape == (6, 4) and not features["option_logits"].isnan().any()
    hf = HFLM(pretrained=str(members["a"]), dtype="float32", device="cpu", batch_size=1)
    requests = [
        Instance("loglikelihood", {}, (p.context, c), i, ("t", n, 1))
        for n, p in enumerate(prompts)
        for i, c in enumerate(p.continuations)
    ]
    expected = torch.tensor([ll for ll, _ in hf.loglikelihood(requests)]).reshape(6, 4)
    assert torch.allclose(features["loglikelihoods"], expected, atol=1e-4)
    shift = features["option_logits"] - features["loglikelihoods"]  # log Σ exp(all logits), one per question
    assert torch.allclose(shift, shift[:, :1].expand(-1, 4), atol=1e-4)


def test_a_lora_member_is_its_base_with_the_adapter(members: dict[str, Path], tmp_path: Path) -> None:
    """A BASE+ADAPTER member scores as the adapter merged into its base (PEFT's merge_and_unload, as a passthrough
    recipe of BASE+ADAPTER writes it), and its identity changes with the adapter's weights and config."""
    from medmerge.labelled import labelled_prompts
    from medmerge.tiny import build_lora, merged_lora_state
    from medmerge_tasks.fusion.features import Member, member_features, member_fingerprint

    build_lora(members["a"], tmp_path / "lora", seed=3, target_modules=["q_proj", "v_proj", "up_proj"])
    merged = tmp_path / "merged"
    shutil.copytree(members["a"], merged)
    for f in merged.glob("*.safetensors"):
        f.unlink()
    save_file(merged_lora_state(members["a"], tmp_path / "lora"), merged / "model.safetensors")
    prompts = labelled_prompts(str(write_questions(tmp_path / "q.jsonl", 6, seed=2)), "data")
    lora = Member(pretrained=f"{members['a']}+{tmp_path / 'lora'}")
    with_adapter, identity, _ = member_features(lora, prompts, device="cpu", batch_size=4, cache=None)
    as_merged, _, _ = member_features(Member(pretrained=str(merged)), prompts, device="cpu", batch_size=4, cache=None)
    assert torch.allclose(with_adapter["loglikelihoods"], as_merged["loglikelihoods"], atol=1e-4)
    assert identity == member_fingerprint(lora) != member_fingerprint(Member(pretrained=str(members["a"])))
    config = tmp_path / "lora" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"lora_alpha": 16}))
    assert member_fingerprint(lora) != identity  # the same weights, scaled otherwise: another member


def test_train_twice_runs_the_members_once_then_lm_eval_scores_what_was_trained(
    fusion_config: Path, members: dict[str, Path], mirror: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import lm_eval

    import medmerge_tasks.fusion.features as features_module
    from medmerge_tasks.fusion.saved import load_fusion

    out = fusion_config.parent / "late"
    assert main(["fuse", "train", str(fusion_config), "-o", str(out), "--combiner", "late_fusion"]) == 0
    assert "members ran on 48 question(s)" in capsys.readouterr().err  # 24 questions x 2 members
    record = json.loads((out / "fusion.json").read_text())
    assert record["options"] == 4 and record["features"] == "option_logits"
    assert record["data"]["questions"] == {"train": 18, "validation": 6}
    assert {p.name for p in out.iterdir()} == {
        "combiner.safetensors",
        "fusion.json",
        "training_log.json",
        "training_curves.png",
        "README.md",
    }
    assert set(json.loads((out / "training_log.json").read_text())["seeds"]) == {"0", "1"}

    def no_model(*args, **kwargs):
        raise AssertionError("a member ran although its outputs were cached")

    monkeypatch.setattr(features_module, "load_member", no_model)
    second = fusion_config.parent / "transformer"
    assert main(["fuse", "train", str(fusion_config), "-o", str(second), "--combiner", "transformer"]) == 0
    assert "members ran on 0 question(s)" in capsys.readouterr().err
    monkeypatch.undo()

    # lm-eval through medmerge-fusion gives, per document, the combiner's answer on the members' features
    monkeypatch.setenv("MEDMERGE_DATA_DIR", str(mirror))
    result = lm_eval.simple_evaluate(
        model="medmerge-fusion",
        model_args=f"pretrained={out}",
        tasks=["medmerge_medmcqa_inst"],
        device="cpu",
        log_samples=True,
        task_manager=our_tasks(),
    )
    samples = result["samples"]["medmerge_medmcqa_inst"]
    from medmerge_tasks.choices import ChoicePrompt
    from medmerge_tasks.fusion.features import Member, member_features

    prompts = [ChoicePrompt(s["arguments"][0][0], tuple(a[1] for a in s["arguments"]), s["target"]) for s in samples]
    fusion = load_fusion(out)
    per_member = [
        member_features(Member(pretrained=m), prompts, device="cpu", batch_size=4, cache=None)[0]["option_logits"]
        for m in (str(members["a"]), str(members["b"]))
    ]
    expected = fusion.log_probabilities(torch.stack(per_member, dim=1))
    for sample, row in zip(samples, expected):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(row.tolist(), abs=1e-5)
        assert sample["acc"] == float(int(row.argmax()) == sample["target"])

    with pytest.raises(ValueError, match="has 5 option.s.; this combiner was trained for questions with 4"):
        lm_eval.simple_evaluate(
            model="medmerge-fusion",
            model_args=f"pretrained={out}",
            tasks=["medmerge_medqa_5options"],
            device="cpu",
            limit=1,
            task_manager=our_tasks(),
        )


def test_members_that_are_not_the_trained_ones_are_refused(
    fusion_config: Path, members: dict[str, Path], tiny, tmp_path: Path
) -> None:
    import shutil

    from medmerge_tasks.fusion.saved import load_fusion

    out = tmp_path / "weighted"
    assert main(["fuse", "train", str(fusion_config), "-o", str(out), "--combiner", "weighted", "--quiet"]) == 0
    with pytest.raises(ValueError, match=r"member 2 \(.*other\) is not the model this combiner was trained on"):
        load_fusion(out, members=[str(members["a"]), str(tiny["other"])])
    moved = tmp_path / "moved_b"
    shutil.copytree(members["b"], moved)
    assert load_fusion(out, members=[str(members["a"]), str(moved)]).record["members"][1]["pretrained"] == str(moved)
    weights = next(moved.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # one weight's last bytes changed: a different model with the same shapes
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="member 2 .* is not the model"):
        load_fusion(out, members=[str(members["a"]), str(moved)])


def test_bad_configs_and_options_are_one_line(
    fusion_config: Path, mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err.strip()

    bad = tmp_path / "bad.yaml"
    bad.write_text("members:\n  - pretrained: a\n    dtyp: float32\n  - pretrained: b\n")
    assert f"{bad}:3: members[0].dtyp: unknown key 'dtyp' (did you mean 'dtype'?)" in error(
        ["fuse", "train", str(bad), "-o", str(tmp_path / "x")]
    )
    bad.write_text("members: [{pretrained: a}]\n")
    assert f"{bad}:1: members" in error(["fuse", "train", str(bad), "-o", str(tmp_path / "x")])
    out = str(tmp_path / "x")
    assert "--limit: Input should be greater than 0" in error(
        ["fuse", "train", str(fusion_config), "-o", out, "--limit", "-1"]
    )
    monkeypatch.setenv("MEDMERGE_DATA_DIR", str(mirror))
    task = tmp_path / "task.yaml"
    for source, expected in {
        "task:medmerge_medmcqa_inst:validation": "data: task:medmerge_medmcqa_inst: its validation split is the split",
        "task:medmerge_mmlu_anatomy:test": "the split is train or validation",
    }.items():
        task.write_text(fusion_config.read_text().replace("questions.jsonl", source))
        assert expected in error(["fuse", "train", str(task), "-o", out])
    assert not (tmp_path / "x").exists()


def test_a_task_source_gives_the_questions_lm_eval_builds(
    members: dict[str, Path], mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`task:NAME:validation` of a held-out task: each question's context, continuations and gold as lm-eval's own
    requests for that task have them."""
    import lm_eval

    from medmerge.labelled import labelled_prompts

    monkeypatch.setenv("MEDMERGE_DATA_DIR", str(mirror))
    task = "medmerge_mmlu_anatomy_validation"
    prompts = labelled_prompts(f"task:{task}:validation", "data")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={members['a']},dtype=float32",
        tasks=[task],
        device="cpu",
        task_manager=our_tasks(),
        log_samples=True,
    )
    samples = out["samples"][task]
    built = sorted((s["arguments"][0][0], tuple(a[1] for a in s["arguments"]), s["target"]) for s in samples)
    assert len(prompts) == len(samples) > 0
    assert sorted((p.context, p.continuations, p.gold) for p in prompts) == built
