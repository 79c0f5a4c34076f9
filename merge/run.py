"""plan -> read -> method -> write, with progress. The only module that touches all three."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmerge_common.errors import UserError
from medmerge_common.outdir import Say, check_output_dir
from merge.card import write_metadata
from merge.io.checkpoint import Checkpoint, index_weights
from merge.io.hub import input_dirs, open_model, tokenizer_dir
from merge.io.writer import ShardedWriter, model_output
from merge.memory import merge_memory
from merge.methods import MergeCall
from merge.methods.common import BLOCK, MergeError
from merge.plan import MergePlan, TensorJob, build_plan
from merge.recipe import Recipe, load_recipe
from merge.vocabulary import build_vocabulary

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)
# inputs, generator, non-finite counts, and per input its file parameters' tensors (fisher: {...})
Loaded = tuple[list[torch.Tensor], np.random.Generator | None, list[int], list[dict[str, torch.Tensor]]]
TENSOR_FILE = "tensor-file:"  # key prefix of a file parameter's directory among the open checkpoints


@dataclass
class MergeResult:
    out_dir: Path | None
    plan: MergePlan
    seconds: float


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A 63-bit generator seed from (seed, tensor name): random draws do not depend on tensor order or sharding."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def plan_merge(recipe: Recipe, *, weights: bool, warn: Say | None = None) -> tuple[MergePlan, dict[str, Checkpoint]]:
    """Open every model the recipe names (headers only unless `weights`), build the output vocabulary when the
    recipe sets one, and plan the merge."""
    models = {ref: open_model(ref, weights=weights) for ref in recipe.model_refs()}
    vocabulary = None
    if recipe.vocabulary_settings is not None:
        configs = {ref: m.config for ref, m in models.items()}
        vocabulary = build_vocabulary(recipe, configs, {ref: tokenizer_dir(ref) for ref in models}, warn)
    plan = build_plan(recipe, models, vocabulary)
    open_tensor_files(plan, models)
    return plan, models


def file_params(plan: MergePlan) -> list[str]:
    """The method's file parameters (a Fisher per model...): their values name directories of tensors."""
    return [p.name for p in plan.recipe.method.params if p.tensor_file]


def open_tensor_files(plan: MergePlan, models: dict[str, Checkpoint]) -> None:
    """Open every directory a file parameter names (into `models`, under TENSOR_FILE + path) and check, before
    any weight is read, that it holds each input tensor's counterpart with the same shape."""
    names = file_params(plan)
    for job in plan.jobs if names else []:
        if job.copy_only:
            continue
        if job.vocabulary:  # token rows are re-indexed to the output vocabulary; the files' rows are not
            raise UserError(
                f"{plan.recipe.method.name} cannot merge over a changed vocabulary (tokenizer: union / tokens): its "
                f"{names[0]} files hold rows of each model's own vocabulary",
                file=plan.recipe.source_file,
            )
        for source in job.sources:
            for name in names:
                path = source.params.get(name)
                if path is None:
                    continue  # the base: a file parameter is per model
                key = TENSOR_FILE + path
                if key not in models:
                    directory = Path(path)
                    if not directory.is_dir():
                        raise UserError(
                            f"{name}: '{path}' is not a directory (of {source.model})", file=plan.recipe.source_file
                        )
                    try:
                        models[key] = Checkpoint(path, directory, {}, index_weights(path, directory))
                    except UserError:
                        raise UserError(
                            f"{name}: '{path}' holds no tensors (model.safetensors or shards), so it is not a "
                            f"{name} of {source.model}",
                            file=plan.recipe.source_file,
                        ) from None
                info, expected = models[key].tensors.get(source.tensor), models[source.model].tensors[source.tensor]
                if info is None or tuple(info.shape) != tuple(expected.shape):
                    found = "has no tensor" if info is None else f"has shape {tuple(info.shape)} for"
                    raise UserError(
                        f"{name} '{path}' {found} '{source.tensor}' (model '{source.model}': "
                        f"{tuple(expected.shape)}); was it computed for another model?",
                        file=plan.recipe.source_file,
                    )


