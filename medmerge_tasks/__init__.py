"""medmerge's lm-evaluation-harness plugin: BioInstructQA, TruthfulQA-health and MedMCQA [INST] tasks.

Importing this package is cheap (no lm-eval import): it is imported at interpreter start by the
`medmerge_tasks.pth` hook, which registers the task directory with lm-eval only when lm-eval loads.
"""

from pathlib import Path

TASK_DIR = Path(__file__).parent / "tasks"

__all__ = ["TASK_DIR"]
