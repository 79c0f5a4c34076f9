"""The MoE architectures medmerge writes: which inputs each accepts, its config, and its tensor names.

Tensors are written in the layout of the published checkpoints (Mixtral's `block_sparse_moe.experts.N.w1`,
Qwen's `mlp.experts.N.gate_proj`), which transformers 4 and 5, vLLM and llama.cpp all read; transformers 5 fuses
the experts into one tensor per layer when it loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from medmerge_common.errors import UserError
from merge.moe.config import RANDOM_GATE_MODES, MoEConfig

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # a dense model's MLP, `model.layers.N.mlp.<name>.weight`


@dataclass(frozen=True)
class Layout:
    name: str  # as mergekit-moe's `architecture:` matches it (a prefix, any case)
    config_class: str  # transformers config class
    architecture: str
    input_types: tuple[str, ...]  # model_type every input must have
    shared_expert: bool  # exactly one shared expert (else none)
    block: str  # the MoE block's module under model.layers.N
    expert_params: tuple[str, str, str]  # names of gate_proj, up_proj, down_proj inside an expert

    def gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert_name(self, layer: int, expert: int, projection: str) -> str:
        param = self.expert_params[PROJECTIONS.index(projection)]
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{param}.weight"

    def shared_name(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert.{projection}.weight"

    def shared_gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert_gate.weight"

    def why_not(self, config: MoEConfig, model_types: list[str]) -> str | None:
        """Why this layout cannot hold the config's models (None when it can)."""
        shared = config.shared_experts or []
        if self.shared_expert and len(shared) != 1:
            return f"{self.name} needs exactly one shared expert"
        if not self.shared_expert and shared:
            return f"{self.name} has no shared experts"
        if self.shared_expert and config.gate_mode not in RANDOM_GATE_MODES and not shared[0].positive_prompts:
            return f"{self.name} gates its shared expert: give it positive_prompts"
        if len(set(model_types)) != 1:
            return f"{self.name} needs every model to be of one architecture, got {', '.join(sorted(set(model_types)))}"
        if model_types[0] not in self.input_types:
            return f"{self.name} is built from {' or '.join(self.input_types)} models, not {model_types[0]}"
        return None

    def output_config(self, base: dict[str, Any], config: MoEConfig, dtype: torch.dtype | None) -> Any:
        """The MoE's transformers config: the base's, with the expert counts and MoE settings."""
        import transformers

        settings: dict[str, Any] = {
            "architectures": [self.architecture],
            "num_experts_per_tok": config.experts_per_token,
        }
        intermediate = base.get("intermediate_size")
        if self.name == "Mixtral":
            settings |= {"num_local_experts": len(config.experts), "sliding_window": None}
        else:
            settings |= {
                "num_experts": len(config.experts),
                "decoder_sparse_step": 1,
                "norm_topk_prob": True,
                "moe_intermediate_size": intermediate,
            }
        if self.name == "Qwen MoE":
            settings |= {
                "shared_expert_intermediate_size": intermediate,
                "sliding_window": None,
                "use_sliding_window": False,
            }
        fields = {k: v for k, v in base.items() if k not in ("model_type", "transformers_version")}
        out = getattr(transformers, self.config_class)(**(fields | settings))
        if dtype is not None:
            setattr(out, "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype", dtype)
        return out


LAYOUTS = (
    Layout(
        "Mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        ("llama", "mistral"),
        False,
        "block_sparse_moe",
        ("w1", "w3", "w2"),
    ),
    Layout(
        "Qwen MoE", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), True, "mlp", PROJECTIONS
    ),
    Layout("Qwen3 MoE", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("qwen3",), False, "mlp", PROJECTIONS),
)


def select_layout(config: MoEConfig, model_types: list[str]) -> Layout:
    """The layout for the config's models: `architecture:` (a name prefix, as mergekit matches it) among those that
    can hold them, else the first that can (Mixtral before Qwen MoE, as mergekit-moe prefers)."""
    candidates = list(LAYOUTS)
    where = config.where("architecture")
    if config.architecture:
        candidates = [lay for lay in LAYOUTS if lay.name.lower().startswith(config.architecture.lower())]
        if not candidates:
            known = ", ".join(lay.name for lay in LAYOUTS)
            extra = (
                " (DeepSeek MoE needs remote code; medmerge does not write it)"
                if "deepseek".startswith(config.architecture.lower()[:4])
                else ""
            )
            raise UserError(f"unknown architecture '{config.architecture}'; medmerge writes {known}{extra}", **where)
    reasons = [lay.why_not(config, model_types) for lay in candidates]
    for layout, reason in zip(candidates, reasons):
        if reason is None:
            return layout
    if not config.architecture and config.shared_experts and not any(e.positive_prompts for e in config.shared_experts):
        reasons.append("a shared expert without prompts makes a DeepSeek MoE, which medmerge does not write")
    raise UserError(
        "no MoE architecture can hold these models: " + "; ".join(r for r in reasons if r),
        **(where if config.architecture else config.where("base_model")),
    )
