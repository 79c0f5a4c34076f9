"""How the datasets declared in corpora.py are read and their records become lm-eval docs.

Every dataset is a hub dataset repository, read from its published files (no loading scripts, so it works
with datasets >= 4):

  BioMistral/BioInstructQA   data.zip -> base/overall_test+prompt.json   the ten BioInstructQA corpora, with
                                                                          the paper's three fixed shot sets
  truthfulqa/truthful_qa     generation/ + multiple_choice/ parquet      TruthfulQA (categories from `generation`)
  corpora.CORPORA            each corpus's split files (parquet, jsonl)  MMLU subjects, MedQA, MedMCQA

With MEDMERGE_DATA_DIR=/mirror every repository is read from /mirror/<org>/<name>/ (a plain copy, as
`hf download --repo-type dataset ORG/NAME --local-dir /mirror/ORG/NAME` or `medmerge data pull` leaves it);
otherwise from the hub through huggingface_hub (only the files needed, cached).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

from medmerge_tasks.corpora import (
    BIOINSTRUCTQA,
    BIOINSTRUCTQA_CORPORA,
    BIOINSTRUCTQA_SHOT_SETS,
    CORPORA,
    DATASETS,
    HELD_OUT_SALT,
    LETTERS,
    TRUTHFULQA,
    TRUTHFULQA_HEALTH_CATEGORIES,
    Question,
    Split,
)


class DatasetMissing(RuntimeError):
    """A dataset that is neither mirrored nor reachable; the message is one line saying how to get it."""


def dataset_dir(repo_id: str) -> Path:
    """The local directory holding `repo_id`'s files: the mirror if MEDMERGE_DATA_DIR is set, else the hub cache."""
    mirror = os.environ.get("MEDMERGE_DATA_DIR")
    if mirror:
        path = Path(mirror) / repo_id
        if not path.is_dir():
            raise DatasetMissing(
                f"dataset {repo_id} is not in MEDMERGE_DATA_DIR ({path} does not exist); "
                f"mirror it where there is a network with `medmerge data pull --to {mirror}`"
            )
        return path
    from huggingface_hub import snapshot_download

    from medmerge_common.hub import hub_reachable

    try:
        return Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                allow_patterns=list(DATASETS[repo_id].files) if repo_id in DATASETS else None,
                local_files_only=not hub_reachable(),
            )
        )
    except Exception as exc:
        raise DatasetMissing(
            f"dataset {repo_id} is not cached and the hub cannot be reached ({type(exc).__name__}); run "
            f"`medmerge data pull --to /mirror` where there is a network and set MEDMERGE_DATA_DIR=/mirror"
        ) from None


def pull(to: Path | None = None) -> list[Path]:
    """Download every dataset the tasks use (only the files needed), to `to`/<org>/<name> or the hub cache."""
    from huggingface_hub import snapshot_download

    out = []
    for repo_id, dataset in DATASETS.items():
        local_dir = None if to is None else str(Path(to) / repo_id)
        patterns = list(dataset.files)
        out.append(Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns, local_dir=local_dir)))
    return out


# --- BioInstructQA -----------------------------------------------------------------------------------------


def bioinstructqa_records(split: str = "test") -> tuple[dict[str, Any], ...]:
    """All records of `base/overall_<split>+prompt.json` inside BioInstructQA's data.zip."""
    return _zip_records(dataset_dir(BIOINSTRUCTQA.repo) / "data.zip", split)


@cache
def _zip_records(path: Path, split: str) -> tuple[dict[str, Any], ...]:
    if not path.is_file():
        raise DatasetMissing(f"dataset BioMistral/BioInstructQA: {path} is missing")
    wanted = f"base/overall_{split}+prompt.json"
    with zipfile.ZipFile(path) as archive:
        member = next((n for n in archive.namelist() if n.endswith(wanted)), None)
        if member is None:
            raise DatasetMissing(f"dataset BioMistral/BioInstructQA: {path} has no {wanted}")
        return tuple(json.loads(archive.read(member)))


