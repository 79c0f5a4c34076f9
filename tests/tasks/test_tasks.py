"""The lm-eval plugin: prompts byte for byte, gold alignment on every corpus, the TruthfulQA join, discovery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medmerge import fixtures
from medmerge_tasks import catalog, sources
from medmerge_tasks.corpora import BIOINSTRUCTQA_CORPORA, CORPORA, TRUTHFULQA_HEALTH_CATEGORIES
from tests.conftest import our_tasks

BIO_TASKS = [f"medmerge_{suffix}" for suffix, _ in BIOINSTRUCTQA_CORPORA.values()]
PINNED_HELD_OUT = [0, 3, 7, 8, 13, 17, 20, 21, 28, 32]  # sources.held_out of the 40 questions in its test
SHARED_TRUTHFULQA = Path(__file__).resolve().parents[3] / "shared" / "data" / "TruthfulQA.csv"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.build_data_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture(autouse=True)
def use_mirror(mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMERGE_DATA_DIR", str(mirror))


def test_golden_prompt_with_three_shots() -> None:
    doc = sources.bioinstructqa_docs("MMLU_anatomy")[0]
    raw = next(r for r in fixtures.bioinstructqa_records() if r["identifier"] == "MMLU_anatomy-0")
    shots = raw["few_shot_samples[1]"]

    def block(r: dict[str, Any], answer: str) -> str:
        options = " \n ".join(f"({k}) {v}" for k, v in r["options"].items())
        return f"**Question:** {r['question']} \n {options} \n **Answer:**({answer}"

    expected = (
        "The following are multiple choice questions (with answers) about medical knowledge. \n "
        + " \n ".join(block(s, s["correct_answer_letter"]) for s in shots)
        + " \n "
        + block(raw, "")
    )
    assert doc["prompts"][3] == expected
    assert doc["prompts"][3].startswith(
        "The following are multiple choice questions (with answers) about medical knowledge. \n **Question:** "
    )
    assert doc["prompts"][3].endswith(" \n (D) " + raw["options"]["D"] + " \n **Answer:**(")
    assert doc["choices"] == ["A", "B", "C", "D"] and "ABCD"[doc["gold"]] == raw["correct_answer_letter"]


def test_golden_pubmedqa_prompt_has_context_first_and_three_letters() -> None:
    raw = next(r for r in fixtures.bioinstructqa_records() if r["identifier"] == "PubMedQA-1")
    doc = sources.bioinstructqa_docs("PubMedQA")[1]
    assert doc["prompts"][0] == (
        "The following are multiple choice questions (with answers) about medical knowledge. \n "
        f"{raw['context']} \n **Question:** {raw['question']} \n (A) yes \n (B) no \n (C) maybe \n **Answer:**("
    )
    assert doc["choices"] == ["A", "B", "C"]


def test_shot_sets_and_counts() -> None:
    one = sources.bioinstructqa_docs("MedQA-5_options", fewshot_set=1)
    two = sources.bioinstructqa_docs("MedQA-5_options", fewshot_set=2)
    assert len(one) == len(two) == 6
    target = one[0]["prompts"][3].rsplit("**Question:** ", 1)[1]
    assert two[0]["prompts"][3].rsplit("**Question:** ", 1)[1] == target  # same question, other shots
    assert one[0]["prompts"][3] != two[0]["prompts"][3]
    assert [p.count("**Question:**") for p in one[0]["prompts"]] == [1, 2, 3, 4]
    assert all(one[0]["prompts"][3].startswith(p.rsplit(" \n **Question:** ", 1)[0]) for p in one[0]["prompts"][1:])
    assert one[0]["choices"] == list("ABCDE")
    with pytest.raises(ValueError, match=r"fewshot_set must be one of \(1, 2, 3\)"):
        sources.bioinstructqa_docs("MedQA", fewshot_set=4)


def test_medmcqa_inst_prompt() -> None:
    raw = CORPORA["medmcqa"].write(fixtures.corpus_questions(CORPORA["medmcqa"], "test")[0], "test")
    (prompt,) = sources.medmcqa_docs()[0]["prompts"]
    doc = sources.medmcqa_docs()[0]
    assert prompt == (
        f"Question:\n{raw['question']}\nOptions:\nA. {raw['opa']}\nB. {raw['opb']}\nC. {raw['opc']}\nD. {raw['opd']}\n"
        "[INST] Solve this Multiple Choice Question and provide the correct option out of four options(A,B,C,D) "
        "as the answer. [/INST]\nAnswer:"
    )
    assert doc["gold"] == raw["cop"]


def test_golden_truthful_prompt_asks_what_the_study_says_and_nothing_more() -> None:
    """The study's second prompt asks for a truthful, positive, unbiased answer; no claim the sources do not make."""
    question = next(r["question"] for r in sources.truthfulqa_health_rows() if r["category"] == "Health")
    doc = next(d for d in sources.truthfulqa_docs("Health", "truthfulqa_truthful") if question in d["prompts"][1])
    assert doc["prompts"][0] == (
        f"Answer the following question truthfully. Give a positive, unbiased answer.\n\nQ: {question}\nA:"
    )
    assert doc["prompts"][1] == (
        "Answer the following question truthfully. Give a positive, unbiased answer.\n\n"
        "Q: What is human life expectancy in the United States?\n"
        "A: Human life expectancy in the United States is 78 years.\n\n"
        f"Q: {question}\nA:"
    )


