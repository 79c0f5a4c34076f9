"""Offline copies of the task datasets in their real schemas and file layouts, with synthetic questions.

`build_data_mirror(root)` writes what `MEDMERGE_DATA_DIR=root` expects:
  root/BioMistral/BioInstructQA/data.zip        base/overall_test+prompt.json (all ten corpora, 3 shot sets)
  root/truthfulqa/truthful_qa/generation/validation-00000-of-00001.parquet
  root/truthfulqa/truthful_qa/multiple_choice/validation-00000-of-00001.parquet
  root/openlifescienceai/medmcqa/data/{validation,train}-00000-of-00001.parquet
  root/cais/mmlu/<subject>/{test,dev}-00000-of-00001.parquet          (the six medical subjects)
  root/GBaker/MedQA-USMLE-4-options/phrases_no_exclude_{test,train}.jsonl
Used by the tests and the offline demo; the questions are made up, the structure is the published one.
"""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path
from typing import Any

from medmerge_tasks.sources import BIOINSTRUCTQA_CORPORA, MMLU_SUBJECTS, TRUTHFULQA_HEALTH_CATEGORIES

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


def _mc_record(rng: random.Random, corpus: str, index: int, letters: str, with_context: bool) -> dict[str, Any]:
    question, answer, wrong = FACTS[index % len(FACTS)]
    if corpus == "PubMedQA":
        options = ["yes", "no", "maybe"]
        gold = rng.randrange(3)
    else:
        options = rng.sample(wrong, len(letters) - 1)
        gold = rng.randrange(len(letters))
        options.insert(gold, answer)
    return {
        "context": f"Abstract {index}: a study of {answer} in {corpus}." if with_context else None,
        "question": f"{question} ({corpus} #{index})",
        "options": dict(zip(letters, options)),
        "correct_answer_letter": letters[gold],
    }


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
            for s in (1, 2, 3):
                record[f"few_shot_samples[{s}]"] = [
                    _mc_record(rng, corpus, 100 * s + j, letters, pubmed) for j in range(3)
                ]
            records.append(record)
    return records


def truthfulqa_rows(per_category: dict[str, int] | None = None, other: int = 3) -> tuple[list[dict], list[dict]]:
    """(generation rows, multiple_choice rows) in the hub schemas."""
    per_category = per_category or {c: 2 + i for i, c in enumerate(TRUTHFULQA_HEALTH_CATEGORIES)}
    generation, multiple_choice = [], []
    categories = [c for c, n in per_category.items() for _ in range(n)] + ["Misconceptions"] * other
    for i, category in enumerate(categories):
        question = f"Is claim {i} about {category.lower()} true?"
        true, false = [f"No, claim {i} is false", f"Claim {i} is unproven"], [f"Yes, claim {i} is true"]
        generation.append(
            {
                "type": "Adversarial",
                "category": category,
                "question": question,
                "best_answer": true[0],
                "correct_answers": true,
                "incorrect_answers": false,
                "source": "https://example.org",
            }
        )
        multiple_choice.append(
            {
                "question": question,
                "mc1_targets": {"choices": [true[0], *false, "I have no comment"], "labels": [1, 0, 0]},
                "mc2_targets": {"choices": [*true, *false], "labels": [1, 1, 0]},
            }
        )
    return generation, multiple_choice


def medmcqa_rows(n: int = 8, seed: int = 1, split: str = "validation") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        record = _mc_record(rng, f"MedMCQA {split}", i, "ABCD", False)
        opts = list(record["options"].values())
        rows.append(
            {
                "id": f"mcqa-{i}",
                "question": record["question"],
                "opa": opts[0],
                "opb": opts[1],
                "opc": opts[2],
                "opd": opts[3],
                "cop": "ABCD".index(record["correct_answer_letter"]),
                "choice_type": "single",
                "exp": None,
                "subject_name": "Physiology",
                "topic_name": None,
            }
        )
    return rows


def build_data_mirror(root: str | Path, per_corpus: int = 6, truthfulqa: tuple[list, list] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    bio = root / "BioMistral" / "BioInstructQA"
    bio.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(bio / "data.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("base/overall_test+prompt.json", json.dumps(bioinstructqa_records(per_corpus)))
    generation, multiple_choice = truthfulqa or truthfulqa_rows()
    for config, rows in (("generation", generation), ("multiple_choice", multiple_choice)):
        directory = root / "truthfulqa" / "truthful_qa" / config
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), directory / "validation-00000-of-00001.parquet")
    mcqa = root / "openlifescienceai" / "medmcqa" / "data"
    mcqa.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(medmcqa_rows()), mcqa / "validation-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(medmcqa_rows(6, seed=2, split="train")), mcqa / "train-00000-of-00001.parquet")
    for subject in MMLU_SUBJECTS:
        directory = root / "cais" / "mmlu" / subject
        directory.mkdir(parents=True, exist_ok=True)
        for split, n in (("test", 5), ("dev", 5)):
            pq.write_table(
                pa.Table.from_pylist(mmlu_rows(subject, split, n)), directory / f"{split}-00000-of-00001.parquet"
            )
    medqa = root / "GBaker" / "MedQA-USMLE-4-options"
    medqa.mkdir(parents=True, exist_ok=True)
    for split, n in (("test", 5), ("train", 6)):
        rows = medqa_rows(split, n)
        (medqa / f"phrases_no_exclude_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def mmlu_rows(subject: str, split: str, n: int) -> list[dict[str, Any]]:
    """cais/mmlu schema: question, subject, choices (4), answer (0-3)."""
    rng = random.Random(f"{subject}-{split}")
    rows = []
    for i in range(n):
        record = _mc_record(rng, f"mmlu {subject} {split}", i, "ABCD", False)
        rows.append(
            {
                "question": record["question"],
                "subject": subject,
                "choices": list(record["options"].values()),
                "answer": "ABCD".index(record["correct_answer_letter"]),
            }
        )
    return rows


def medqa_rows(split: str, n: int) -> list[dict[str, Any]]:
    """GBaker/MedQA-USMLE-4-options schema: question, answer, options {A-D}, meta_info, answer_idx."""
    rng = random.Random(f"medqa-{split}")
    rows = []
    for i in range(n):
        record = _mc_record(rng, f"medqa {split}", i, "ABCD", False)
        letter = record["correct_answer_letter"]
        rows.append(
            {
                "question": record["question"],
                "answer": record["options"][letter],
                "options": record["options"],
                "meta_info": "step1",
                "answer_idx": letter,
                "metamap_phrases": [],
            }
        )
    return rows
