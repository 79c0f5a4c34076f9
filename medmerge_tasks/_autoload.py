"""Make plain `lm_eval` see medmerge's tasks and model types without --include_path or extra flags.

lm-eval 0.4.13 has no plugin entry points for tasks. `medmerge_tasks.pth` (installed into
site-packages with the project) calls :func:`install` at interpreter start; it adds one tiny finder to
`sys.meta_path` that does nothing until `lm_eval.tasks.manager` is imported, and then wraps
`TaskManager.__init__` so every TaskManager also scans medmerge's task directory; likewise, once
`lm_eval.models` is imported, it registers `medmerge-hf`, `medmerge-ensemble` and `medmerge-fusion`. Processes
that never import lm-eval pay one failed name comparison per import. Set MEDMERGE_NO_AUTOLOAD=1 to switch it off
(then pass `--include_path $(python -c 'import medmerge_tasks; print(medmerge_tasks.TASK_DIR)')`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any

TARGETS = ("lm_eval.tasks.manager", "lm_eval.models")


class _LmEvalHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original = loader.exec_module  # type: ignore[union-attr]

        def exec_module(module: ModuleType) -> None:
            original(module)
            after_import(name, module)

        loader.exec_module = exec_module  # type: ignore[method-assign, union-attr]
        return spec


def after_import(name: str, module: ModuleType) -> None:
    if name == "lm_eval.tasks.manager":
        register_tasks(module)
    elif name == "lm_eval.models":
        register_models()


def register_models() -> None:
    """Register our model types lazily, *after* lm_eval.models has filled the registry: lm-eval imports its
    built-in models only while the registry is empty, so registering earlier would hide `hf`."""
    from lm_eval.api.registry import model_registry

    from medmerge_tasks.models import MODELS

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


def register_tasks(manager_module: ModuleType) -> None:
    """Wrap TaskManager.__init__ so our task directory is always on its include path."""
    from medmerge_tasks import TASK_DIR

    task_manager = manager_module.TaskManager
    if getattr(task_manager.__init__, "_medmerge", False):
        return
    original = task_manager.__init__

    def __init__(self: Any, *args: Any, include_path: Any = None, **kwargs: Any) -> None:
        paths = (
            []
            if include_path is None
            else list(include_path)
            if isinstance(include_path, (list, tuple))
            else [include_path]
        )
        if not any(str(p) == str(TASK_DIR) for p in paths):
            paths.insert(0, str(TASK_DIR))  # first, so a user's include_path can still override our tasks
        original(self, *args, include_path=paths, **kwargs)

    __init__._medmerge = True  # type: ignore[attr-defined]
    task_manager.__init__ = __init__


def install() -> None:
    if os.environ.get("MEDMERGE_NO_AUTOLOAD") or any(isinstance(f, _LmEvalHook) for f in sys.meta_path):
        return
    for name in TARGETS:
        if name in sys.modules:
            after_import(name, sys.modules[name])
    sys.meta_path.insert(0, _LmEvalHook())
