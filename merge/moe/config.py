"""The MoE config (mergekit-moe's YAML format, read as it is) and its checks, with file/line/field in every error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medmerge_common.errors import Problem, UserError
from merge.recipe import DTYPES, model_ref_problem
from merge.yamlfile import Path_, field_name, line_of, parse_yaml, read_text, validate_model

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
RANDOM_GATE_MODES = ("random", "uniform_random")


class Expert(BaseModel):
    """One expert: the model whose MLPs become expert `i` of every layer, and the prompts its gate row is made of."""

    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None  # std of Gaussian noise added to the expert's MLP weights
    residual_scale: float | None = Field(default=None)  # multiplies the expert's down projection

    def prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoEConfig(BaseModel):
    """`medmerge moe` / `mergekit-moe` config; the README's "Mixtures of experts" section lists every field."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    name: str | None = None

    source_file: Path | None = Field(default=None, exclude=True)
    source_text: str = Field(default="", exclude=True, repr=False)
    lines: dict[Path_, int] = Field(default_factory=dict, exclude=True, repr=False)

    def where(self, *path: str | int) -> dict[str, Any]:
        """file/line/field keyword arguments for an error about `path`."""
        return {"file": self.source_file, "line": line_of(self.lines, path), "field": field_name(path)}

    @property
    def gated(self) -> list[Expert]:
        """The experts that get a gate row: the routed ones, then shared ones that have prompts (or random gates)."""
        shared = self.shared_experts or []
        if self.gate_mode in RANDOM_GATE_MODES or any(e.positive_prompts for e in shared):
            return self.experts + shared
        return list(self.experts)

    def model_refs(self) -> list[str]:
        """Every model named, base first, without duplicates."""
        experts = self.experts + (self.shared_experts or [])
        return list(dict.fromkeys([self.base_model] + [e.source_model for e in experts]))


def load_moe_config(path: str | Path, *, allow_all_same: bool = False) -> MoEConfig:
    """Read and check a MoE config file; raises UserError listing every problem (file, line, field)."""
    text = read_text(path)
    data, lines = parse_yaml(text, path)
    config = validate_model(MoEConfig, data, path, lines)
    assert isinstance(config, MoEConfig)
    config.source_file, config.source_text, config.lines = Path(path), text, lines
    problems = check_moe_config(config, allow_all_same=allow_all_same)
    if problems:
        raise UserError(problems=problems)
    return config


def check_moe_config(c: MoEConfig, *, allow_all_same: bool = False) -> list[Problem]:
    """What can be checked without opening a model (mergekit-moe's checks, and the ones it leaves to a crash)."""
    out: list[Problem] = []

    def problem(message: str, *path: str | int) -> None:
        out.append(Problem(message, **c.where(*path)))

    for ref, path in [(c.base_model, ("base_model",))] + [
        (e.source_model, (group, i, "source_model"))
        for group, experts in (("experts", c.experts), ("shared_experts", c.shared_experts or []))
        for i, e in enumerate(experts)
    ]:
        bad = model_ref_problem(ref)
        if bad:
            problem(bad, *path)
    if c.dtype is not None and c.dtype not in DTYPES:
        problem(f"unknown dtype '{c.dtype}'; use bfloat16, float16 or float32", "dtype")
    if c.experts_per_token < 1:
        problem("must be at least 1", "experts_per_token")
    elif c.experts_per_token > len(c.experts):
        problem(f"{c.experts_per_token} experts per token, but only {len(c.experts)} experts", "experts_per_token")
    for group, experts in (("experts", c.experts), ("shared_experts", c.shared_experts or [])):
        for i, e in enumerate(experts):
            for key, value in (("noise_scale", e.noise_scale), ("residual_scale", e.residual_scale)):
                if value is not None and not math.isfinite(value):
                    problem(f"must be a finite number, got {value}", group, i, key)
            if e.noise_scale is not None and e.noise_scale < 0:
                problem("must be at least 0", group, i, "noise_scale")
            if c.gate_mode not in RANDOM_GATE_MODES and group == "experts" and not e.positive_prompts:
                problem(
                    f"gate_mode {c.gate_mode} builds each gate row from prompts: give this expert positive_prompts",
                    group,
                    i,
                )
    shared = c.shared_experts or []
    if shared and any(bool(e.positive_prompts) != bool(shared[0].positive_prompts) for e in shared):
        problem("give prompts to every shared expert or to none", "shared_experts")
    if c.gate_mode not in RANDOM_GATE_MODES and len(c.experts) > 1 and len({e.prompts() for e in c.experts}) == 1:
        problem(
            "every expert has the same prompts, so every gate row would be the same and routing would be "
            "arbitrary: give each expert prompts that reflect what should be routed to it",
            "experts",
        )
    if not allow_all_same and len(c.experts) > 1 and len({e.source_model for e in c.experts}) == 1:
        problem(
            "every expert is the same model: the MoE would cost more and answer exactly as that model does "
            "(--allow-all-same builds it anyway, e.g. to train it afterwards)",
            "experts",
        )
    return out
