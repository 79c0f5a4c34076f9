"""`medmerge run EXPERIMENT.yaml`: merge what is not merged, evaluate what is not evaluated, write a report.

Resumable: every merge and every evaluation is keyed by a hash of everything that determines it (recipe text
and merge settings; model identity, tasks, shot set and lm-eval settings). A finished step whose key matches
is reused; a changed recipe or setting is redone. Kill it anywhere and run again.

    work_dir: runs/biomistral           # relative paths are relative to the experiment file
    recipes: [../recipes/biomistral-instruct-slerp.yaml]   # merged into work_dir/models/<recipe name>
    moes:                               # mixtures of experts (mergekit-moe configs), built into work_dir/models/<name>
      - config: ../recipes/moe/biomistral-instruct-moe.yaml
        train_router: {data: medmcqa, epochs: 3}   # optional: also <name>_router, its routers trained
    models: [BioMistral/BioMistral-7B]  # evaluated as they are (hub ids or directories; BASE+ADAPTER: a LoRA on top)
    tasks: [medmerge_bioinstructqa]
    data_dir: null                      # a dataset mirror (MEDMERGE_DATA_DIR) for these evaluations only
    note: ""                            # a line under the report's title (default: shot sets and this file)
    fewshot_sets: [1, 2, 3]             # BioInstructQA's fixed shot sets: one evaluation per set
    merge: {device: cpu, seed: 0}
    lm_eval: {model: hf, batch_size: 8, dtype: bfloat16, device: cuda, limit: null, model_args: {}}
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medmerge.fusion.train import load_fusion_config
from medmerge.labelled import TASK_PREFIX
from medmerge.report import build_report
from medmerge.router_training import RouterSettings
from medmerge_common.errors import UserError
from medmerge_common.outdir import atomic_output_dir
from medmerge_tasks.corpora import BIOINSTRUCTQA_SHOT_SETS
from merge.io.lora import split_adapter
from merge.moe.config import load_moe_config
from merge.recipe import load_recipe, model_ref_problem
from merge.run import Progress, run_merge
from merge.yamlfile import field_name, line_of, load_yaml, validate_model

Say = Callable[[str], None]
KEY_FILE = ".medmerge_key"  # the hash of everything that determined a finished merge or evaluation
MERGE_SECONDS_FILE = ".medmerge_merge_seconds"  # how long a finished merge took (wall time, seconds)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeSettings(_Strict):
    device: str = "cpu"
    seed: int = 0
    out_shard_size: int = 5 * 10**9


class LmEvalSettings(_Strict):
    model: str = "hf"
    batch_size: int | str = 8
    dtype: str | None = "bfloat16"
    device: str = "cuda"
    limit: int | float | None = None
    model_args: dict[str, Any] = Field(default_factory=dict)


class TrainRouter(RouterSettings):
    """`medmerge moe train-router`'s options: the data and RouterSettings."""

    data: str = "medmcqa"
    validation_data: str | None = None


class MoEArm(_Strict):
    config: str  # a mergekit-moe config file
    train_router: TrainRouter | None = None


class EnsembleArm(_Strict):
    """A fixed-weight output ensemble (`--model medmerge-ensemble`) of arms or models."""

    name: str
    members: list[str] = Field(min_length=2)  # arm names of this experiment, directories or hub ids
    weights: list[float] | None = None
    combine: Literal["prob", "logprob"] = "prob"


class FusionArm(_Strict):
    """Trained combiners (`medmerge fuse train`), one arm `<config stem>_<combiner>` per combiner."""

    config: str  # a `medmerge fuse train` config file
    combiners: list[Literal["weighted", "late_fusion", "transformer"]] = Field(
        default_factory=lambda: ["late_fusion"], min_length=1
    )
    tasks: list[str] | None = None  # default: the experiment's (every task must have the trained option count)