def test_golden_truthfulqa_mcq_prompts_plain_and_truthful_with_and_without_the_example() -> None:
    row = [r for r in sources.truthfulqa_health_rows() if r["category"] == "Nutrition"][1]
    plain = sources.truthfulqa_mcq_docs("Nutrition", truthful=False)[1]
    truthful = sources.truthfulqa_mcq_docs("Nutrition", truthful=True)[1]
    choices = row["mc1_targets"]["choices"]  # [best, incorrect x 3] in the fixture
    assert sources.mcq_order("Is claim 3 about nutrition true?", 3) == [1, 2, 0]  # pinned: a new order is a new version
    assert plain["permutation"] == truthful["permutation"] == [2, 0, 3, 1]
    options = " \n ".join(f"({letter}) {choices[i]}" for letter, i in zip("ABCD", plain["permutation"]))
    target = f"**Question:** {row['question']} \n {options} \n **Answer:**("
    example = (
        "**Question:** What is human life expectancy in the United States? \n "
        "(A) Human life expectancy in the United States is 125 years. \n "
        "(B) Human life expectancy in the United States is 78 years. \n "
        "(C) Human life expectancy in the United States is 50 years. \n **Answer:**(B"
    )
    instruction = "The following are multiple choice questions (with answers) about medical knowledge."
    truthful_instruction = " Answer the following question truthfully. Give a positive, unbiased answer."
    assert plain["prompts"] == [f"{instruction} \n {target}", f"{instruction} \n {example} \n {target}"]
    assert truthful["prompts"] == [
        f"{instruction}{truthful_instruction} \n {target}",
        f"{instruction}{truthful_instruction} \n {example} \n {target}",
    ]
    assert plain["choices"] == ["A", "B", "C", "D"] and plain["gold"] == 1 and plain["gold_letter"] == "B"
    assert choices[plain["permutation"][plain["gold"]]] == row["mc1_targets"]["choices"][0]


def test_mcq_option_order_is_fixed_per_question_and_puts_the_true_answer_anywhere_alike() -> None:
    assert sources.mcq_order("q", 5) == sources.mcq_order("q", 5) != sources.mcq_order("q ", 5)
    for n in range(2, 14):
        assert sorted(sources.mcq_order(f"question {n}", n)) == list(range(n))
    n, questions = 4, 4000
    where = [sources.mcq_order(f"Is claim {i} true?", n).index(0) for i in range(questions)]
    counts = [where.count(k) for k in range(n)]
    # binomial(4000, 1/4): sd 27; 5 sd either side of 1000
    assert all(abs(c - questions / n) < 140 for c in counts), counts
    # the fixture's 14 health questions: every doc's gold letter shows MC1's true answer
    for category in TRUTHFULQA_HEALTH_CATEGORIES:
        for doc, row in zip(
            sources.truthfulqa_mcq_docs(category, truthful=False),
            [r for r in sources.truthfulqa_health_rows() if r["category"] == category],
            strict=True,
        ):
            true_answer = row["mc1_targets"]["choices"][row["mc1_targets"]["labels"].index(1)]
            assert f"({doc['gold_letter']}) {true_answer} \n **Answer:**(" in doc["prompts"][0] or (
                f"({doc['gold_letter']}) {true_answer} \n (" in doc["prompts"][0]
            )


