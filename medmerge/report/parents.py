"""Which models a merged model was made from: its model card's `base_model` list, else the recipe beside it.

Only merges get parents: a card tagged `merge` (medmerge and mergekit both tag theirs) or a model directory
holding a recipe. A fine-tune's card also names a `base_model`, but that is not a merge to judge.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

RECIPE_FILES = ("medmerge_recipe.yaml", "mergekit_config.yml")
FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)


def _card_file(model: str) -> Path | None:
    local = Path(model)
    if local.is_dir():
        return local / "README.md" if (local / "README.md").is_file() else None
    try:  # a hub model: only what is already in the local cache; a report never downloads
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "README.md")
    except Exception:  # not a valid repo id, no cache: no card
        return None
    return Path(cached) if isinstance(cached, str) else None


def _recipe_models(recipe: dict[str, Any]) -> list[str]:
    refs = [m.get("model") for m in recipe.get("models") or [] if isinstance(m, dict)]
    for piece in recipe.get("slices") or []:
        refs += [s.get("model") for s in (piece or {}).get("sources") or [] if isinstance(s, dict)]
    refs.append(recipe.get("base_model"))
    return [str(r) for r in refs if r]


def find_parents(model: str) -> tuple[list[str], str]:
    """(parent references, where they were read) for a merged model; ([], "") for anything else."""
    card = _card_file(model)
    front: dict[str, Any] = {}
    if card is not None:
        match = FRONT_MATTER.match(card.read_text(encoding="utf-8", errors="replace"))
        try:
            front = (yaml.safe_load(match.group(1)) if match else None) or {}
        except yaml.YAMLError:
            front = {}
        if not isinstance(front, dict):
            front = {}
    tags = front.get("tags") or []
    bases = front.get("base_model") or []
    bases = [bases] if isinstance(bases, str) else [str(b) for b in bases]
    is_merge = "merge" in tags or front.get("base_model_relation") == "merge"
    if is_merge and bases:
        return list(dict.fromkeys(bases)), "model card"
    local = Path(model)
    for name in RECIPE_FILES:
        if (local / name).is_file():
            try:
                recipe = yaml.safe_load((local / name).read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue
            if isinstance(recipe, dict) and _recipe_models(recipe):
                return list(dict.fromkeys(_recipe_models(recipe))), name
    return [], ""


def same_model(ref: str, model: str) -> bool:
    """Whether a parent reference (hub id or path, maybe with @revision) names the evaluated `model`."""
    ref = ref.split("@", 1)[0] if not Path(ref).exists() else ref
    if ref == model or ref.lower() == model.lower():
        return True
    ref_path, model_path = Path(ref), Path(model)
    if ref_path.exists() and model_path.exists():
        return ref_path.resolve() == model_path.resolve()
    if ref_path.exists() != model_path.exists():  # a hub id against a local copy of it: compare the names
        return ref_path.name.lower() == model_path.name.lower()
    return False
