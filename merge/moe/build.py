"""`medmerge moe`: config -> checks -> gate rows -> tensors streamed into an atomic output directory.

Attention, embeddings and norms come from the base model; expert e's MLP in layer l is the dense MLP of layer l of
expert e's model (with its noise and residual scale); the router of layer l holds the gate rows (gates.py).
Every tensor is read, converted and written one at a time, so memory holds one tensor (plus, for the hidden gate
modes, the base model while the prompts run through it).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from medmerge_common.errors import UserError
from medmerge_common.outdir import Say, check_output_dir
from merge.io.checkpoint import Checkpoint, OutputTensor, config_int
from merge.io.hub import input_dirs, open_model, tokenizer_dir
from merge.io.lora import split_adapter
from merge.io.writer import ShardedWriter, model_output
from merge.moe.config import RANDOM_GATE_MODES, Expert, MoEConfig, load_moe_config
from merge.moe.gates import (
    cheap_embedding,
    degenerate_layers,
    hidden_state_means,
    prompt_gates,
    prompt_tokenizer,
    random_gates,
    tokenize_prompts,
)
from merge.moe.layouts import PROJECTIONS, Layout, select_layout
from merge.recipe import DTYPES
from merge.run import Progress, check_device, tensor_seed
from merge.vocabulary import copy_tokenizer_files

MLP = re.compile(r"^model\.layers\.\d+\.mlp\.")
CONFIG_FILE = "medmerge_moe.yaml"  # the config verbatim: also the marker that medmerge wrote the directory


@dataclass(frozen=True)
class MoETensor:
    """One output tensor and where it comes from: a model's tensor (an expert's with its noise and scale), the
    gate rows of a layer, or zeros (attention biases a Qwen MoE needs and a Llama/Mistral base lacks)."""

    output: OutputTensor
    model: str | None = None
    tensor: str | None = None
    expert: Expert | None = None
    residual: bool = False
    gate: tuple[int, slice] | None = None  # (layer, rows of the gate matrix)


@dataclass
class MoEPlan:
    config: MoEConfig
    layout: Layout
    tensors: list[MoETensor]
    num_layers: int
    out_dtype: torch.dtype | None


@dataclass
class MoEResult:
    out_dir: Path | None
    plan: MoEPlan
    seconds: float


def output_dtype(config: MoEConfig, base: dict[str, Any]) -> torch.dtype | None:
    """The config's `dtype`, else the base's config dtype, else None (each tensor keeps its own)."""
    name = config.dtype or base.get("dtype") or base.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def plan_moe(config: MoEConfig, models: dict[str, Checkpoint], prompt_dtype: torch.dtype = torch.bfloat16) -> MoEPlan:
    """Choose the layout and list every output tensor with its source, checking every expert's MLPs against the
    base's (same layers, same shapes: one intermediate size for all experts)."""
    base = models[config.base_model]
    layout = select_layout(config, [str(models[ref].config.get("model_type")) for ref in config.model_refs()])
    num_layers = config_int(base.config, "num_hidden_layers")
    hidden = config_int(base.config, "hidden_size")
    if num_layers is None or hidden is None:
        raise UserError(
            f"model '{base.ref}': config.json has no num_hidden_layers / hidden_size", **config.where("base_model")
        )
    out_dtype = output_dtype(config, base.config)
    gate_dtype = out_dtype or (prompt_dtype if config.gate_mode.startswith("hidden") else torch.float32)

    def copied(model: Checkpoint, name: str, out_name: str, expert: Expert | None = None) -> MoETensor:
        info = model.tensors[name]
        residual = expert is not None and name.endswith("down_proj.weight")
        return MoETensor(OutputTensor(out_name, out_dtype or info.dtype, info.shape), model.ref, name, expert, residual)

    tensors = [copied(base, name, name) for name in base.tensors if not MLP.match(name) and "rotary_emb." not in name]
    if layout.name == "Qwen MoE" and models[config.base_model].config.get("model_type") != "qwen2":
        tensors += _zero_attention_biases(base, num_layers, out_dtype or torch.float32)
    shared = (config.shared_experts or [None])[0]
    for layer in range(num_layers):
        for index, expert in enumerate(config.experts):
            for projection in PROJECTIONS:
                source = _expert_tensor(config, models, ("experts", index), expert, layer, projection)
                tensors.append(
                    copied(models[expert.source_model], source, layout.expert_name(layer, index, projection), expert)
                )
        if layout.shared_expert and shared is not None:
            for projection in PROJECTIONS:
                source = _expert_tensor(config, models, ("shared_experts", 0), shared, layer, projection)
                tensors.append(
                    copied(models[shared.source_model], source, layout.shared_name(layer, projection), shared)
                )
    # the routers last: their rows may still be computing (the prompts running through the base) while the rest
    # is written
    experts = len(config.experts)
    for layer in range(num_layers):
        gate = OutputTensor(layout.gate_name(layer), gate_dtype, (experts, hidden))
        tensors.append(MoETensor(gate, gate=(layer, slice(0, experts))))
        if layout.shared_expert and shared is not None:
            shared_gate = OutputTensor(layout.shared_gate_name(layer), gate_dtype, (1, hidden))
            tensors.append(MoETensor(shared_gate, gate=(layer, slice(experts, experts + 1))))
    return MoEPlan(config, layout, tensors, num_layers, out_dtype)


