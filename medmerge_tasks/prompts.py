"""Render the prompt templates in templates/*.jinja (shared by the task YAMLs; read them to see the prompts)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"


@cache
def _environment() -> jinja2.Environment:
    # No autoescape, no block trimming: the templates control every byte with explicit whitespace control.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,
    )


def render(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(**context)
