"""Merging into a loaded model's tensors instead of a directory: what a parameter search evaluates, trial after
trial, without writing a checkpoint or loading one.

Every recipe merged here must plan the same output tensors (a search changes parameter values, never the
model's shape). A tensor is recomputed only when what determines it changed: the method, the dtypes, its inputs,
its resolved parameters. Each merged tensor goes through the same `load_job` / `merge_tensor` as
`medmerge merge`, then is cast into the target tensor as `from_pretrained` casts a stored one, so a model
merged in place holds the same bits as the same recipe merged to disk and loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from merge.io.hub import open_model
from merge.plan import MergePlan, TensorJob, build_plan
from merge.recipe import Recipe
from merge.run import (
    check_device,
    check_merged,
    file_params,
    inputs_finite,
    load_job,
    merge_tensor,
    method_rng,
    open_tensor_files,
    plan_merge,
)

Say = Callable[[str], None]


class InPlaceMerge:
    """Merges recipes over the same models into `target` (name -> tensor, e.g. a model's
    `state_dict(keep_vars=True)`), keeping the models open between merges."""

    def __init__(
        self,
        recipe: Recipe,
        target: dict[str, torch.Tensor],
        *,
        device: str = "cpu",
        seed: int = 0,
        cache_inputs: bool = False,
        warn: Say | None = None,
    ) -> None:
        self.warn = warn or (lambda _: None)
        self.device = check_device(device)
        self.seed = seed
        plan, self.models = plan_merge(recipe, weights=True, warn=self.warn)
        self.vocabulary = plan.vocabulary  # the tokenizer settings are never searched: built once
        self.outputs = [job.output.name for job in plan.jobs]
        for job in plan.jobs:
            tensor = target.get(job.output.name)
            if tensor is None:
                raise ValueError(f"the loaded model has no tensor '{job.output.name}'")
            if tuple(tensor.shape) != tuple(job.output.shape):
                raise ValueError(
                    f"tensor '{job.output.name}': the loaded model's is {tuple(tensor.shape)}, the merge's "
                    f"{tuple(job.output.shape)}"
                )
        self.target = target
        self.done: dict[str, tuple[Any, ...]] = {}  # output name -> what determined the tensor it holds
        # cache_inputs: every input tensor kept after its first read, in the merge dtype on the merge device (the
        # models' size again in memory), so a trial is the arithmetic alone
        self.inputs: dict[tuple[Any, ...], tuple[list[torch.Tensor], bool, list[dict]]] | None = (
            {} if cache_inputs else None
        )

    def assume(self, recipe: Recipe) -> None:
        """Record that the target already holds `recipe`'s merge (it was loaded from that merge on disk)."""
        plan = self._plan(recipe)
        self.done = {job.output.name: _determined_by(plan, job) for job in plan.jobs}

    def merge(self, recipe: Recipe) -> int:
        """Merge `recipe` into the target; returns how many tensors were recomputed."""
        plan = self._plan(recipe)
        recomputed = 0
        for job in plan.jobs:
            key = _determined_by(plan, job)
            if self.done.get(job.output.name) == key:
                continue
            self.done.pop(job.output.name, None)  # a failure below leaves this tensor unknown, not stale
            inputs, finite, files = self._inputs(job, plan)
            merged = merge_tensor(job, inputs, plan, method_rng(job, plan, self.seed), files)
            check_merged(job.output.name, merged, finite)
            target = self.target[job.output.name]
            with torch.no_grad():
                target.copy_(merged.to(target.device))
            self.done[job.output.name] = key
            recomputed += 1
        return recomputed

    def _inputs(self, job: TensorJob, plan: MergePlan) -> tuple[list[torch.Tensor], bool, list[dict]]:
        # what the loaded inputs depend on (not the parameters): tensors read, their order, dtype, vocabulary,
        # and the directories file parameters name
        files = tuple(tuple(sorted((k, v) for k, v in s.params.items() if k in file_params(plan))) for s in job.sources)
        key = (tuple((s.model, s.tensor) for s in job.sources), job.base_index, plan.recipe.dtype, files)
        if self.inputs is not None and key in self.inputs:
            return self.inputs[key]
        inputs, _, nonfinite, tensors = load_job(job, plan, self.models, self.device, self.seed)
        loaded = inputs, inputs_finite(job, nonfinite, False, self.warn), tensors
        if self.inputs is not None:
            self.inputs[key] = loaded
        return loaded

    def _plan(self, recipe: Recipe) -> MergePlan:
        for ref in recipe.model_refs():
            if ref not in self.models:
                self.models[ref] = open_model(ref, weights=True)
        plan = build_plan(recipe, self.models, self.vocabulary)
        open_tensor_files(plan, self.models)
        outputs = [job.output.name for job in plan.jobs]
        if outputs != self.outputs:
            raise ValueError("a recipe merged in place must plan the same output tensors as the first one")
        return plan

    def close(self) -> None:
        for model in self.models.values():
            model.close()


def _determined_by(plan: MergePlan, job: TensorJob) -> tuple[Any, ...]:
    recipe = plan.recipe
    return (recipe.merge_method, recipe.dtype, recipe.out_dtype, job.sources, job.base_index, job.params, job.t)