class Experiment(_Strict):
    work_dir: str
    recipes: list[str] = Field(default_factory=list)
    moes: list[MoEArm] = Field(default_factory=list)
    ensembles: list[EnsembleArm] = Field(default_factory=list)
    fusions: list[FusionArm] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)
    tasks: list[str] = Field(min_length=1)
    data_dir: str | None = None
    note: str = ""  # printed under the report's title
    fewshot_sets: list[int] = Field(default_factory=lambda: [1])
    merge: MergeSettings = Field(default_factory=MergeSettings)
    lm_eval: LmEvalSettings = Field(default_factory=LmEvalSettings)


def load_experiment(path: str | Path) -> tuple[Experiment, Path]:
    """The experiment and the directory its relative paths are relative to; errors name file:line:field."""
    data, lines = load_yaml(path)
    experiment = validate_model(Experiment, data, path, lines)
    assert isinstance(experiment, Experiment)
    base = Path(path).resolve().parent

    def error(message: str, *where: str | int) -> UserError:
        return UserError(message, file=path, line=line_of(lines, where), field=field_name(where))

    # a broken recipe or config fails now, not after an hour of other work
    files = [("recipes", i, None, "recipe", r, load_recipe) for i, r in enumerate(experiment.recipes)]
    files += [("moes", i, "config", "MoE config", m.config, load_moe_config) for i, m in enumerate(experiment.moes)]
    files += [
        ("fusions", i, "config", "fusion config", f.config, load_fusion_config)
        for i, f in enumerate(experiment.fusions)
    ]
    for key, i, subkey, what, file, load in files:
        if not (base / file).is_file():
            raise error(f"{what} file {file} not found", key, i, *([subkey] if subkey else []))
        load(base / file)
    for i, model in enumerate(experiment.models):
        if split_adapter(model)[1] is not None and (problem := model_ref_problem(located_model(model, base))):
            raise error(problem, "models", i)
    for i, ensemble in enumerate(experiment.ensembles):
        for j, member in enumerate(ensemble.members):
            if "+" in member:
                raise error(
                    f"'{member}': an ensemble's members are models whole; merge the adapter into its base first "
                    "(a passthrough recipe of BASE+ADAPTER) and name that recipe's arm",
                    "ensembles",
                    i,
                    "members",
                    j,
                )
        if ensemble.weights is not None and len(ensemble.weights) != len(ensemble.members):
            raise error(
                f"{len(ensemble.members)} members but {len(ensemble.weights)} weights", "ensembles", i, "weights"
            )
    names: dict[str, tuple[str, int]] = {}  # each arm's name in work_dir: recipes by file stem, models by name
    arms = [("recipes", i, Path(r).stem) for i, r in enumerate(experiment.recipes)]
    for i, moe in enumerate(experiment.moes):
        arms += [("moes", i, name) for name in moe_arm_names(moe)]
    arms += [("models", i, arm_name(m, base)) for i, m in enumerate(experiment.models)]
    arms += [("ensembles", i, e.name) for i, e in enumerate(experiment.ensembles)]
    for i, fusion in enumerate(experiment.fusions):
        arms += [("fusions", i, name) for name in fusion_arm_names(fusion)]
    for key, i, name in arms:
        if name in names:
            other_key, other = names[name]
            raise error(
                f"'{name}' names two arms ({other_key}[{other}] and {key}[{i}]): their merges and results would "
                "share one directory; rename one of them",
                key,
                i,
            )
        names[name] = (key, i)
    if any(s not in BIOINSTRUCTQA_SHOT_SETS for s in experiment.fewshot_sets):
        raise error(
            f"fewshot_sets are BioInstructQA's shot sets {', '.join(map(str, BIOINSTRUCTQA_SHOT_SETS))}", "fewshot_sets"
        )
    return experiment, base


def moe_arm_names(moe: MoEArm) -> list[str]:
    """The MoE as built (named by its config file), and with its routers trained (`<name>_router`)."""
    name = Path(moe.config).stem
    return [name] + ([f"{name}_router"] if moe.train_router else [])