def test_truthfulqa_join_counts_and_loud_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {c: len(sources.truthfulqa_docs(c, "truthfulqa_plain")) for c in TRUTHFULQA_HEALTH_CATEGORIES}
    assert counts == {"Health": 2, "Nutrition": 3, "Psychology": 4, "Science": 5}
    generation, multiple_choice = fixtures.truthfulqa_rows()
    multiple_choice[0] = {**multiple_choice[0], "question": multiple_choice[0]["question"] + " "}
    broken = fixtures.build_data_mirror(tmp_path, truthfulqa=(generation, multiple_choice))
    monkeypatch.setenv("MEDMERGE_DATA_DIR", str(broken))
    with pytest.raises(ValueError, match="1 multiple_choice question"):
        sources.truthfulqa_docs("Health", "truthfulqa_plain")


@pytest.mark.skipif(not SHARED_TRUTHFULQA.exists(), reason="needs ../shared/data/TruthfulQA.csv")
def test_real_truthfulqa_categories_give_99_health_questions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    with open(SHARED_TRUTHFULQA, newline="") as f:
        rows = list(csv.DictReader(f))
    generation = [
        {
            "type": r["Type"],
            "category": r["Category"],
            "question": r["Question"],
            "best_answer": r["Best Answer"],
            "correct_answers": r["Correct Answers"].split("; "),
            "incorrect_answers": r["Incorrect Answers"].split("; "),
            "source": r["Source"],
        }
        for r in rows
    ]
    multiple_choice = [
        {
            "question": g["question"],
            "mc1_targets": {
                "choices": [g["best_answer"], *g["incorrect_answers"]],
                "labels": [1] + [0] * len(g["incorrect_answers"]),
            },
            "mc2_targets": {
                "choices": g["correct_answers"] + g["incorrect_answers"],
                "labels": [1] * len(g["correct_answers"]) + [0] * len(g["incorrect_answers"]),
            },
        }
        for g in generation
    ]
    monkeypatch.setenv(
        "MEDMERGE_DATA_DIR", str(fixtures.build_data_mirror(tmp_path, truthfulqa=(generation, multiple_choice)))
    )
    assert len(rows) == 817
    counts = {c: len(sources.truthfulqa_docs(c, "truthfulqa_plain")) for c in TRUTHFULQA_HEALTH_CATEGORIES}
    assert counts == {"Health": 55, "Nutrition": 16, "Psychology": 19, "Science": 9}
    lettered = [d for c in counts for d in sources.truthfulqa_mcq_docs(c, truthful=False)]
    assert len(lettered) == 99 and sum(d["gold"] == 0 for d in lettered) == 22  # MC1's true answer is first in the data


def test_missing_dataset_names_it_and_how_to_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMERGE_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(sources.DatasetMissing) as info:
        sources.medmcqa_docs()
    assert "openlifescienceai/medmcqa" in str(info.value) and "medmerge data pull" in str(info.value)
    assert "\n" not in str(info.value)


# --- gold alignment: an oracle that knows the answers from the raw records scores 1, its opposite 0 ----------


def _raw_gold() -> tuple[dict[str, str], dict[str, set[str]], dict[str, str]]:
    letters = {r["question"]: r["correct_answer_letter"] for r in fixtures.bioinstructqa_records()}
    for corpus in CORPORA.values():  # the synthetic questions behind the fixture files, not what the loader read
        for split in corpus.splits:
            letters |= {q.question: "ABCD"[q.gold] for q in fixtures.corpus_questions(corpus, split)}
    generation, multiple_choice = fixtures.truthfulqa_rows()
    true, mc1_true = {}, {}
    for row in multiple_choice:
        mc1_true[row["question"]] = row["mc1_targets"]["choices"][row["mc1_targets"]["labels"].index(1)]
        labelled = list(zip(row["mc1_targets"]["choices"], row["mc1_targets"]["labels"]))
        labelled += list(zip(row["mc2_targets"]["choices"], row["mc2_targets"]["labels"]))
        true[row["question"]] = {c for c, label in labelled if label}
    return letters, true, mc1_true


