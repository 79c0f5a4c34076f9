"""TALL masks as compression (Wang et al., ICML 2024, arXiv:2405.07813): keep one merged model plus one bit per
weight and task, and restore each task's model from them.

    medmerge tall masks MERGED --base BASE --model NAME=MODEL ... -o MASKS_DIR     m_t = 1{|τ_t| ≥ λ_t|τ_MTL − τ_t|}
    medmerge tall restore MERGED MASKS_DIR --task NAME -o OUT_DIR                 θ_t = θ_base + m_t ⊙ τ_MTL

with τ_t = θ_t − θ_base and τ_MTL = θ_merged − θ_base. MASKS_DIR holds `<task>/model.safetensors` (each mask's bits
packed eight to a byte, per tensor) and `tall_masks.json` (base, lambdas, each mask's share of kept entries, and a
fingerprint of the merged model's weights, which `restore` checks). Tensors are read one at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmerge_common.errors import UserError
from medmerge_common.outdir import atomic_output_dir
from merge.io.checkpoint import Checkpoint, OutputTensor, index_weights
from merge.io.hub import input_dirs, open_model
from merge.io.writer import ShardedWriter, model_output
from merge.methods.task_vectors import tall_mask

RECORD = "tall_masks.json"
TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")
Say = Callable[[str], None]


def _tensor_bytes(name: str, tensor: torch.Tensor) -> bytes:
    return (
        f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode()
        + tensor.contiguous().view(torch.uint8).numpy().tobytes()
    )


def fingerprint(model: Checkpoint) -> str:
    """A model's identity for its masks: sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(model.tensors):
        digest.update(_tensor_bytes(name, model.read(name)))
    return digest.hexdigest()


def _mergeable(merged: Checkpoint, other: Checkpoint) -> list[str]:
    """The merged model's float tensors (in name order), each of which `other` must have with the same shape."""
    names = []
    for name in sorted(merged.tensors):
        info = merged.tensors[name]
        if not info.dtype.is_floating_point:
            continue
        found = other.tensors.get(name)
        if found is None or tuple(found.shape) != tuple(info.shape):
            what = "missing" if found is None else f"of shape {tuple(found.shape)}"
            raise UserError(f"model '{other.ref}': tensor '{name}' is {what}; the merged one is {tuple(info.shape)}")
        names.append(name)
    return names