def _expert_tensor(
    config: MoEConfig, models: dict[str, Checkpoint], path: tuple[str, int], expert: Expert, layer: int, projection: str
) -> str:
    """The name of an expert model's MLP tensor, checked to exist and to match the base's shape."""
    name = f"model.layers.{layer}.mlp.{projection}.weight"
    model, base = models[expert.source_model], models[config.base_model]
    where = config.where(*path, "source_model")
    if name not in model.tensors:
        raise UserError(f"model '{model.ref}' has no tensor '{name}' (a dense Llama/Mistral/Qwen MLP)", **where)
    want = base.tensors[name].shape if name in base.tensors else None
    if want is not None and model.tensors[name].shape != want:
        raise UserError(
            f"model '{model.ref}' tensor '{name}' has shape {list(model.tensors[name].shape)}, the base's has "
            f"{list(want)}: every expert needs the base's hidden and intermediate sizes",
            **where,
        )
    return name


def _zero_attention_biases(base: Checkpoint, num_layers: int, dtype: torch.dtype) -> list[MoETensor]:
    """Zero q/k/v biases for a Qwen MoE made from models without them (Qwen2's attention always has them)."""
    out = []
    for layer in range(num_layers):
        for projection in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{projection}"
            if f"{name}.bias" not in base.tensors and f"{name}.weight" in base.tensors:
                rows = base.tensors[f"{name}.weight"].shape[0]
                out.append(MoETensor(OutputTensor(f"{name}.bias", dtype, (rows,))))
    return out


@dataclass(frozen=True)
class PromptRun:
    """How the base model runs the prompts for the hidden gate modes (mergekit-moe: bfloat16, unquantized)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    quantization: str | None = None  # 4bit | 8bit (bitsandbytes, CUDA)


def compute_gates(config: MoEConfig, base: Checkpoint, num_layers: int, run: PromptRun, seed: int) -> torch.Tensor:
    """(layers, gated experts, hidden): the gate rows of every layer, by the config's gate_mode (gates.py)."""
    gated = config.gated
    hidden = config_int(base.config, "hidden_size")
    assert hidden is not None
    if config.gate_mode in RANDOM_GATE_MODES:
        return random_gates(config.gate_mode, num_layers, len(gated), hidden, seed)
    from transformers import AutoTokenizer

    tokenizer = prompt_tokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir(config.base_model))))
    if config.gate_mode == "cheap_embed":
        embed = base.read("model.embed_tokens.weight")
        return prompt_gates(
            gated, lambda prompts: cheap_embedding(embed, tokenize_prompts(tokenizer, prompts), num_layers)
        )
    model = _load_base(base, run)
    average = config.gate_mode == "hidden_avg"
    return prompt_gates(
        gated,
        lambda prompts: hidden_state_means(model, tokenize_prompts(tokenizer, prompts), average_positions=average),
    )