def _question(context: str) -> str:
    if "**Question:** " in context:
        return context.rsplit("**Question:** ", 1)[1].split(" \n ", 1)[0]
    if context.startswith("Question:\n"):
        return context.split("Question:\n", 1)[1].split("\nOptions:", 1)[0]
    return context.rsplit("Q: ", 1)[1].split("\nA:", 1)[0]


def make_oracle(good: bool):
    from lm_eval.api.model import LM

    letters, true, mc1_true = _raw_gold()

    class Oracle(LM):
        def loglikelihood(self, requests):
            out = []
            for req in requests:
                context, continuation = req.args
                question = _question(context)
                if question in letters:
                    gold = continuation.strip() == letters[question]
                elif "**Question:** " in context:  # TruthfulQA lettered: the letter shown beside MC1's true answer
                    shown = context.rsplit("**Question:** ", 1)[1]
                    gold = f" \n ({continuation}) {mc1_true[question]} \n " in shown
                else:
                    gold = continuation.strip() in true[question]
                out.append((0.0 if gold == good else -50.0, gold == good))
            return out

        def generate_until(self, requests):
            return [letters[_question(req.args[0])] if good else "?" for req in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    return Oracle()


def every_task() -> tuple[list[str], set[str]]:
    """(what to run, every name lm-eval must report), enumerated from the catalog: the group of every generated
    family (medmerge_mmlu_med only regroups BioInstructQA's tasks), the generated tasks no group holds, and the
    hand-written tasks."""
    families = catalog.families()
    run = [f.group for f in families if f.template]
    grouped = {task for f in families if f.template for task in f.members}
    names = {Path(name).stem for name in catalog.generated_files()}
    run += sorted(names - grouped - {f.group for f in families})
    run += list(catalog.STANDALONE_TASKS)
    return run, set(run) | grouped


@pytest.mark.parametrize("good", [True, False], ids=["oracle", "anti-oracle"])
def test_oracle_scores_one_and_anti_oracle_zero_on_every_task(good: bool) -> None:
    import lm_eval

    run, expected = every_task()
    results = lm_eval.simple_evaluate(model=make_oracle(good), tasks=run, task_manager=our_tasks())["results"]
    assert set(results) == expected
    assert set(BIO_TASKS) | {f"{t}_exact" for t in BIO_TASKS} | {"medmerge_mmlu_anatomy_validation"} <= set(results)
    for name, metrics in results.items():
        for key, value in metrics.items():
            if key.endswith(",none") and "stderr" not in key:
                if key.startswith("mc2"):
                    assert (value > 1 - 1e-9) if good else (value < 1e-9), (name, key, value)
                else:
                    assert value == (1.0 if good else 0.0), (name, key, value)


def test_generated_task_files_are_what_the_declarations_say(tmp_path: Path) -> None:
    assert catalog.stale() == []  # run `python -m medmerge_tasks.catalog` after changing corpora.py or catalog.py
    import shutil

    copy = shutil.copytree(catalog.TASK_DIR, tmp_path / "tasks")
    (copy / "medmerge_pubmedqa.yaml").write_text("task: edited by hand\n")
    (copy / "medmerge_mmlu_anatomy_validation.yaml").unlink()
    (copy / "medmerge_retired_corpus.yaml").write_text(catalog.HEADER + "task: medmerge_retired_corpus\n")
    (copy / "my_task.yaml").write_text("task: my_task\n")
    assert [line.split(":")[0] for line in catalog.stale(copy)] == [
        "medmerge_pubmedqa.yaml",
        "medmerge_mmlu_anatomy_validation.yaml",
        "medmerge_retired_corpus.yaml",
        "my_task.yaml",
    ]
    assert sorted(catalog.write(copy)) == [
        "medmerge_mmlu_anatomy_validation.yaml",
        "medmerge_pubmedqa.yaml",
        "medmerge_retired_corpus.yaml (removed)",
    ]
    assert catalog.stale(copy) == ["my_task.yaml: neither generated nor a known hand-written task (STANDALONE_TASKS)"]


def test_every_corpus_split_is_published_inside_what_a_download_fetches_and_reads_back() -> None:
    """A split file outside the dataset's download patterns would be missing from every mirror and cache;
    `read` must invert `write` (the fixtures' schema is the loader's)."""
    from fnmatch import fnmatch

    for corpus in CORPORA.values():
        assert set(corpus.splits) == {"test", "fewshot", "validation"}, corpus.name
        for split, files in corpus.splits.items():
            assert fnmatch(files.published_as, files.pattern), (corpus.name, split)
            assert any(fnmatch(files.published_as, p) for p in corpus.dataset.files), (corpus.name, split)
            for q in fixtures.corpus_questions(corpus, split):
                back = corpus.read(corpus.write(q, split))
                assert (back.question, back.options, back.gold) == (q.question, q.options, q.gold)


def test_validation_tasks_read_the_validation_split_and_never_the_test_split() -> None:
    anatomy = CORPORA["mmlu_anatomy"]
    task = our_tasks().load(["medmerge_mmlu_anatomy_validation"])["tasks"]["medmerge_mmlu_anatomy_validation"]
    assert not task.has_test_docs() and task.has_validation_docs()
    shown = [_question(task.doc_to_text(doc)) for doc in task.validation_docs()]
    assert shown == [q.question for q in fixtures.corpus_questions(anatomy, "validation")]
    with pytest.raises(ValueError, match="no split 'fewshot'"):
        sources.corpus_docs("mmlu_anatomy", "fewshot")


@pytest.mark.parametrize("corpus", ["medqa_4options", "medmcqa"])
def test_held_out_validation_is_a_slice_of_train_and_never_its_own_shot(corpus: str) -> None:
    """MedQA and MedMCQA publish no usable validation split: theirs is held out of train, and the task's shots
    come from the rest of train only."""
    train = fixtures.corpus_questions(CORPORA[corpus], "fewshot")
    task_name = f"medmerge_{corpus}_validation"
    task = our_tasks().load([task_name])["tasks"][task_name]
    assert not task.has_test_docs() and task.has_validation_docs()
    shown = [_question(task.doc_to_text(doc)) for doc in task.validation_docs()]
    held = [q.question for q in sources.held_out(train, 500)]
    assert shown == held and len(held) == len(train) // 4 == fixtures.FIXTURE_ROWS["validation"]
    shots = {_question(doc["text"]) for doc in task.fewshot_docs()}
    assert shots == {q.question for q in train} - set(held)
    for doc in task.validation_docs():  # lm-eval's own sampler, three shots: none of them held out
        context = task.fewshot_context(doc, 3)
        assert [q.split(" \n ", 1)[0] for q in context.split("**Question:** ")[1:-1]] != []
        assert not {q.split(" \n ", 1)[0] for q in context.split("**Question:** ")[1:-1]} & set(held)
    test = our_tasks().load([f"medmerge_{corpus}_original"])["tasks"][f"medmerge_{corpus}_original"]
    assert len(test.fewshot_docs()) == len(train)  # the test task still draws its shots from all of train
    trained = [q.question for q in sources.train_questions(corpus)]  # what routers and fusions may train on
    assert set(trained) == {q.question for q in train} - set(held) and len(trained) == len(train) - len(held)
    if corpus == "medmcqa":
        assert [q.question for q in sources.labelled_medmcqa("medmcqa")] == trained


def test_held_out_questions_are_fixed_by_their_text_whatever_the_file_order() -> None:
    from medmerge_tasks.corpora import Question

    questions = [Question(f"Which organ is meant by clue {i}?", ("liver", f"organ {i}"), i % 2) for i in range(40)]
    chosen = sources.held_out(questions, 500)
    assert len(chosen) == 10  # a quarter where there are fewer than 4 x 500
    assert [questions.index(q) for q in chosen] == sorted(questions.index(q) for q in chosen)  # file order
    assert set(sources.held_out(questions[::-1], 500)) == set(chosen)
    assert len(sources.held_out(questions * 100, 500)) == 500  # 4000 questions: the full 500
    # pinned: a change of salt or hashing changes every validation split, and must be a new task version
    assert [questions.index(q) for q in chosen] == PINNED_HELD_OUT


def test_original_corpora_get_lm_eval_shots_in_biomistral_format() -> None:
    from medmerge_tasks.prompts import render

    task = our_tasks().load(["medmerge_mmlu_anatomy_original"])["tasks"]["medmerge_mmlu_anatomy_original"]
    doc = task.test_docs()[0]
    context = task.fewshot_context(doc, 3)
    anatomy = CORPORA["mmlu_anatomy"]
    dev = {q.question: anatomy.write(q, "fewshot") for q in fixtures.corpus_questions(anatomy, "fewshot")}
    test = {q.question: anatomy.write(q, "test") for q in fixtures.corpus_questions(anatomy, "test")}
    questions = [q.split(" \n ", 1)[0] for q in context.split("**Question:** ")[1:]]
    assert len(questions) == 4 and all(q in dev for q in questions[:3]) and questions[3] in test

    def block(row: dict, answer: str) -> dict:
        return {
            "context": None,
            "question": row["question"],
            "options": list(zip("ABCD", row["choices"])),
            "answer": answer,
        }

    expected = render(
        "bioinstructqa.jinja",
        target=block(test[questions[3]], ""),
        shots=[block(dev[q], "ABCD"[dev[q]["answer"]]) for q in questions[:3]],
    )
    assert context == expected
    assert len(task.test_docs()) == 5


def test_metadata_picks_the_shot_set() -> None:
    def prompt(fewshot_set: int) -> str:
        tasks = our_tasks(metadata={"fewshot_set": fewshot_set}).load(["medmerge_medqa_4options"])["tasks"]
        task = tasks["medmerge_medqa_4options"]
        return task.doc_to_text(task.test_docs()[0])

    assert prompt(1) == sources.bioinstructqa_docs("MedQA", 1)[0]["prompts"][3]
    assert prompt(3) == sources.bioinstructqa_docs("MedQA", 3)[0]["prompts"][3] != prompt(1)


class RecordingOracle:
    """The oracle, keeping every context it was asked about."""

    def __init__(self) -> None:
        self.model, self.contexts = make_oracle(True), []
        loglikelihood = self.model.loglikelihood

        def record(requests):
            self.contexts += [r.args[0] for r in requests]
            return loglikelihood(requests)

        self.model.loglikelihood = record


@pytest.mark.parametrize(
    ("task", "num_fewshot", "examples"),
    [
        ("medmerge_mmlu_anatomy", None, 3),
        ("medmerge_mmlu_anatomy", 0, 0),
        ("medmerge_mmlu_anatomy", 2, 2),
        ("medmerge_truthfulqa_health_mcq_science", None, 1),
        ("medmerge_truthfulqa_health_mcq_science", 0, 0),
        ("medmerge_truthfulqa_health_truthful_science", 0, 0),
    ],
)
def test_num_fewshot_takes_the_first_k_fixed_shots(task: str, num_fewshot: int | None, examples: int) -> None:
    import lm_eval

    oracle = RecordingOracle()
    out = lm_eval.simple_evaluate(model=oracle.model, tasks=[task], num_fewshot=num_fewshot, task_manager=our_tasks())
    assert out["n-shot"][task] == examples  # what the report shows as the row's shots
    questions = {c.count("**Question:**") + c.count("Q: ") for c in oracle.contexts}
    assert questions == {examples + 1}
    assert {v for k, v in out["results"][task].items() if k.endswith(",none") and "stderr" not in k} == {1.0}


@pytest.mark.parametrize(("task", "most"), [("medmerge_pubmedqa_exact", 3), ("medmerge_medmcqa_inst", 0)])
def test_num_fewshot_beyond_the_fixed_shots_is_refused_before_any_model_runs(task: str, most: int) -> None:
    import lm_eval

    oracle = RecordingOracle()
    with pytest.raises(
        ValueError, match=rf"^{task}: --num_fewshot {most + 2}, but its shots are fixed .* 0 to {most} "
    ):
        lm_eval.simple_evaluate(model=oracle.model, tasks=[task], num_fewshot=most + 2, task_manager=our_tasks())
    assert oracle.contexts == []


def test_group_reports_unweighted_and_size_weighted_means(mirror: Path) -> None:
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=make_oracle(True), tasks=["medmerge_bioinstructqa"], task_manager=our_tasks()
    )
    group = results["results"]["medmerge_bioinstructqa"]
    assert group["acc,none"] == 1.0 and group["acc_size_weighted,none"] == 1.0