def method_rng(job: TensorJob, plan: MergePlan, seed: int) -> np.random.Generator | None:
    """A random method's generator for one tensor (None for deterministic methods): a PCG64 stream seeded by
    (seed, tensor name), so draws do not depend on tensor order, sharding, threads or device."""
    if not plan.recipe.method.random or job.copy_only:
        return None
    return np.random.Generator(np.random.PCG64(tensor_seed(seed, job.output.name)))


def check_device(device: str) -> torch.device:
    """The torch device for `--device`, or a UserError saying why it cannot merge there."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device}: not a device name (use cpu, cuda or cuda:N)") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device}: no CUDA device is available here (use --device cpu)")
        if target.index is not None and target.index >= count:
            raise UserError(f"--device {device}: there are {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    elif target.type != "cpu":
        raise UserError(f"--device {device}: medmerge merges on cpu or cuda")
    return target


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many NaN/±Inf entries a floating-point tensor holds (0 for integer tensors). min and max propagate NaN
    and show ±Inf, so one aminmax pass (~0.3 ns an entry) clears a finite tensor; only a bad one is counted."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return 0
    low, high = torch.aminmax(tensor)
    if torch.isfinite(low) and torch.isfinite(high):
        return 0
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(flat[i : i + BLOCK])).sum()) for i in range(0, flat.numel(), BLOCK))


def merge_tensor(
    job: TensorJob,
    inputs: list[torch.Tensor],
    plan: MergePlan,
    rng: np.random.Generator | None,
    file_tensors: list[dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Apply the recipe's method to one job's input tensors (already in the merge dtype, on the device); a file
    parameter's value is its tensor (`file_tensors`, from load_job)."""
    if job.copy_only:
        return inputs[0]
    per_model = [s.params | extra for s, extra in zip(job.sources, file_tensors or [{}] * len(job.sources))]
    call = MergeCall(inputs, job.base_index, job.params, per_model, rng, job.depth, job.output.name)
    try:
        return plan.recipe.method.apply(call).to(job.output.dtype)
    except MergeError as exc:
        raise UserError(f"{plan.recipe.method.name} cannot merge tensor '{job.output.name}': {exc}") from None


def load_job(job: TensorJob, plan: MergePlan, models: dict[str, Checkpoint], device: torch.device, seed: int) -> Loaded:
    """One job's inputs, read from the open models, cast to the merge dtype, re-indexed to the output vocabulary
    where the recipe sets one, on `device`; its generator; how many NaN/Inf entries each input held; and each
    input's file-parameter tensors (float32, on `device`)."""
    tensors = [models[s.model].read(s.tensor) for s in job.sources]
    nonfinite = [count_nonfinite(x) for x in tensors]  # in the stored dtype: a cast must not hide or add any
    merge_dtype = plan.recipe.merge_dtype
    tensors = [x if job.copy_only else x.to(merge_dtype or x.dtype) for x in tensors]
    if job.vocabulary:
        assert plan.vocabulary is not None
        tensors = plan.vocabulary.align([s.model for s in job.sources], tensors, job.base_index)
    files = [
        {
            name: models[TENSOR_FILE + s.params[name]].read(s.tensor, torch.float32).to(device)
            for name in file_params(plan)
            if not job.copy_only and s.params.get(name) is not None
        }
        for s in job.sources
    ]
    return [x.to(device) for x in tensors], method_rng(job, plan, seed), nonfinite, files


def inputs_finite(job: TensorJob, nonfinite: list[int], allow_nonfinite: bool, warn: Say) -> bool:
    """Whether the job's inputs are all finite; raises for the first that is not, unless allowed."""
    for source, count in zip(job.sources, nonfinite):
        if count:
            where = f"model '{source.model}' tensor '{source.tensor}' holds {count} NaN/Inf value(s)"
            if not allow_nonfinite:
                raise UserError(f"{where}; nothing was merged (--allow-nonfinite merges it anyway)")
            warn(f"{where}; merged anyway (--allow-nonfinite)")
    return not any(nonfinite)