def check_prompt_run(config: MoEConfig, run: PromptRun) -> None:
    """Refuse, before anything is written, a prompt run that cannot happen."""
    if not config.gate_mode.startswith("hidden"):
        return
    if split_adapter(config.base_model)[1] is not None:
        raise UserError(
            f"gate_mode {config.gate_mode} runs the base model, which cannot be a BASE+ADAPTER reference: merge the "
            "adapter first (medmerge merge, passthrough) or use gate_mode cheap_embed",
            **config.where("base_model"),
        )
    if run.quantization:
        from medmerge_common.quantization import check_quantization

        check_quantization(run.quantization)


def _load_base(base: Checkpoint, run: PromptRun) -> Any:
    """The base model in `run.dtype` (its linear layers in 4/8 bits with `run.quantization`), on `run.device`."""
    from medmerge_common.quantization import load_causal_lm

    assert base.directory is not None
    return load_causal_lm(str(base.directory), run.dtype, run.device, run.quantization)


class _Background:
    """A function running in a daemon thread, so that an interrupted build exits without waiting for it."""

    def __init__(self, function: Callable[[], torch.Tensor]) -> None:
        self._value: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], torch.Tensor]) -> None:
        try:
            self._value = function()
        except BaseException as exc:  # handed to the thread that asks for the result
            self._error = exc

    def result(self) -> torch.Tensor:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def build_moe(
    config: str | Path | MoEConfig,
    out_dir: str | Path | None,
    *,
    prompt_run: PromptRun | None = None,
    shard_bytes: int = 5 * 10**9,
    seed: int = 0,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_all_same: bool = False,
    progress: Progress | None = None,
    warn: Say | None = None,
) -> MoEResult:
    """Build the mixture of experts a config describes into `out_dir` (atomically), or only check and plan it
    (`dry_run`: reads configs and headers, no weights). The gate rows are computed in a background thread while
    the other tensors are written (the routers are written last)."""
    start = time.perf_counter()
    warn = warn or (lambda _: None)
    if not isinstance(config, MoEConfig):
        config = load_moe_config(config, allow_all_same=allow_all_same)
    out = Path(out_dir) if out_dir is not None else None
    inputs = [d for ref in config.model_refs() for d in input_dirs(ref)]
    if out is not None:
        check_output_dir(out, overwrite, inputs=inputs)
    run = prompt_run or PromptRun()
    check_device(run.device)
    check_prompt_run(config, run)
    models = {ref: open_model(ref, weights=not dry_run) for ref in config.model_refs()}
    try:
        plan = plan_moe(config, models, run.dtype)
        if dry_run:
            return MoEResult(None, plan, time.perf_counter() - start)
        assert out is not None
        base = models[config.base_model]
        gates = _Background(lambda: compute_gates(config, base, plan.num_layers, run, seed))
        outputs = [t.output for t in plan.tensors]
        metadata = {"medmerge_seed": str(seed)}
        with model_output(
            out, outputs, overwrite=overwrite, inputs=inputs, shard_bytes=shard_bytes, metadata=metadata, say=warn
        ) as (staging, writer):
            _write_tensors(plan, models, gates, seed, writer, progress)
            _write_metadata(plan, base, staging, seed)
        degenerate = degenerate_layers(gates.result())
        if degenerate:
            warn(
                f"the gate rows of {len(degenerate)} of {plan.num_layers} layer(s) (first: {degenerate[0]}) are "
                "nearly linearly dependent: the prompts may be too alike, and some experts will rarely be chosen"
            )
    finally:
        for model in models.values():
            model.close()
    return MoEResult(out, plan, time.perf_counter() - start)