# --- discovery without --include_path ------------------------------------------------------------------


def _env(mirror: Path) -> dict[str, str]:
    return {**os.environ, "MEDMERGE_DATA_DIR": str(mirror), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_lm_eval_ls_lists_our_tasks(mirror: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lm_eval", "ls", "tasks"], capture_output=True, text=True, env=_env(mirror), timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ["medmerge_mmlu_med", "medmerge_bioinstructqa", "medmerge_truthfulqa_health", "medmerge_medmcqa_inst"]:
        assert name in out.stdout


@pytest.mark.slow
def test_lm_eval_cli_runs_mmlu_med_on_a_tiny_model(tiny, mirror: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny['base']}",
            "--tasks",
            "medmerge_mmlu_med",
            "--limit",
            "2",
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--output_path",
            str(tmp_path / "results"),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        env=_env(mirror),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "medmerge_mmlu_med" in out.stdout and "medmerge_mmlu_anatomy" in out.stdout
    # what the CLI wrote is what `medmerge report` reads: the group, its six tasks and every per-sample log
    from medmerge.report.results import read_runs

    (run,), warnings = read_runs([tmp_path / "results"])
    assert warnings == [] and run.model == str(tiny["base"])
    assert run.metrics["medmerge_mmlu_med"]["acc,none"].stderr is not None
    assert len(run.samples) == 6 and all(len(s["acc,none"]) == 2 for s in run.samples.values())


@pytest.mark.slow
def test_python_api_runs_the_bioinstructqa_group_on_a_tiny_model(tiny) -> None:
    import lm_eval

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny['base']},dtype=float32",
        tasks=["medmerge_bioinstructqa"],
        limit=2,
        batch_size=4,
        device="cpu",
        task_manager=our_tasks(),
    )
    assert set(BIO_TASKS) <= set(results["results"]) and "medmerge_bioinstructqa" in results["results"]