def fusion_arm_names(fusion: FusionArm) -> list[str]:
    return [f"{Path(fusion.config).stem}_{combiner}" for combiner in fusion.combiners]


def arm_name(model: str, base: Path) -> str:
    """What a plain model is called in the work directory and the report: a local directory by its name, a hub
    id as it is; BASE+ADAPTER as the two joined by '+'."""
    return "+".join(Path(ref).name if (base / ref).exists() else ref for ref in _refs(model))


def _refs(model: str) -> list[str]:
    """A model reference's parts: [model], or [base, adapter] for BASE+ADAPTER."""
    base_model, adapter = split_adapter(model)
    return [base_model] if adapter is None else [base_model, adapter]


def located_model(model: str, base: Path) -> str:
    """`model` with each part (a model, or BASE and ADAPTER) that is a directory relative to `base` resolved."""
    return "+".join(_located(ref, base) for ref in _refs(model))


def _located(ref: str, base: Path) -> str:
    """A model or adapter: a directory relative to the experiment file's, resolved, or a hub id as it is."""
    return str((base / ref).resolve()) if (base / ref).exists() else ref


@dataclass
class Candidate:
    """What one report row is evaluated on: lm-eval's `pretrained` (a directory, hub id, or the members of an
    ensemble), the identity its results are keyed by, and where it is not the experiment's `hf`-style model,
    the lm-eval model type, its other arguments, its tasks and the name lm-eval's output gives it."""

    pretrained: str
    identity: str
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None
    label: str | None = None


