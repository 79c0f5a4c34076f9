"""Offline copies of the task datasets in their real schemas and file layouts, with synthetic questions.

`build_data_mirror(root)` writes what `MEDMERGE_DATA_DIR=root` expects:
  root/BioMistral/BioInstructQA/data.zip        base/overall_test+prompt.json (all ten corpora, 3 shot sets)
  root/truthfulqa/truthful_qa/generation/validation-00000-of-00001.parquet
  root/truthfulqa/truthful_qa/multiple_choice/validation-00000-of-00001.parquet
  root/<repo>/<file>                            every split of every corpus in corpora.CORPORA, as published
                                                (e.g. cais/mmlu/anatomy/test-00000-of-00001.parquet), written
                                                through the corpus's own `write`
Used by the tests and the offline demo; the questions are made up, the structure is the published one.
"""

from __future__ import annotations

import dataclasses
import json
import random
import zipfile
from pathlib import Path
from typing import Any

from medmerge_tasks.corpora import (
    BIOINSTRUCTQA,
    BIOINSTRUCTQA_CORPORA,
    BIOINSTRUCTQA_SHOT_SETS,
    CORPORA,
    TRUTHFULQA,
    TRUTHFULQA_HEALTH_CATEGORIES,
    Corpus,
    Question,
)
from medmerge_tasks.sources import held_out

FACTS = [
    ("Which organ produces insulin?", "pancreas", ["liver", "spleen", "kidney", "thyroid"]),
    ("Which vitamin deficiency causes scurvy?", "vitamin C", ["vitamin D", "vitamin A", "vitamin K", "iron"]),
    (
        "Which cells carry oxygen in the blood?",
        "red blood cells",
        ["platelets", "neutrophils", "lymphocytes", "macrophages"],
    ),
    ("Which organ filters the blood to make urine?", "kidney", ["lung", "heart", "stomach", "colon"]),
    ("Which bone protects the brain?", "skull", ["femur", "rib", "pelvis", "tibia"]),
    ("Which hormone lowers blood glucose?", "insulin", ["glucagon", "cortisol", "adrenaline", "thyroxine"]),
    ("Which organ pumps blood through the body?", "heart", ["liver", "lung", "brain", "spleen"]),
    ("Which gas do the lungs exchange for carbon dioxide?", "oxygen", ["nitrogen", "helium", "argon", "methane"]),
]


FIXTURE_ROWS = {"test": 5, "validation": 4, "fewshot": 6}  # questions per split of each corpus


def _synthetic(rng: random.Random, label: str, index: int, n_options: int, pubmed: bool = False) -> Question:
    """A made-up question with one right answer among `n_options` (PubMedQA: yes / no / maybe)."""
    question, answer, wrong = FACTS[index % len(FACTS)]
    if pubmed:
        options, gold = ["yes", "no", "maybe"], rng.randrange(3)
    else:
        options = rng.sample(wrong, n_options - 1)
        gold = rng.randrange(n_options)
        options.insert(gold, answer)
    return Question(f"{question} ({label} #{index})", tuple(options), gold)


def _mc_record(rng: random.Random, corpus: str, index: int, letters: str, with_context: bool) -> dict[str, Any]:
    """A question block in BioInstructQA's schema."""
    q = _synthetic(rng, corpus, index, len(letters), pubmed=corpus == "PubMedQA")
    answer = FACTS[index % len(FACTS)][1]
    return {
        "context": f"Abstract {index}: a study of {answer} in {corpus}." if with_context else None,
        "question": q.question,
        "options": dict(zip(letters, q.options)),
        "correct_answer_letter": letters[q.gold],
    }