def produce(item: MoETensor, models: dict[str, Checkpoint], gates: _Background, seed: int) -> torch.Tensor:
    """One output tensor: read and (for an expert) noised and scaled in its stored dtype, then cast, as mergekit."""
    out = item.output
    if item.gate is not None:
        layer, rows = item.gate
        return gates.result()[layer, rows].to(out.dtype).contiguous()
    if item.model is None:
        return torch.zeros(out.shape, dtype=out.dtype)
    assert item.tensor is not None
    tensor = models[item.model].read(item.tensor)
    expert = item.expert
    if expert is not None and expert.noise_scale is not None:
        generator = torch.Generator().manual_seed(tensor_seed(seed, out.name))
        tensor = tensor + torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * expert.noise_scale
    if item.residual and expert is not None and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor.to(out.dtype)


def _write_tensors(
    plan: MoEPlan,
    models: dict[str, Checkpoint],
    gates: _Background,
    seed: int,
    writer: ShardedWriter,
    progress: Progress | None,
) -> None:
    """Every tensor in plan order, the next one read while this one is written (file I/O releases the GIL)."""
    items = plan.tensors
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(produce, items[0], models, gates, seed) if items else None
        for index, item in enumerate(items):
            assert pending is not None
            tensor = pending.result()
            if index + 1 < len(items):
                pending = reader.submit(produce, items[index + 1], models, gates, seed)
            writer.write(item.output.name, tensor)
            if progress:
                progress(index + 1, len(items), item.output.name)


def _write_metadata(plan: MoEPlan, base: Checkpoint, out: Path, seed: int) -> None:
    """config.json, generation_config.json and the tokenizer (the base's, byte for byte), the config verbatim and
    README.md."""
    config = plan.config
    plan.layout.output_config(base.config, config, plan.out_dtype).save_pretrained(str(out))
    source = base.directory or tokenizer_dir(config.base_model)
    if (source / "generation_config.json").is_file():
        (out / "generation_config.json").write_bytes((source / "generation_config.json").read_bytes())
    copy_tokenizer_files(tokenizer_dir(config.base_model), out)
    (out / CONFIG_FILE).write_text(config.source_text or yaml.safe_dump(config.model_dump(), sort_keys=False))
    (out / "README.md").write_text(model_card(plan, seed))


def model_card(plan: MoEPlan, seed: int) -> str:
    config = plan.config
    experts = config.experts + (config.shared_experts or [])
    front = {
        "base_model": list(dict.fromkeys(e.source_model for e in experts)),
        "library_name": "transformers",
        "tags": ["moe", "merge", "medmerge"],
    }
    title = config.name or (config.source_file.stem if config.source_file else "mixture of experts")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += [
        f"A {plan.layout.name} mixture of experts built with medmerge from dense models: attention, embeddings and "
        f"norms from `{config.base_model}`, {len(config.experts)} experts per layer ({config.experts_per_token} "
        f"chosen per token), router initialised by gate_mode `{config.gate_mode}`"
        + (f" (seed {seed})" if config.gate_mode in RANDOM_GATE_MODES else "")
        + ".",
        "",
        "| expert | model | positive prompts | negative prompts |",
        "|---|---|---|---|",
    ]
    for index, expert in enumerate(experts):
        label = str(index) if index < len(config.experts) else "shared"
        cells = [", ".join(f"`{p}`" for p in prompts) or "-" for prompts in expert.prompts()]
        lines.append(f"| {label} | `{expert.source_model}` | {cells[0]} | {cells[1]} |")
    lines += ["", "## Config", "", "```yaml", (config.source_text or "").rstrip(), "```", ""]
    return "\n".join(lines)
