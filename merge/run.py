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

from merge.card import write_metadata
from merge.errors import RecipeError
from merge.io.checkpoint import Checkpoint
from merge.io.hub import open_model
from merge.io.writer import ShardedWriter, atomic_output_dir, check_output_dir
from merge.methods import MergeCall
from merge.methods.task_arithmetic import bernoulli_masks
from merge.plan import MergePlan, TensorJob, build_plan
from merge.recipe import Recipe, load_recipe

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


@dataclass
class MergeResult:
    out_dir: Path | None
    plan: MergePlan
    seconds: float


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A 63-bit generator seed from (seed, tensor name): masks do not depend on tensor order or sharding."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def plan_merge(recipe: Recipe, *, weights: bool) -> tuple[MergePlan, dict[str, Checkpoint]]:
    """Open every model the recipe names (headers only unless `weights`) and plan the merge."""
    models = {ref: open_model(ref, weights=weights) for ref in recipe.model_refs()}
    return build_plan(recipe, models), models


def keep_masks(job: TensorJob, plan: MergePlan, seed: int) -> list[torch.Tensor | None] | None:
    """DARE's masks for one tensor (None for deterministic methods), from a PCG64 stream seeded by
    (seed, tensor name): independent of tensor order, sharding, threads and device."""
    if not plan.recipe.method.random or job.copy_only:
        return None
    rng = np.random.Generator(np.random.PCG64(tensor_seed(seed, job.output.name)))
    densities = [s.params["density"] for i, s in enumerate(job.sources) if i != job.base_index]
    return bernoulli_masks(rng, job.output.numel, densities)


def merge_tensor(job: TensorJob, inputs: list[torch.Tensor], plan: MergePlan, masks: list | None) -> torch.Tensor:
    """Apply the recipe's method to one job's input tensors (already in the merge dtype, on the device)."""
    if job.copy_only:
        return inputs[0]
    call = MergeCall(inputs, job.base_index, job.params, [s.params for s in job.sources], masks)
    return plan.recipe.method.apply(call).to(job.output.dtype)


def run_merge(
    recipe_path: str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    shard_bytes: int = 5 * 10**9,
    seed: int = 0,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge the models of a recipe into `out_dir` (atomically), or only validate and plan (`dry_run`)."""
    start = time.perf_counter()
    recipe = load_recipe(recipe_path)
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    plan, models = plan_merge(recipe, weights=not dry_run)
    if dry_run:
        return MergeResult(None, plan, time.perf_counter() - start)

    merge_dtype = recipe.merge_dtype
    target = torch.device(device)

    def load(job: TensorJob) -> tuple[list[torch.Tensor], list | None]:
        inputs = [models[s.model].read(s.tensor, None if job.copy_only else merge_dtype) for s in job.sources]
        return [x.to(target) for x in inputs], keep_masks(job, plan, seed)

    try:
        with atomic_output_dir(out, overwrite) as staging:
            writer = ShardedWriter(staging, [j.output for j in plan.jobs], shard_bytes, {"medmerge_seed": str(seed)})
            try:
                _merge_all(plan, load, writer, progress)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            recipe_text = Path(recipe_path).read_text(encoding="utf-8")
            write_metadata(plan, {ref: m.directory for ref, m in models.items()}, staging, recipe_text, seed)
    finally:
        for model in models.values():
            model.close()
    return MergeResult(out, plan, time.perf_counter() - start)


def _merge_all(
    plan: MergePlan,
    load: Callable[[TensorJob], tuple[list[torch.Tensor], list | None]],
    writer: ShardedWriter,
    progress: Progress | None,
) -> None:
    """Every job in plan order. The next job's inputs are read (and its DARE masks drawn) and the previous
    result written while this one is merged (file I/O, numpy's generator and torch ops release the GIL);
    one tensor in flight each way keeps memory flat."""
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writing:
        pending: Future[tuple[list[torch.Tensor], list | None]] | None = (
            reader.submit(load, plan.jobs[0]) if plan.jobs else None
        )
        written: Future[None] | None = None
        for index, job in enumerate(plan.jobs):
            assert pending is not None
            inputs, masks = pending.result()
            pending = reader.submit(load, plan.jobs[index + 1]) if index + 1 < len(plan.jobs) else None
            merged = merge_tensor(job, inputs, plan, masks)
            del inputs
            if written is not None:
                written.result()
            written = writing.submit(writer.write, job.output.name, merged)
            if progress:
                progress(index + 1, len(plan.jobs), job.output.name)
        if written is not None:
            written.result()