def bioinstructqa_docs(corpus: str, fewshot_set: int = 1) -> list[dict[str, Any]]:
    """Docs for one corpus: its test records with the paper's prompt, shot set `fewshot_set` (1-3).

    `prompts[k]` is the prompt with the set's first k shots (k = 0..3); the task picks k from num_fewshot."""
    from medmerge_tasks.prompts import render

    if corpus not in BIOINSTRUCTQA_CORPORA:
        raise ValueError(f"unknown BioInstructQA corpus {corpus!r}")
    fewshot_set = int(fewshot_set)
    if fewshot_set not in BIOINSTRUCTQA_SHOT_SETS:
        raise ValueError(f"fewshot_set must be one of {BIOINSTRUCTQA_SHOT_SETS} (got {fewshot_set})")
    letters = BIOINSTRUCTQA_CORPORA[corpus][1]
    docs = []
    for record in bioinstructqa_records("test"):
        if record["corpus_name"] != corpus:
            continue
        options = record["options"]
        if list(options) != list(letters):
            raise ValueError(f"{corpus} record {record.get('identifier')}: options {list(options)} != {list(letters)}")
        gold = record["correct_answer_letter"]
        context = record.get("context") if corpus == "PubMedQA" else None
        target = _block(record, context, "")
        shots = [
            _block(s, s.get("context"), s["correct_answer_letter"]) for s in record[f"few_shot_samples[{fewshot_set}]"]
        ]
        docs.append(
            {
                "id": str(record.get("identifier", len(docs))),
                "prompts": [
                    render("bioinstructqa.jinja", target=target, shots=shots[:k]) for k in range(len(shots) + 1)
                ],
                "choices": list(letters),
                "gold": letters.index(gold),
                "gold_letter": gold,
            }
        )
    return docs


def _block(record: dict[str, Any], context: str | None, answer: str) -> dict[str, Any]:
    """One question block; the target's `answer` is "" so the prompt ends at `**Answer:**(`."""
    return {
        "context": context,
        "question": record["question"],
        "options": list(record["options"].items()),
        "answer": answer,
    }


# --- corpora read from their own datasets (corpora.CORPORA), for lm-eval-sampled shots ------------------------


def corpus_questions(name: str, split: str) -> list[Question]:
    """The questions of one split of a corpus, read from its published files (a held-out split: its slice)."""
    corpus = CORPORA[name]
    files = corpus.splits[split]
    questions = [corpus.read(r) for r in split_rows(dataset_dir(corpus.dataset.repo), files)]
    return held_out(questions, files.held_out) if files.held_out else questions


