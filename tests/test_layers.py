"""The packages depend on each other only as the README's layout says, and importing them changes nothing.

    medmerge_common   standard library only; imported by all
    merge             the engine: knows nothing of lm-eval, the plugin or the application
    medmerge_tasks    the lm-eval plugin: knows nothing of merging or the application
    medmerge          the application over both

Each check runs in a fresh interpreter, so what one import pulls in is all that is seen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS_UTILS = ROOT / "medmerge_tasks" / "tasks" / "utils.py"


def _loaded_after(code: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> set[str]:
    """Top-level names of the project's packages (and lm_eval, torch, huggingface_hub) imported by `code` in a
    fresh interpreter, less the start-up hook (medmerge_tasks.pth imports `medmerge_tasks._autoload` in every
    interpreter, by design)."""
    probe = (
        f"{code}\nimport json, sys\n"
        "hook = {'medmerge_tasks', 'medmerge_tasks._autoload'}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules if m not in hook} & "
        "{'merge', 'medmerge', 'medmerge_tasks', 'medmerge_common', 'lm_eval', 'torch', 'huggingface_hub'})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_neutral_module_imports_nothing_of_the_project_or_third_parties() -> None:
    code = "import medmerge_common.errors, medmerge_common.outdir, medmerge_common.hub"
    assert _loaded_after(code) == {"medmerge_common"}


def test_the_engine_knows_nothing_of_lm_eval_or_the_plugin() -> None:
    code = "import merge.run, merge.recipe, merge.plan, merge.card, merge.io.hub, merge.methods"
    assert _loaded_after(code) & {"lm_eval", "medmerge_tasks", "medmerge"} == set()


def test_the_plugin_knows_nothing_of_the_engine_or_the_application() -> None:
    code = (
        "import importlib.util, medmerge_tasks.sources, medmerge_tasks.prompts, medmerge_tasks.models.quantized, "
        "medmerge_tasks.models.ensemble, medmerge_tasks.models.fusion, medmerge_tasks.fusion.saved\n"
        f"spec = importlib.util.spec_from_file_location('utils', {str(TASKS_UTILS)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))"
    )
    loaded = _loaded_after(code)
    assert "lm_eval" in loaded  # the probe did load the task code
    assert loaded & {"merge", "medmerge"} == set()


def test_a_users_own_merge_module_does_not_break_the_plugin(tmp_path: Path) -> None:
    """`lm_eval` run in a directory holding the user's own merge.py: the plugin must never import `merge`."""
    (tmp_path / "merge.py").write_text("raise SystemExit('the user merge.py was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "MEDMERGE_DATA_DIR"} | {"HF_HUB_OFFLINE": "1"}
    code = (
        "from medmerge_tasks import sources\n"
        "try:\n    sources.dataset_dir('BioMistral/BioInstructQA')\n"
        "except sources.DatasetMissing as exc:\n    print('missing:', exc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "user merge.py" not in done.stdout + done.stderr


@pytest.mark.parametrize("module", ["medmerge.report.plots", "medmerge.experiment", "medmerge.demo"])
def test_importing_the_application_leaves_matplotlibs_backend_alone(module: str) -> None:
    """A notebook that imports the report or the runner keeps its own matplotlib backend."""
    env = {**os.environ, "MPLBACKEND": "svg"}
    code = f"import {module}, matplotlib\nassert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_hub_probe_is_remembered_for_a_minute_not_for_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook that lives for hours must see the network come back."""
    import socket

    from huggingface_hub import constants

    from medmerge_common import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_last_probe", None)
    now, attempts = [1000.0], []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub.time, "monotonic", lambda: now[0])
    assert not hub.hub_reachable() and not hub.hub_reachable()
    assert len(attempts) == 1  # asked twice within the minute: probed once
    now[0] += hub.PROBE_TTL_S + 1
    assert not hub.hub_reachable() and len(attempts) == 2