def corpus_questions(corpus: Corpus, split: str) -> list[Question]:
    """The synthetic questions of one split of a corpus: what its fixture file holds, and the oracle's truth.

    A split held out of train has no file: its questions are those the loader's `held_out` picks from the train
    fixture, which then holds four times FIXTURE_ROWS["validation"] so that a quarter of it is that many."""
    if corpus.splits[split].held_out:
        return held_out(corpus_questions(corpus, "fewshot"), corpus.splits[split].held_out)
    rows = FIXTURE_ROWS[split]
    if split == "fewshot" and any(s.held_out for s in corpus.splits.values()):
        rows = 4 * FIXTURE_ROWS["validation"]
    rng = random.Random(f"{corpus.name}-{split}")
    return [
        dataclasses.replace(_synthetic(rng, f"{corpus.name} {split}", i, 4), id=f"{corpus.name}-{split}-{i}")
        for i in range(rows)
    ]


def bioinstructqa_records(per_corpus: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for corpus, (_, letters) in BIOINSTRUCTQA_CORPORA.items():
        pubmed = corpus == "PubMedQA"
        for i in range(per_corpus):
            record = _mc_record(rng, corpus, i, letters, pubmed)
            record |= {
                "identifier": f"{corpus}-{i}",
                "corpus_name": corpus,
                "task_type": "mcqa",
                "classes": list(letters),
            }
            if not pubmed:
                record["context"] = None
            for s in BIOINSTRUCTQA_SHOT_SETS:
                record[f"few_shot_samples[{s}]"] = [
                    _mc_record(rng, corpus, 100 * s + j, letters, pubmed) for j in range(3)
                ]
            records.append(record)
    return records


def truthfulqa_rows(per_category: dict[str, int] | None = None, other: int = 3) -> tuple[list[dict], list[dict]]:
    """(generation rows, multiple_choice rows) in the hub schemas: as in TruthfulQA, MC1 is the best answer then
    the incorrect ones, MC2 every correct answer then the incorrect ones. Each question asks one of FACTS with its
    own wrong answers, so a model that learned some of them scores between 0 and 1, and models can differ."""
    per_category = per_category or {c: 2 + i for i, c in enumerate(TRUTHFULQA_HEALTH_CATEGORIES)}
    generation, multiple_choice = [], []
    categories = [c for c, n in per_category.items() for _ in range(n)] + ["Misconceptions"] * other
    for i, category in enumerate(categories):
        fact, answer, wrong = FACTS[i % len(FACTS)]
        question = f"{fact} ({category} claim {i})"
        best, correct = f"The {answer}.", [f"The {answer}.", f"It is the {answer}."]
        incorrect = [f"The {w}." for w in wrong[i % 2 : i % 2 + 3]]
        generation.append(
            {
                "type": "Adversarial",
                "category": category,
                "question": question,
                "best_answer": best,
                "correct_answers": correct,
                "incorrect_answers": incorrect,
                "source": "https://example.org",
            }
        )
        multiple_choice.append(
            {
                "question": question,
                "mc1_targets": {"choices": [best, *incorrect], "labels": [1] + [0] * len(incorrect)},
                "mc2_targets": {
                    "choices": [*correct, *incorrect],
                    "labels": [1] * len(correct) + [0] * len(incorrect),
                },
            }
        )
    return generation, multiple_choice


def build_data_mirror(root: str | Path, per_corpus: int = 6, truthfulqa: tuple[list, list] | None = None) -> Path:
    root = Path(root)
    bio = root / BIOINSTRUCTQA.repo
    bio.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(bio / "data.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("base/overall_test+prompt.json", json.dumps(bioinstructqa_records(per_corpus)))
    generation, multiple_choice = truthfulqa or truthfulqa_rows()
    for config, rows in (("generation", generation), ("multiple_choice", multiple_choice)):
        write_rows(root / TRUTHFULQA.repo / config / "validation-00000-of-00001.parquet", rows)
    for corpus in CORPORA.values():
        for split, files in corpus.splits.items():
            if files.held_out:  # in the train file
                continue
            write_rows(
                root / corpus.dataset.repo / files.published_as,
                [corpus.write(q, split) for q in corpus_questions(corpus, split)],
            )
    return root


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Records as a .parquet or .jsonl file, by the file's suffix (the two formats the hub datasets use)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