def _is_current(out: Path, key: str) -> bool:
    """Whether `out` holds a finished step whose key is `key`."""
    return (out / KEY_FILE).is_file() and (out / KEY_FILE).read_text() == key


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_experiment(
    path: str | Path,
    say: Say = print,
    progress: Callable[[str], AbstractContextManager[Progress | None]] | None = None,
    verbose: bool = False,
) -> Path:
    """Run (or resume) an experiment; returns the path of its report's leaderboard.md (index.html beside it).
    `progress(description)` gives a context manager yielding a merge progress callback
    (medmerge.console.progress_bar); `verbose` keeps transformers' and datasets' progress bars (lm-eval's own
    request bar always shows)."""
    experiment, base = load_experiment(path)
    work = (base / experiment.work_dir).resolve()
    (work / "models").mkdir(parents=True, exist_ok=True)
    data_dir = str((base / experiment.data_dir).resolve()) if experiment.data_dir else None
    candidates: dict[str, Candidate] = {}

    for i, recipe_file in enumerate(experiment.recipes, 1):
        recipe = load_recipe(base / recipe_file)  # read once: what is hashed is what is merged
        name = Path(recipe_file).stem
        out = work / "models" / name
        key = _digest(recipe.source_text, experiment.merge.model_dump())
        if _is_current(out, key):
            say(f"[merge {i}/{len(experiment.recipes)}] {name}: up to date")
        else:
            say(f"[merge {i}/{len(experiment.recipes)}] {name}")
            started = time.monotonic()
            with progress(f"merging {name}") if progress else nullcontext() as update:
                run_merge(
                    recipe,
                    out,
                    device=experiment.merge.device,
                    seed=experiment.merge.seed,
                    shard_bytes=experiment.merge.out_shard_size,
                    overwrite=True,
                    progress=update,
                    warn=say,
                )
            (out / MERGE_SECONDS_FILE).write_text(f"{time.monotonic() - started:.3f}\n")
            (out / KEY_FILE).write_text(key)
        candidates[name] = Candidate(str(out), key)
    for i, moe in enumerate(experiment.moes, 1):
        step = f"[moe {i}/{len(experiment.moes)}]"
        candidates |= _build_moe(moe, base, work, data_dir, experiment, step, say, progress)
    for model in experiment.models:
        candidates[arm_name(model, base)] = _plain_model(model, base)
    for ensemble in experiment.ensembles:
        candidates[ensemble.name] = _ensemble(ensemble, candidates, base)
    for i, fusion in enumerate(experiment.fusions, 1):
        step = f"[fusion {i}/{len(experiment.fusions)}]"
        candidates |= _train_fusions(fusion, base, work, data_dir, step, say)

    settings = experiment.lm_eval.model_dump()
    runs = [(name, s) for name in candidates for s in experiment.fewshot_sets]
    result_dirs, todo = [], []
    for name, shot_set in runs:
        arm = candidates[name]
        out = work / "results" / name.replace("/", "__") / f"shotset{shot_set}"
        result_dirs.append(out)
        tasks = arm.tasks or experiment.tasks
        key = _digest(arm.identity, tasks, shot_set, settings, *([data_dir] if data_dir else []))
        done = _is_current(out, key)
        todo.append(None if done else (arm, out, key))
    started, finished = time.monotonic(), 0
    for i, ((name, shot_set), step) in enumerate(zip(runs, todo), 1):
        if step is None:
            say(f"[eval {i}/{len(runs)}] {name}, shot set {shot_set}: up to date")
            continue
        arm, out, key = step
        left = sum(1 for later in todo[i - 1 :] if later is not None)
        say(f"[eval {i}/{len(runs)}] {name}, shot set {shot_set}  ({time_left(started, finished, left)})")
        with (
            atomic_output_dir(out, overwrite=True, markers=[KEY_FILE]) as staging,
            scoped_environment(MEDMERGE_DATA_DIR=data_dir),
        ):
            evaluate(
                arm.pretrained,
                arm.tasks or experiment.tasks,
                shot_set,
                experiment.lm_eval,
                staging,
                verbose=verbose,
                model=arm.model,
                extra_args=arm.model_args,
                label=arm.label,
            )
            (staging / KEY_FILE).write_text(key)
        finished += 1
    say("[report]")
    return build_report(
        result_dirs,
        work / "report",
        title=f"{Path(path).stem}: {', '.join(experiment.tasks)}",
        note=experiment.note or f"Shot sets {experiment.fewshot_sets}; experiment file {Path(path).resolve()}.",
        say=say,
    )


def _build_moe(
    moe: MoEArm,
    base: Path,
    work: Path,
    data_dir: str | None,
    experiment: Experiment,
    step: str,
    say: Say,
    progress: Callable[[str], AbstractContextManager[Progress | None]] | None,
) -> dict[str, Candidate]:
    """Build one MoE arm (and train its routers) unless up to date; returns its candidates (name -> (dir, key))."""
    from medmerge.labelled import labelled_prompts
    from medmerge.router_training import train_router
    from merge.moe.build import PromptRun, build_moe

    config = load_moe_config(base / moe.config)
    names = moe_arm_names(moe)
    out = work / "models" / names[0]
    key = _digest(config.source_text, experiment.merge.model_dump())
    if _is_current(out, key):
        say(f"{step} {names[0]}: up to date")
    else:
        say(f"{step} {names[0]}")
        with progress(f"building {names[0]}") if progress else nullcontext() as update:
            build_moe(
                config,
                out,
                prompt_run=PromptRun(experiment.merge.device),
                seed=experiment.merge.seed,
                shard_bytes=experiment.merge.out_shard_size,
                overwrite=True,
                progress=update,
                warn=say,
            )
        (out / KEY_FILE).write_text(key)
    built = {names[0]: Candidate(str(out), key)}
    if moe.train_router is None:
        return built
    trained = work / "models" / names[1]
    train_key = _digest(key, moe.train_router.model_dump(), experiment.data_dir)
    if _is_current(trained, train_key):
        say(f"{step} {names[1]}: up to date")
    else:
        say(f"{step} {names[1]}: training the routers on {moe.train_router.data}")
        with scoped_environment(MEDMERGE_DATA_DIR=data_dir):
            train = labelled_prompts(_data_source(moe.train_router.data, base), "train_router.data")
            validation = (
                labelled_prompts(_data_source(moe.train_router.validation_data, base), "train_router.validation_data")
                if moe.train_router.validation_data
                else None
            )
        settings = RouterSettings(**moe.train_router.model_dump(exclude={"data", "validation_data"}))
        with progress(f"training {names[1]}") if progress else nullcontext() as update:
            train_router(
                str(out),
                trained,
                train,
                validation,
                settings=settings,
                data_names=(moe.train_router.data, moe.train_router.validation_data),
                overwrite=True,
                progress=update,
                say=say,
            )
        (trained / KEY_FILE).write_text(train_key)
    return built | {names[1]: Candidate(str(trained), train_key)}


