"""Shared fixtures: tiny real models (built once per session) and helpers to write recipes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Mistral-shaped models: `base`, two perturbed fine-tunes `ft1`/`ft2`, an unrelated `other`
    (same shapes, different init), `base_sharded` (same weights in 4 shards), `base_bin` (pytorch_model.bin),
    `llama_tied` (Llama with tied embeddings), `llama_tied_ft`, `wide` (other hidden size) and the tokenizer."""
    from medmerge.tiny import build_model, build_tokenizer, perturbed_copy

    root = tmp_path_factory.mktemp("tiny")
    build_tokenizer(root / "tokenizer")
    dirs = {
        name: root / name
        for name in ("base", "ft1", "ft2", "other", "base_sharded", "base_bin", "llama_tied", "llama_tied_ft", "wide")
    }
    base = build_model(dirs["base"], root / "tokenizer", seed=0)
    perturbed_copy(dirs["base"], dirs["ft1"], 0.1, seed=1)
    perturbed_copy(dirs["base"], dirs["ft2"], 0.1, seed=2)
    build_model(dirs["other"], root / "tokenizer", seed=7)
    build_model(dirs["base_sharded"], root / "tokenizer", seed=0, max_shard_size="60KB")
    build_model(dirs["llama_tied"], root / "tokenizer", arch="llama", tie_embeddings=True, seed=3)
    perturbed_copy(dirs["llama_tied"], dirs["llama_tied_ft"], 0.1, seed=4)
    build_model(dirs["wide"], root / "tokenizer", hidden=96, intermediate=128, seed=5)
    dirs["base_bin"].mkdir()
    torch.save({k: v.clone() for k, v in base.state_dict().items()}, dirs["base_bin"] / "pytorch_model.bin")
    for f in dirs["base"].iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dirs["base_bin"] / f.name)
    dirs["tokenizer"] = root / "tokenizer"
    return dirs


@pytest.fixture
def write_recipe(tmp_path: Path):
    """write_recipe(dict or text, name='recipe.yaml') -> path of a recipe file in tmp_path."""

    def write(recipe: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def value_paths(value: object, path: tuple = ()) -> Iterator[tuple]:
    """Every path into nested dicts and lists, the root's () first: where a fuzzer may put an odd value."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from value_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from value_paths(item, (*path, index))


def our_tasks(**kwargs: Any) -> Any:
    """A TaskManager of medmerge's tasks only (the autoload hook adds them), for tests that run our tasks:
    indexing all of lm-eval's own task files costs ~15 s per TaskManager on a 2-core VM. The discovery tests
    (`lm_eval ls`, the CLI run) keep lm-eval's default manager."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, **kwargs)