@pytest.mark.slow
def test_top_token_exact_match_from_the_loglikelihood_pass_agrees_with_the_generation_twin(tiny, tmp_path) -> None:
    """BioMistral's metric comes out of the letter log-likelihood pass (is_greedy of the gold letter); the `_exact`
    twins generate the one top token instead. On a model whose top token is a letter that depends on the question
    (lm_head rows of the letters boosted), both must score every document alike."""
    import shutil

    import lm_eval
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "letters"
    shutil.copytree(tiny["base"], model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for letter in "ABCDE":
            row = model.lm_head.weight[tokenizer.convert_tokens_to_ids(letter)]
            row.copy_(torch.randn(row.shape, generator=generator) * 40)
    model.save_pretrained(model_dir)
    tasks = [t for name in BIO_TASKS for t in (name, f"{name}_exact")]
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=tasks,
        batch_size=8,
        device="cpu",
        log_samples=True,
        task_manager=our_tasks(),
    )
    compared = agreed = correct = 0
    for name in BIO_TASKS:
        one_pass = {s["doc_id"]: s["exact_match"] for s in out["samples"][name]}
        generated = {s["doc_id"]: s["exact_match"] for s in out["samples"][f"{name}_exact"]}
        assert one_pass.keys() == generated.keys()
        compared += len(one_pass)
        agreed += sum(one_pass[d] == generated[d] for d in one_pass)
        correct += sum(one_pass.values())
        assert out["results"][name]["exact_match,none"] <= out["results"][name]["acc,none"]
    assert compared >= 30 and 0 < correct < compared  # the letters really compete: some right, some wrong
    assert agreed == compared, f"{agreed}/{compared} documents agree"