def _plain_model(model: str, base: Path) -> Candidate:
    """A model evaluated as it is: a directory (relative to the experiment file) or a hub id; BASE+ADAPTER is the
    base with the PEFT adapter applied by lm-eval (its `peft` argument), no merged copy written."""
    parts = [_located(ref, base) for ref in _refs(model)]
    if len(parts) == 1:
        return Candidate(parts[0], _digest(parts[0]))
    pretrained, adapter = parts
    return Candidate(
        pretrained, _digest(pretrained, adapter), model_args={"peft": adapter}, label=arm_name(model, base)
    )


def _ensemble(ensemble: EnsembleArm, candidates: dict[str, Candidate], base: Path) -> Candidate:
    """`--model medmerge-ensemble` over the members: arms of this experiment by name, else directories (relative
    to the experiment file) or hub ids."""
    members = [candidates.get(member) or _plain_model(member, base) for member in ensemble.members]
    args: dict[str, Any] = {"combine": ensemble.combine}
    if ensemble.weights is not None:
        args["weights"] = "|".join(str(w) for w in ensemble.weights)
    identity = _digest([m.identity for m in members], args)
    pretrained = "|".join(m.pretrained for m in members)
    return Candidate(pretrained, identity, "medmerge-ensemble", args, label=ensemble.name)


def _train_fusions(
    fusion: FusionArm, base: Path, work: Path, data_dir: str | None, step: str, say: Say
) -> dict[str, Candidate]:
    """Train each combiner of a fusion arm unless up to date (the members run once: their outputs are cached in
    work_dir/fusion_cache unless the config names a cache)."""
    from medmerge.fusion.train import train_fusion
    from medmerge_tasks.fusion.features import member_fingerprint

    config = load_fusion_config(base / fusion.config)
    members = [member_fingerprint(m) for m in config.members]
    arms = {}
    for combiner, name in zip(fusion.combiners, fusion_arm_names(fusion)):
        settings = config.model_copy(
            update={"combiner": combiner, "cache_dir": config.cache_dir or str(work / "fusion_cache")}
        )
        out = work / "models" / name
        key = _digest(settings.model_dump(exclude={"cache_dir"}), members, data_dir)
        if _is_current(out, key):
            say(f"{step} {name}: up to date")
        else:
            say(f"{step} {name}: training the {combiner} combiner")
            with scoped_environment(MEDMERGE_DATA_DIR=data_dir):
                train_fusion(settings, out, overwrite=True, say=say)
            (out / KEY_FILE).write_text(key)
        arms[name] = Candidate(str(out), key, "medmerge-fusion", tasks=fusion.tasks)
    return arms


def _data_source(source: str, base: Path) -> str:
    """`medmcqa` and `task:NAME` as they are; a file relative to the experiment file."""
    return source if source.startswith(("medmcqa", TASK_PREFIX)) else str(base / source)