def held_out(questions: list[Question], size: int) -> list[Question]:
    """The `size` questions (a quarter of them if there are fewer than 4 x `size`) whose
    sha256(HELD_OUT_SALT, question, options) ranks first, in their file order (corpora.HELD_OUT)."""
    size = min(size, len(questions) // 4)
    rank = sorted(range(len(questions)), key=lambda i: (_held_out_key(questions[i]), i))
    return [questions[i] for i in sorted(rank[:size])]


def _held_out_key(q: Question) -> bytes:
    return hashlib.sha256("\0".join((HELD_OUT_SALT, q.question, *q.options)).encode()).digest()


def train_questions(name: str) -> list[Question]:
    """A corpus's train questions less any held out of train for validation (corpora.HELD_OUT): what shots for a
    held-out split, and any training, may see without touching the questions a search is judged on."""
    questions = corpus_questions(name, "fewshot")
    held = {
        (q.question, q.options)
        for split, files in CORPORA[name].splits.items()
        if files.held_out
        for q in corpus_questions(name, split)
    }
    return [q for q in questions if (q.question, q.options) not in held] if held else questions


def corpus_docs(name: str, split: str = "test") -> dict[str, list[dict[str, Any]]]:
    """{split: docs, "fewshot": docs} of a corpus, each doc one BioMistral question block; lm-eval samples the
    shots from "fewshot" (for a split held out of train, from train less the held-out questions)."""
    from medmerge_tasks.prompts import render

    if name not in CORPORA or split == "fewshot" or split not in CORPORA[name].splits:
        raise ValueError(f"no split {split!r} of a corpus {name!r} to evaluate on")
    questions = {role: corpus_questions(name, role) for role in (split, "fewshot")}
    if CORPORA[name].splits[split].held_out:  # never a shot that is (a copy of) an evaluated question
        questions["fewshot"] = train_questions(name)
    out: dict[str, list[dict[str, Any]]] = {}
    for role, role_questions in questions.items():
        out[role] = []
        for q in role_questions:
            letters = LETTERS[: len(q.options)]
            block = {"context": None, "question": q.question, "options": list(zip(letters, q.options)), "answer": ""}
            out[role].append(
                {"text": render("_bioinstructqa_block.jinja", target=block), "choices": list(letters), "gold": q.gold}
            )
    return out


def split_rows(root: Path, split: Split) -> list[dict[str, Any]]:
    """The records of the files matching `split.pattern` under `root` (.parquet or .jsonl), in file order."""
    files = sorted(root.glob(split.pattern))
    if not files:
        raise DatasetMissing(f"no files match {split.pattern} under {root}")
    rows: list[dict[str, Any]] = []
    for f in files:
        if f.suffix == ".jsonl":
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        else:
            rows += _parquet_rows(f.parent, f.name)
    return rows


# --- TruthfulQA health ------------------------------------------------------------------------------------


def _parquet_rows(directory: Path, pattern: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    files = sorted(directory.glob(pattern))
    if not files:
        raise DatasetMissing(f"no files match {pattern} under {directory}")
    rows: list[dict[str, Any]] = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    return rows


def truthfulqa_health_rows() -> tuple[dict[str, Any], ...]:
    """TruthfulQA multiple-choice rows with their category, for the four health categories.

    The `multiple_choice` config has no category; it is joined with `generation` on the question text.
    Any multiple-choice question without a match raises (a silent drop would change the scores)."""
    return _joined_truthfulqa(dataset_dir(TRUTHFULQA.repo))


@cache
def _joined_truthfulqa(root: Path) -> tuple[dict[str, Any], ...]:
    categories = {r["question"]: r["category"] for r in _parquet_rows(root, "generation/validation-*.parquet")}
    mc = _parquet_rows(root, "multiple_choice/validation-*.parquet")
    unmatched = [r["question"] for r in mc if r["question"] not in categories]
    if unmatched:
        raise ValueError(
            f"TruthfulQA: {len(unmatched)} multiple_choice question(s) have no generation row, e.g. {unmatched[0]!r}"
        )
    return tuple(
        {**r, "category": categories[r["question"]]}
        for r in mc
        if categories[r["question"]] in TRUTHFULQA_HEALTH_CATEGORIES
    )


def truthfulqa_docs(category: str, prompt: str) -> list[dict[str, Any]]:
    """The open form: MC1 and MC2 answers scored as continuations; `prompts[k]` has k solved examples (0 or 1)."""
    from medmerge_tasks.prompts import render

    docs = []
    for r in truthfulqa_health_rows():
        if r["category"] != category:
            continue
        mc1, mc2 = r["mc1_targets"], r["mc2_targets"]
        docs.append(
            {
                "prompts": [render(f"{prompt}.jinja", question=r["question"], n_shots=k) for k in (0, 1)],
                "choices": [" " + c for c in mc1["choices"]] + [" " + c for c in mc2["choices"]],
                "n_mc1": len(mc1["choices"]),
                "mc1_labels": list(mc1["labels"]),
                "mc2_labels": list(mc2["labels"]),
                "category": category,
            }
        )
    return docs


# Salt of the per-question option order of the lettered form; changing it changes every prompt (a new version).
MCQ_ORDER_SALT = "medmerge-truthfulqa-mcq-v1"


def mcq_order(question: str, n: int) -> list[int]:
    """A fixed pseudo-random order of a question's `n` choices: choice i sorts by sha256(salt, question, i).

    MC1's true answer is always first in the dataset; this order puts it at each position with equal chance,
    is the same on every machine and Python version, and depends on nothing but the question's text."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{MCQ_ORDER_SALT}\0{question}\0{i}".encode()).digest())


def truthfulqa_mcq_docs(category: str, truthful: bool) -> list[dict[str, Any]]:
    """The lettered form: MC1's choices as (A) (B) ... options in `mcq_order`, scored by the letter.

    `permutation[j]` is the MC1 index of the option shown at letter j; `prompts[k]` has k solved examples."""
    from medmerge_tasks.prompts import render

    docs = []
    for r in truthfulqa_health_rows():
        if r["category"] != category:
            continue
        mc1 = r["mc1_targets"]
        choices, labels = list(mc1["choices"]), list(mc1["labels"])
        if labels.count(1) != 1 or len(choices) != len(labels) or not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"TruthfulQA: MC1 of {r['question']!r} needs one true answer among 2-26 choices")
        order = mcq_order(r["question"], len(choices))
        letters = list(LETTERS[: len(choices)])
        target = {
            "context": None,
            "question": r["question"],
            "options": [[letter, choices[i]] for letter, i in zip(letters, order)],
            "answer": "",
        }
        gold = order.index(labels.index(1))
        docs.append(
            {
                "prompts": [
                    render("truthfulqa_mcq.jinja", target=target, n_shots=k, truthful=truthful) for k in (0, 1)
                ],
                "choices": letters,
                "gold": gold,
                "gold_letter": letters[gold],
                "permutation": order,
                "category": category,
            }
        )
    return docs


# --- MedMCQA ----------------------------------------------------------------------------------------------


def medmcqa_docs() -> list[dict[str, Any]]:
    """MedMCQA's validation split (its labelled test set) in the [INST] prompt, zero-shot."""
    return [medmcqa_inst_doc(q) for q in corpus_questions("medmcqa", "test")]


def medmcqa_inst_doc(q: Question) -> dict[str, Any]:
    """One MedMCQA question as a medmerge_medmcqa_inst doc: the [INST] prompt, letters A-D scored as " <letter>"."""
    from medmerge_tasks.prompts import render

    prompt = render("medmcqa_inst.jinja", question=q.question, options=list(q.options))
    return {"id": q.id, "prompts": [prompt], "choices": ["A", "B", "C", "D"], "gold": q.gold}


MEDMCQA_FIELDS = ("question", "opa", "opb", "opc", "opd", "cop")


def labelled_medmcqa(source: str) -> list[Question]:
    """Labelled MedMCQA questions to train on: `medmcqa` is MedMCQA's train split (hub or mirror) less the questions
    held out of it as medmerge_medmcqa_validation; otherwise a .jsonl, .json (a list) or .parquet file of records
    in MedMCQA's schema (question, opa-opd, cop 0-3).

    MedMCQA's validation split is refused: it is the labelled test set medmerge_medmcqa_inst reports on."""
    if source in ("medmcqa", "medmcqa:train"):
        return train_questions("medmcqa")
    if source.startswith("medmcqa:"):
        raise ValueError(
            f"{source}: only MedMCQA's train split can be trained on (its validation split is the test set "
            "medmerge_medmcqa_inst reports)"
        )
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{source}: no such file (give `medmcqa` or a .jsonl/.json/.parquet file in MedMCQA's schema)")
    if path.suffix == ".parquet":
        records = [(i + 1, r) for i, r in enumerate(_parquet_rows(path.parent, path.name))]
        where = "row"
    elif path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
        where = "line"
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of MedMCQA records")
        records, where = list(enumerate(data, 1)), "record"
    else:
        raise ValueError(f"{path}: expected a .jsonl, .json or .parquet file of MedMCQA records")
    return [_medmcqa_question(path, where, n, r) for n, r in records]


def _medmcqa_question(path: Path, where: str, number: int, record: Any) -> Question:
    place = f"{path}:{number}" if where == "line" else f"{path}: {where} {number}"
    if not isinstance(record, dict):
        raise ValueError(f"{place}: expected a record with {', '.join(MEDMCQA_FIELDS)}")
    for field in MEDMCQA_FIELDS:
        value = record.get(field)
        if field == "cop":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 3:
                raise ValueError(f"{place}: cop: expected the answer's index 0-3 (opa-opd), got {value!r}")
        elif not isinstance(value, str):
            raise ValueError(f"{place}: {field}: expected text, got {value!r}")
    return CORPORA["medmcqa"].read({"id": f"{path.name}:{number}", **record})
