"""Labelled multiple-choice questions to train on (router training, fusion combiners): where they come from and
how they are split into training and validation questions.

A source is one of
  medmcqa                 MedMCQA's train split in the medmerge_medmcqa_inst [INST] prompt (hub or mirror)
  FILE                    a .jsonl/.json/.parquet file of MedMCQA-schema records, in the same prompt
  task:NAME[:SPLIT]       any lm-eval multiple-choice task (medmerge's or lm-eval's own), its `train` (default) or
                          `validation` split, each question's context and options exactly as lm-eval builds them
Never the split a task reports on: what is trained on must not be what is measured (medmerge's `*_validation`
tasks report on a corpus's validation split, which is held out for tuning, so their validation split is allowed).
"""

from __future__ import annotations

import random
from typing import Any

from medmerge_common.errors import UserError
from medmerge_tasks.choices import ChoicePrompt

TASK_PREFIX = "task:"
LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_seed
HELD_OUT_SUFFIX = "_validation"  # medmerge's held-out tasks (a corpus's validation split, for tuning): never a test


def labelled_prompts(source: str, option: str) -> list[ChoicePrompt]:
    """The labelled questions of `source`; a problem is one UserError naming the `option` that gave it."""
    from medmerge_tasks.sources import DatasetMissing, labelled_medmcqa, medmcqa_inst_doc

    try:
        if source.startswith(TASK_PREFIX):
            return task_prompts(source[len(TASK_PREFIX) :])
        prompts = []
        for q in labelled_medmcqa(source):
            doc = medmcqa_inst_doc(q)
            prompts.append(ChoicePrompt(doc["prompts"][0], tuple(" " + c for c in doc["choices"]), q.gold, q.id))
        return prompts
    except (ValueError, DatasetMissing) as exc:
        raise UserError(f"{option}: {exc}") from None


def task_prompts(spec: str) -> list[ChoicePrompt]:
    """`NAME[:SPLIT]`: a multiple-choice task's train or validation documents as lm-eval would score them (the
    task's own prompt, few-shot count and target delimiter); the split the task reports on is refused."""
    from lm_eval.tasks import TaskManager

    name, _, split = spec.partition(":")
    split = split or "train"
    if split not in ("train", "validation"):
        raise ValueError(f"task:{spec}: the split is train or validation (a test split is never trained on)")
    try:
        loaded = TaskManager().load([name])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"task:{name}: lm-eval does not know this task ({exc})") from None
    if name in loaded["groups"] or name not in loaded["tasks"]:
        raise ValueError(f"task:{name}: a group or tag of tasks; name one of its tasks")
    task = loaded["tasks"][name]
    if task.OUTPUT_TYPE != "multiple_choice":
        raise ValueError(f"task:{name}: a {task.OUTPUT_TYPE} task, not a multiple-choice one")
    has = {"train": task.has_training_docs(), "validation": task.has_validation_docs()}
    if not has[split]:
        raise ValueError(f"task:{name}: has no {split} split")
    if split == "validation" and not task.has_test_docs() and not name.endswith(HELD_OUT_SUFFIX):
        raise ValueError(f"task:{name}: its validation split is the split it reports on; train on its train split")
    docs = task.training_docs() if split == "train" else task.validation_docs()
    shots = int(task.config.num_fewshot or 0)
    task.set_fewshot_seed(seed=LM_EVAL_FEWSHOT_SEED)  # shots drawn as `lm_eval` draws them, in document order
    prompts = []
    for i, doc in enumerate(docs):
        context = task.fewshot_context(doc, shots)
        requests = task.construct_requests(doc=doc, ctx=context, metadata=(name, i, 1))
        continuations = tuple(r.arguments[1] for r in requests)
        gold = task.doc_to_target(doc)
        if isinstance(gold, str):
            choices = task.doc_to_choice(doc)
            if gold not in choices:
                raise ValueError(f"task:{name}: {split} document {i}: its target {gold!r} is not one of its choices")
            gold = choices.index(gold)
        if not isinstance(gold, int) or not 0 <= gold < len(continuations):
            raise ValueError(f"task:{name}: {split} document {i}: target {gold!r} is not one answer's index")
        prompts.append(ChoicePrompt(str(requests[0].arguments[0]), continuations, gold, f"{name}:{split}:{i}"))
    if not prompts:
        raise ValueError(f"task:{name}: its {split} split is empty")
    return prompts


def split_labelled(
    train: list[Any],
    validation: list[Any] | None,
    *,
    seed: int,
    validation_fraction: float,
    limit: int | float | None,
) -> tuple[list[Any], list[Any]]:
    """(training, validation) questions: the validation data if given, else a seeded `validation_fraction` of
    the training data held out; then `limit` (a count, or a fraction below 1) applied to the training questions
    after a seeded shuffle."""
    shuffled = list(train)
    random.Random(seed).shuffle(shuffled)
    if validation is None:
        held = max(1, round(len(shuffled) * validation_fraction))
        if held >= len(shuffled):
            raise UserError(
                f"--data has {len(train)} question(s): too few to hold {held} out for validation "
                "(give --validation-data)"
            )
        validation, shuffled = shuffled[:held], shuffled[held:]
    if limit is not None:
        keep = int(limit) if limit >= 1 else max(1, round(limit * len(shuffled)))
        shuffled = shuffled[:keep]
    if not shuffled or not validation:
        raise UserError("no questions to train on or to validate with (check --data, --validation-data, --limit)")
    return shuffled, list(validation)