@contextmanager
def scoped_environment(**values: str | None) -> Iterator[None]:
    """Set the given environment variables (None: leave as is) for the block only."""
    saved = {name: os.environ.get(name) for name, value in values.items() if value is not None}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def time_left(started: float, finished: int, left: int) -> str:
    """'1:20 elapsed, about 2:40 left': the evaluations so far set the pace for the `left` still to run."""
    elapsed = time.monotonic() - started
    text = f"{_clock(elapsed)} elapsed"
    return text + (f", about {_clock(elapsed / finished * left)} left" if finished else "")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


@contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' ("Loading weights") and datasets' progress bars on or off for the block."""
    import datasets
    from transformers.utils import logging as transformers_logging

    were = transformers_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were[0]:
            transformers_logging.enable_progress_bar()
        if were[1]:
            datasets.enable_progress_bars()


def lm_eval_model_args(
    pretrained: str, settings: LmEvalSettings, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The model's arguments for lm-eval: the model, its own arguments (an ensemble's weights), its dtype when set,
    then the experiment's own model_args."""
    dtype = {"dtype": settings.dtype} if settings.dtype else {}
    return {"pretrained": pretrained, **(extra or {}), **dtype, **settings.model_args}


def lm_eval_command(
    pretrained: str,
    tasks: list[str],
    shot_set: int,
    settings: LmEvalSettings,
    output_dir: Path,
    data_dir: str | None,
    model: str | None = None,
    extra_args: dict[str, Any] | None = None,
) -> str:
    """The plain `lm_eval` command line that makes the same evaluation as `evaluate` (for reproducing a row by
    hand)."""
    import shlex

    model_args = lm_eval_model_args(pretrained, settings, extra_args)
    words = [
        "lm_eval",
        "--model",
        model or settings.model,
        "--model_args",
        ",".join(f"{k}={v}" for k, v in model_args.items()),
        "--tasks",
        ",".join(tasks),
        "--batch_size",
        str(settings.batch_size),
        "--device",
        settings.device,
        *(["--limit", str(settings.limit)] if settings.limit is not None else []),
        "--metadata",
        json.dumps({"fewshot_set": shot_set}),
        "--output_path",
        str(output_dir),
        "--log_samples",
    ]
    return (f"MEDMERGE_DATA_DIR={shlex.quote(data_dir)} " if data_dir else "") + shlex.join(words)


def evaluate(
    pretrained: str,
    tasks: list[str],
    shot_set: int,
    settings: LmEvalSettings,
    output_dir: Path,
    verbose: bool = False,
    *,
    model: str | None = None,
    extra_args: dict[str, Any] | None = None,
    label: str | None = None,
) -> None:
    """One lm-eval run through its Python API, saved exactly as `lm_eval --output_path DIR --log_samples` saves
    it (lm-eval's own EvaluationTracker: DIR/<model>/results_<date>.json and samples_<task>_<date>.jsonl).
    `model` replaces the experiment's model type (an ensemble's), `label` the name lm-eval's output gives the
    model (where `pretrained` is not one model)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    model_args = lm_eval_model_args(pretrained, settings, extra_args)
    tracker = EvaluationTracker(output_path=str(output_dir))
    with library_progress_bars(verbose):
        output = lm_eval.simple_evaluate(
            model=model or settings.model,
            model_args=model_args,  # a dict: values holding commas or '=' reach the model as written
            tasks=tasks,
            batch_size=settings.batch_size,
            device=settings.device,
            limit=settings.limit,
            log_samples=True,
            evaluation_tracker=tracker,
            metadata={"fewshot_set": shot_set},
        )
    samples = output.pop("samples")
    if label:
        tracker.general_config_tracker.model_name = label
        tracker.general_config_tracker.model_name_sanitized = label
    tracker.save_results_aggregated(results=output, samples=samples)
    for task in output["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    if not list(output_dir.rglob("results_*.json")):  # lm-eval logs a failed save and carries on; we do not
        raise RuntimeError(f"lm-eval did not write its results into {output_dir}")