def write_masks(
    merged_ref: str,
    base_ref: str,
    models: dict[str, str],
    lambdas: dict[str, float],
    out: Path,
    *,
    overwrite: bool = False,
    say: Say = print,
) -> dict[str, Any]:
    """Every task's TALL mask against the merged model into `out` (whole or not at all), streamed tensor by
    tensor; returns the record."""
    if not models:
        raise UserError("give at least one --model NAME=MODEL (a task's fine-tuned model)")
    for task in models:
        if not TASK_NAME.fullmatch(task):
            raise UserError(f"task name '{task}': use letters, digits, '.', '_' and '-' (it names a directory)")
    merged, base = open_model(merged_ref), open_model(base_ref)
    tasks = {task: open_model(ref) for task, ref in models.items()}
    try:
        names = _mergeable(merged, base)
        for model in tasks.values():
            _mergeable(merged, model)  # the same tensors and shapes as the merged model
        packed = [OutputTensor(n, torch.uint8, ((math.prod(merged.tensors[n].shape) + 7) // 8,)) for n in names]
        kept, total, digest = dict.fromkeys(tasks, 0), 0, hashlib.sha256()
        with atomic_output_dir(out, overwrite, inputs=input_dirs(merged_ref), say=say) as staging:
            writers = {}
            for task in tasks:
                (staging / task).mkdir()
                writers[task] = ShardedWriter(staging / task, packed, 0, {"medmerge_tall_task": task})
            try:
                for name in sorted(merged.tensors):
                    raw = merged.read(name)
                    digest.update(_tensor_bytes(name, raw))
                    if name not in names:
                        continue
                    theta_base = base.read(name, torch.float32)
                    multi_task = raw.to(torch.float32) - theta_base
                    for task, model in tasks.items():
                        mask = tall_mask(model.read(name, torch.float32) - theta_base, multi_task, lambdas[task])
                        kept[task] += int(mask.sum())
                        writers[task].write(name, torch.from_numpy(np.packbits(mask.reshape(-1).numpy())))
                    total += multi_task.numel()
                for writer in writers.values():
                    writer.close()
            finally:
                for writer in writers.values():
                    writer.abort()
            record = {
                "method": "TALL masks (Wang et al., ICML 2024, arXiv:2405.07813): m_t = 1{|τ_t| ≥ λ_t·|τ_MTL − τ_t|}",
                "merged": merged_ref,
                "merged_fingerprint": digest.hexdigest(),
                "base": base_ref,
                "tasks": {
                    task: {"model": models[task], "lambda": lambdas[task], "kept": kept[task] / max(total, 1)}
                    for task in tasks
                },
                "shapes": {name: list(merged.tensors[name].shape) for name in names},
            }
            (staging / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    finally:
        for model in (merged, base, *tasks.values()):
            model.close()
    for task, entry in record["tasks"].items():
        say(f"{task}: keeps {entry['kept']:.1%} of the merged task vector (λ = {entry['lambda']:g})")
    return record


def read_record(masks: Path) -> dict[str, Any]:
    path = masks / RECORD
    if not path.is_file():
        raise UserError(f"no {RECORD}: not a directory written by `medmerge tall masks`", file=masks)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"not JSON ({exc.msg})", file=path, line=exc.lineno) from None
    if not isinstance(record, dict) or not {"merged_fingerprint", "base", "tasks", "shapes"} <= set(record):
        raise UserError("not a TALL mask record (merged_fingerprint, base, tasks, shapes)", file=path)
    return record


def restore(
    merged_ref: str,
    masks: Path,
    task: str,
    out: Path,
    *,
    base_ref: str | None = None,
    overwrite: bool = False,
    say: Say = print,
) -> Path:
    """θ_task = θ_base + m_task ⊙ (θ_merged − θ_base) for every tensor, written as a model directory beside the
    merged model's config and tokenizer."""
    record = read_record(masks)
    if task not in record["tasks"]:
        raise UserError(f"no task '{task}' in {masks / RECORD} (tasks: {', '.join(record['tasks'])})")
    bits = _mask_file(masks, task)
    merged, base = open_model(merged_ref), open_model(base_ref or record["base"])
    try:
        if fingerprint(merged) != record["merged_fingerprint"]:
            raise UserError(
                f"'{merged_ref}' is not the merged model these masks were made from (its weights differ)", file=masks
            )
        names = _mergeable(merged, base)
        if sorted(names) != sorted(record["shapes"]):
            raise UserError("the masks cover other tensors than the merged model's", file=masks / RECORD)
        outputs = [OutputTensor(name, info.dtype, info.shape) for name, info in merged.tensors.items()]
        inputs = input_dirs(merged_ref) + [masks]
        metadata = {"medmerge_tall_task": task}
        with model_output(
            out, outputs, overwrite=overwrite, inputs=inputs, shard_bytes=5 * 10**9, metadata=metadata, say=say
        ) as (staging, writer):
            for item in outputs:
                if item.name not in record["shapes"]:  # integer buffers: as merged
                    writer.write(item.name, merged.read(item.name))
                    continue
                theta_base = base.read(item.name, torch.float32)
                mask = _unpack(bits, item.name, tuple(item.shape))
                restored = theta_base + mask * (merged.read(item.name, torch.float32) - theta_base)
                writer.write(item.name, restored.to(item.dtype))
            _copy_files(merged, staging)
            (staging / "README.md").write_text(_card(merged_ref, masks, task, record))
    finally:
        for model in (merged, base, bits):
            model.close()
    say(f"restored task '{task}' into {out}")
    return out


def _mask_file(masks: Path, task: str) -> Checkpoint:
    directory = masks / task
    if not directory.is_dir():
        raise UserError("missing: the masks directory is incomplete", file=directory)
    return Checkpoint(f"TALL mask {task}", directory, {}, index_weights(task, directory))


def _unpack(bits: Checkpoint, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    info = bits.tensors.get(name)
    if info is None or math.prod(info.shape) != (n + 7) // 8:
        raise UserError(f"the mask of tensor '{name}' is missing or of the wrong size", file=bits.directory)
    packed = bits.read(name).numpy()
    return torch.from_numpy(np.unpackbits(packed, count=n).astype(np.float32)).reshape(shape)


def _copy_files(merged: Checkpoint, staging: Path) -> None:
    """The merged model's config, tokenizer and other small files, byte for byte (not its weights or card)."""
    if merged.directory is None:
        return
    for path in sorted(merged.directory.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != "README.md":
            (staging / path.name).write_bytes(path.read_bytes())


def _card(merged_ref: str, masks: Path, task: str, record: dict[str, Any]) -> str:
    entry = record["tasks"][task]
    return (
        f"---\nbase_model:\n- {record['base']}\n- {merged_ref}\ntags: [merge, medmerge, tall-masks]\n---\n"
        f"# {task}, restored from a merged model\n\n"
        f"θ = θ_base + m ⊙ (θ_merged − θ_base) with the TALL mask of `{task}` (Wang et al., ICML 2024, "
        f"https://arxiv.org/abs/2405.07813; λ = {entry['lambda']:g}, {entry['kept']:.1%} of the entries kept) from "
        f"`{masks}`; merged model `{merged_ref}`, base `{record['base']}`; the task's own model was "
        f"`{entry['model']}`.\n"
    )
