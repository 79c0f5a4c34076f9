"""The lm-eval model types: medmerge-hf quantization arguments and the medmerge-ensemble combinations."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medmerge import fixtures
from medmerge_tasks.models.ensemble import combine_loglikelihoods, combine_next_token, parse_members
from medmerge_tasks.models.quantized import bnb_config
from tests.conftest import our_tasks


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.build_data_mirror(tmp_path_factory.mktemp("mirror"), per_corpus=3)


@pytest.fixture(autouse=True)
def use_mirror(mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMERGE_DATA_DIR", str(mirror))


def test_registered_beside_the_builtin_hf() -> None:
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    assert get_model("hf") is HFLM
    assert issubclass(get_model("medmerge-hf"), HFLM)
    assert get_model("medmerge-ensemble").__name__ == "EnsembleLM"


# --- medmerge-hf ---------------------------------------------------------------------------------------


def test_bnb_config_4bit_and_8bit() -> None:
    config = bnb_config("4bit", "fp4", "float16", "true")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4"
    assert config.bnb_4bit_compute_dtype == torch.float16 and config.bnb_4bit_use_double_quant
    assert bnb_config("8bit").load_in_8bit
    assert bnb_config(None) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("3bit",), "quantization must be 4bit or 8bit"),
        (("4bit", "nf5"), "bnb_4bit_quant_type must be one of"),
        (("4bit", "nf4", "int8"), "bnb_4bit_compute_dtype must be one of"),
    ],
)
def test_bnb_config_rejects_bad_values(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bnb_config(*args)


def test_quantization_config_reaches_from_pretrained(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    import medmerge_tasks.models.quantized as quantized

    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        kwargs.pop("quantization_config")  # the CPU cannot quantize; load plainly after recording it
        return original(*args, **kwargs)

    monkeypatch.setattr(quantized, "check_bitsandbytes", lambda: None)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    lm = quantized.QuantizedHFLM(
        pretrained=str(tiny["base"]), quantization="4bit", bnb_4bit_compute_dtype="float16", device="cpu", batch_size=1
    )
    assert seen["quantization_config"].load_in_4bit
    assert seen["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    assert lm.model is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_quantization_without_gpu_is_one_clear_error(tiny) -> None:
    from medmerge_tasks.models.quantized import QuantizedHFLM

    with pytest.raises(RuntimeError) as info:
        QuantizedHFLM(pretrained=str(tiny["base"]), quantization="4bit", device="cpu")
    message = str(info.value)
    assert "\n" not in message and ("needs a CUDA GPU" in message or "needs bitsandbytes" in message)


def test_legacy_load_in_4bit_points_to_quantization(tiny) -> None:
    from medmerge_tasks.models.quantized import QuantizedHFLM

    with pytest.raises(ValueError, match="use quantization=4bit"):
        QuantizedHFLM(pretrained=str(tiny["base"]), load_in_4bit=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_4bit_model_really_loads_on_gpu(tiny) -> None:
    from medmerge_tasks.models.quantized import QuantizedHFLM

    lm = QuantizedHFLM(pretrained=str(tiny["base"]), quantization="4bit", device="cuda")
    assert getattr(lm.model, "is_loaded_in_4bit", False)


# --- medmerge-ensemble ------------------------------------------------------------------------------------


def test_combine_hand_computed() -> None:
    a, b = math.log(0.2), math.log(0.6)
    assert combine_loglikelihoods([a, b], [0.5, 0.5], "prob") == pytest.approx(math.log(0.4), abs=1e-15)
    assert combine_loglikelihoods([a, b], [0.25, 0.75], "logprob") == pytest.approx(0.25 * a + 0.75 * b, abs=1e-15)
    assert combine_loglikelihoods([a], [1.0], "prob") == a  # one member: exactly its own score
    dist = combine_next_token([torch.tensor([0.9, 0.1]).log(), torch.tensor([0.3, 0.7]).log()], [0.5, 0.5], "prob")
    assert torch.allclose(dist.exp(), torch.tensor([0.6, 0.4], dtype=torch.float64))


def test_parse_members() -> None:
    assert parse_members("A|B", "1|3") == (["A", "B"], [0.25, 0.75])
    assert parse_members("A|B", "1|0") == (["A"], [1.0])  # a zero-weight member is never loaded
    assert parse_members("A|B", None) == (["A", "B"], [0.5, 0.5])
    with pytest.raises(ValueError, match="2 models but 3 weights"):
        parse_members("A|B", "1|1|1")


def test_members_must_share_a_tokenizer(tiny, tmp_path: Path) -> None:
    from medmerge.tiny import build_model, build_tokenizer
    from medmerge_tasks.models.ensemble import EnsembleLM

    build_tokenizer(tmp_path / "tok", vocab_size=300)
    build_model(tmp_path / "other", tmp_path / "tok")
    with pytest.raises(ValueError, match="does not share .* tokenizer"):
        EnsembleLM(pretrained=f"{tiny['base']}|{tmp_path / 'other'}", device="cpu")


def _evaluate(model: str, model_args: str, tasks: list[str]) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        batch_size=1,
        device="cpu",
        log_samples=True,
        task_manager=our_tasks(),
    )


TASKS = ["medmerge_mmlu_anatomy", "medmerge_pubmedqa_exact"]


def _loglikelihoods(result: dict, task: str) -> list[list[float]]:
    return [[r[0][0] for r in s["resps"]] for s in result["samples"][task]]


@pytest.mark.slow
def test_weights_one_zero_equal_model_a_and_identical_models_equal_one(tiny) -> None:
    a, b = str(tiny["ft1"]), str(tiny["ft2"])
    single = _evaluate("hf", f"pretrained={a},dtype=float32", TASKS)
    one_zero = _evaluate("medmerge-ensemble", f"pretrained={a}|{b},weights=1|0,dtype=float32", TASKS)
    twins = _evaluate("medmerge-ensemble", f"pretrained={a}|{a},combine=prob,dtype=float32,sequential=true", TASKS)
    for task in TASKS:
        assert one_zero["results"][task] == single["results"][task]
        assert twins["results"][task] == single["results"][task]
    assert _loglikelihoods(one_zero, "medmerge_mmlu_anatomy") == _loglikelihoods(single, "medmerge_mmlu_anatomy")
    for x, y in zip(_loglikelihoods(twins, "medmerge_mmlu_anatomy"), _loglikelihoods(single, "medmerge_mmlu_anatomy")):
        assert x == pytest.approx(y, abs=1e-9)


@pytest.mark.slow
def test_two_model_ensemble_matches_hand_combination(tiny) -> None:
    a, b = str(tiny["ft1"]), str(tiny["ft2"])
    ra = _loglikelihoods(_evaluate("hf", f"pretrained={a},dtype=float32", TASKS[:1]), TASKS[0])
    rb = _loglikelihoods(_evaluate("hf", f"pretrained={b},dtype=float32", TASKS[:1]), TASKS[0])
    for combine in ("prob", "logprob"):
        ens = _evaluate(
            "medmerge-ensemble", f"pretrained={a}|{b},weights=0.7|0.3,combine={combine},dtype=float32", TASKS[:1]
        )
        got = _loglikelihoods(ens, TASKS[0])
        for doc_a, doc_b, doc_e in zip(ra, rb, got):
            for la, lb, le in zip(doc_a, doc_b, doc_e):
                expected = (
                    math.log(0.7 * math.exp(la) + 0.3 * math.exp(lb)) if combine == "prob" else 0.7 * la + 0.3 * lb
                )
                assert le == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_cli_runs_an_ensemble_on_bioinstructqa_tasks(tiny, mirror: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "medmerge-ensemble",
            "--model_args",
            f"pretrained={tiny['ft1']}|{tiny['ft2']},weights=0.5|0.5,sequential=true",
            "--tasks",
            "medmerge_mmlu_med",
            "--limit",
            "2",
            "--device",
            "cpu",
            "--batch_size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MEDMERGE_DATA_DIR": str(mirror), "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "medmerge_mmlu_med" in out.stdout
