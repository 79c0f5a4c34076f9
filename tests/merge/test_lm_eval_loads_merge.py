"""A merged directory plugs straight into lm-eval's `hf` model."""

from __future__ import annotations

import json

import pytest

from merge.run import run_merge


@pytest.mark.slow
def test_lm_eval_scores_a_merged_tiny_model(tiny, write_recipe, tmp_path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

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
    out = tmp_path / "merged"
    run_merge(path, out)

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
