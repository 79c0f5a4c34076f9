"""The Python the task YAMLs call with `!function`: dataset loading and scoring that YAML cannot say."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from lm_eval.api.task import ConfigurableTask

from medmerge_tasks import sources


def _not_about_custom_kwargs(record: logging.LogRecord) -> bool:
    """lm-eval warns, for every task with a `custom_dataset`, that kwargs can be passed with --metadata: two lines
    per task (38 for BioInstructQA and TruthfulQA) that say nothing about medmerge's tasks, whose loaders take
    their settings from the YAML. Only that message is dropped; every other warning passes."""
    return "Custom kwargs can be passed to `--metadata`" not in str(record.msg)


logging.getLogger("lm_eval.api.task").addFilter(_not_about_custom_kwargs)


class FixedShotsTask(ConfigurableTask):
    """A task whose shots are written into its prompts (BioMistral's fixed shot sets, TruthfulQA's solved
    example): each doc carries `prompts`, where prompts[k] is its prompt with the first k shots.

    `num_fewshot` (the YAML's default, or `--num_fewshot k`) picks prompts[k] instead of letting lm-eval sample
    shots from the test docs (it would, with no fewshot split); a k the prompts do not have is refused when it
    is set, before any model runs."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # lm-eval hands a `class:` task its whole YAML, `class` key included, which TaskConfig does not take
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def fewshot_docs(self) -> None:
        return None  # no sampled shots: they are in the prompts

    def set_config(self, key: str, value: Any, update: bool = False) -> None:
        if key == "num_fewshot" and value is not None:
            most = len(self.eval_docs[0]["prompts"]) - 1 if len(self.eval_docs) else 0
            if not isinstance(value, int) or not 0 <= value <= most:
                raise ValueError(
                    f"{self.config.task}: --num_fewshot {value}, but its shots are fixed in the prompt: 0 to {most} "
                    "(the first k; see the README's tasks section for the shot sets and the tasks with sampled shots)"
                )
        super().set_config(key, value, update)

    def doc_to_text(self, doc: dict[str, Any], doc_to_text: Any = None) -> str:
        return doc["prompts"][self.config.num_fewshot or 0]

    def fewshot_context(self, doc: dict[str, Any], num_fewshot: int, **kwargs: Any) -> Any:
        return super().fewshot_context(doc, num_fewshot=0, **kwargs)  # the shots are in doc_to_text already


def load_bioinstructqa(corpus: str, fewshot_set: int = 1, **_: Any) -> DatasetDict:
    """`--metadata '{"fewshot_set": 2}'` picks the paper's shot set (1-3); `--num_fewshot k` its first k shots."""
    return DatasetDict({"test": Dataset.from_list(sources.bioinstructqa_docs(corpus, fewshot_set))})


def load_corpus(corpus: str, split: str = "test", **_: Any) -> DatasetDict:
    """A corpus of corpora.CORPORA: its `split` (test or validation) + the `fewshot` split lm-eval samples from."""
    return DatasetDict({k: Dataset.from_list(v) for k, v in sources.corpus_docs(corpus, split).items()})


def load_truthfulqa_health(category: str, prompt: str, **_: Any) -> DatasetDict:
    return DatasetDict({"validation": Dataset.from_list(sources.truthfulqa_docs(category, prompt))})


def load_truthfulqa_health_mcq(category: str, prompt: str, **_: Any) -> DatasetDict:
    if prompt not in ("plain", "truthful"):
        raise ValueError(f"prompt must be 'plain' or 'truthful' (got {prompt!r})")
    return DatasetDict(
        {"validation": Dataset.from_list(sources.truthfulqa_mcq_docs(category, truthful=prompt == "truthful"))}
    )


def load_medmcqa(**_: Any) -> DatasetDict:
    return DatasetDict({"validation": Dataset.from_list(sources.medmcqa_docs())})


def letter_accuracy(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """acc: the gold letter has the highest log-likelihood among the letters.
    exact_match: BioMistral's metric from the same forward pass — the gold letter is the one top token over the
    whole vocabulary (lm-eval's is_greedy for the gold continuation, a single token). It can only be lower than acc.
    Each is reported twice so a group can average it both unweighted (the paper's Avg) and weighted by task size."""
    correct = float(int(np.argmax([ll for ll, _ in results])) == doc["gold"])
    top_token = float(results[doc["gold"]][1])
    return {
        "acc": correct,
        "acc_size_weighted": correct,
        "exact_match": top_token,
        "exact_match_size_weighted": top_token,
    }


def letter_exact_match(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """BioMistral's scoring: the one greedy token (whitespace stripped) must be the gold letter."""
    correct = float(results[0].strip() == doc["gold_letter"])
    return {"exact_match": correct, "exact_match_size_weighted": correct}


def truthfulqa_mc1_mc2(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """MC1 and MC2 as lm-eval's truthfulqa_mc1/mc2 compute them, from one pass over both choice lists.

    MC1: the single true answer (index 0) has the highest log-likelihood among the mc1 choices.
    MC2: the normalised probability mass of the true answers among the mc2 choices."""
    ll = np.array([ll for ll, _ in results])
    mc1, mc2 = ll[: doc["n_mc1"]], ll[doc["n_mc1"] :]
    labels = np.array(doc["mc2_labels"])
    probs = np.exp(mc2)
    return {
        "mc1": float(int(np.argmax(mc1)) == doc["mc1_labels"].index(1)),
        "mc2": float(np.sum(probs[labels == 1]) / np.sum(probs)),
    }