def check_merged(name: str, merged: torch.Tensor, inputs_finite: bool) -> None:
    """A merged tensor that turns non-finite from finite inputs stops the merge."""
    bad = count_nonfinite(merged) if inputs_finite else 0
    if bad:
        raise UserError(
            f"merging tensor '{name}' gives {bad} NaN/Inf value(s) from finite inputs (do the recipe's "
            "weights or lambda overflow the merge dtype?); nothing was written"
        )


def run_merge(
    recipe: str | Path | Recipe,
    out_dir: str | Path | None,
    *,
    device: str = "cpu",
    shard_bytes: int = 5 * 10**9,
    seed: int = 0,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
    warn: Say | None = None,
) -> MergeResult:
    """Merge the models of a recipe (its file, or the recipe loaded from it) into `out_dir` (atomically), or only
    validate and plan (`dry_run`; `out_dir` may then be None, and is checked when given).

    Input tensors holding NaN/Inf stop the merge, naming model and tensor (with `allow_nonfinite`: a warning,
    and the merge carries on); a merged tensor that turns non-finite from finite inputs always stops it."""
    start = time.perf_counter()
    warn = warn or (lambda _: None)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    for warning in recipe.warnings:
        warn(str(warning))
    if out_dir is None and not dry_run:
        raise ValueError("run_merge needs out_dir unless dry_run")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_output_dir(out, overwrite, inputs=[d for ref in recipe.model_refs() for d in input_dirs(ref)])
    target = check_device(device)
    plan, models = plan_merge(recipe, weights=not dry_run, warn=warn)
    if dry_run:
        return MergeResult(None, plan, time.perf_counter() - start)
    assert out is not None
    inputs = [d for m in models.values() for d in m.directories]

    def load(job: TensorJob) -> Loaded:
        return load_job(job, plan, models, target, seed)

    def check_inputs(job: TensorJob, nonfinite: list[int]) -> bool:
        return inputs_finite(job, nonfinite, allow_nonfinite, warn)

    try:
        outputs = [j.output for j in plan.jobs]
        metadata = {"medmerge_seed": str(seed)}
        with model_output(
            out, outputs, overwrite=overwrite, inputs=inputs, shard_bytes=shard_bytes, metadata=metadata, say=warn
        ) as (staging, writer):
            _merge_all(plan, load, check_inputs, writer, progress)
            write_metadata(plan, {ref: m.directory for ref, m in models.items()}, staging, recipe.source_text, seed)
    finally:
        for model in models.values():
            model.close()
    return MergeResult(out, plan, time.perf_counter() - start)


def _merge_all(
    plan: MergePlan,
    load: Callable[[TensorJob], Loaded],
    check_inputs: Callable[[TensorJob, list[int]], bool],
    writer: ShardedWriter,
    progress: Progress | None,
) -> None:
    """Every job in plan order. The next job's inputs are read and checked for NaN/Inf, and the previous result
    checked and written, while this one is merged (file I/O and torch ops release the GIL); one tensor in flight
    each way keeps memory flat; freed tensor memory is reused rather than returned to the system (merge/memory.py)."""

    def write(name: str, merged: torch.Tensor, inputs_finite: bool) -> None:
        check_merged(name, merged, inputs_finite)
        writer.write(name, merged)

    with merge_memory(), ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writing:
        pending: Future[Loaded] | None = reader.submit(load, plan.jobs[0]) if plan.jobs else None
        written: Future[None] | None = None
        for index, job in enumerate(plan.jobs):
            assert pending is not None
            inputs, rng, nonfinite, files = pending.result()
            finite = check_inputs(job, nonfinite)
            pending = reader.submit(load, plan.jobs[index + 1]) if index + 1 < len(plan.jobs) else None
            merged = merge_tensor(job, inputs, plan, rng, files)
            del inputs, files
            if written is not None:
                written.result()
            written = writing.submit(write, job.output.name, merged, finite)
            if progress:
                progress(index + 1, len(plan.jobs), job.output.name)
        if written is not None:
            written.result()
