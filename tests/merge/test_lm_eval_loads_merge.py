"""A merged directory, and a mixture of experts, plug straight into lm-eval's `hf` model."""

from __future__ import annotations

import json

import pytest

from merge.moe.build import build_moe
from merge.run import run_merge


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["merge", "moe"])
def test_lm_eval_scores_a_merged_tiny_model(tiny, write_recipe, tmp_path, kind) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = tmp_path / "merged"
    if kind == "moe":
        build_moe(write_recipe(_moe_config(tiny), "moe.yaml"), out)
    else:
        _merge(tiny, write_recipe, out)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    rows = [{"question": f"Is {i} even? Answer:", "label": i % 2} for i in range(6)]
    (task_dir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "tiny.yaml").write_text(f"""\
task: tiny_merge_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task_dir / "data.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: [" yes", " no"]
doc_to_target: label
metric_list:
  - metric: acc
""")
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},dtype=float32",
        tasks=["tiny_merge_check"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=2,
        device="cpu",
    )
    metrics = results["results"]["tiny_merge_check"]
    assert 0.0 <= metrics["acc,none"] <= 1.0
    assert results["n-samples"]["tiny_merge_check"]["effective"] == 6


def _merge(tiny, write_recipe, out) -> None:
    path = write_recipe(
        {
            "merge_method": "slerp",
            "base_model": str(tiny["base"]),
            "parameters": {"t": 0.5},
            "dtype": "bfloat16",
            "out_dtype": "float32",
            "models": [{"model": str(tiny["base"])}, {"model": str(tiny["ft1"])}],
        }
    )
    run_merge(path, out)


def _moe_config(tiny) -> dict:
    return {
        "base_model": str(tiny["base"]),
        "gate_mode": "hidden",
        "experts": [
            {"source_model": str(tiny["ft1"]), "positive_prompts": ["Is 2 even?"]},
            {"source_model": str(tiny["ft2"]), "positive_prompts": ["The heart pumps blood"]},
        ],
    }
