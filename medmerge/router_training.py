"""`medmerge moe train-router MOE_DIR --data ... -o OUT_DIR`: train a mixture of experts' routers, experts frozen.

The MoE studies' recipe: one router per decoder layer (a linear router, or noisy top-k gating with an expert
capacity; merge/moe/routing.py), trained on labelled multiple-choice questions in MedMCQA's [INST] prompt (the
prompt of the medmerge_medmcqa_inst task) with the answer letter as the target (-log P(" <letter>" | prompt), the
continuation lm-eval scores), plus an optional load-balancing loss. Everything but the router weights is frozen.
After each epoch the router is scored on a validation split (accuracy as lm-eval's `acc`); the best epoch's routers
are written, early stopping after `patience` epochs without a better one. The log (`router_training.json`) holds,
per epoch, the losses, the validation accuracy and how often each layer chose each expert.

OUT_DIR is MOE_DIR with the router weights replaced (and num_experts_per_tok = --top-k): a plain Mixtral / Qwen MoE
checkpoint, noise and capacity off, that transformers loads and `lm_eval --model hf` evaluates.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from medmerge.labelled import split_labelled
from medmerge_common.errors import UserError
from medmerge_common.outdir import ROUTER_TRAINING_LOG, Say, check_output_dir
from medmerge_common.quantization import check_quantization, load_causal_lm, model_dtype
from medmerge_tasks.choices import ChoicePrompt, EncodedQuestion, batch_inputs, encode_prompts, option_loglikelihoods
from merge.io.checkpoint import Checkpoint, OutputTensor, read_json_object
from merge.io.hub import input_dirs, open_model
from merge.io.writer import model_output
from merge.moe.routing import choice_counts, load_balancing_loss, route
from merge.run import Progress, check_device

LOG_FILE = ROUTER_TRAINING_LOG
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")


class RouterSettings(BaseModel):
    """How the routers are trained (the CLI's options; an experiment's `moes: [{train_router: ...}]`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    router: Literal["linear", "noisy_topk"] = "linear"
    top_k: int | None = None  # experts per token; None: the MoE's num_experts_per_tok
    noise: float | None = None  # σ of the logit noise (noisy_topk); None: 1.0
    capacity_factor: float | None = None  # expert capacity while training; None: unlimited
    load_balancing: float = 0.0  # α, the load-balancing loss coefficient (Switch: 0.01, Mixtral: 0.02)
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = 1e-4
    patience: int = Field(default=2, ge=1)
    validation_fraction: float = 0.1  # held out of --data when no validation data is given
    limit: float | None = None  # training questions: a count, or a fraction (< 1) of them
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    quantization: Literal["4bit", "8bit"] | None = None  # bitsandbytes, CUDA

    @property
    def logit_noise(self) -> float:
        return 0.0 if self.router == "linear" else (1.0 if self.noise is None else self.noise)


@dataclass
class EpochLog:
    epoch: int  # 0: the routers as given, before training
    validation_accuracy: float
    validation_loss: float  # mean -log P(gold answer)
    validation_choices: list[list[int]]  # [layer][expert]: tokens that chose the expert (inference routing)
    validation_weights: list[list[float]]  # [layer][expert]: the expert's mean routing weight over the tokens
    train_loss: float | None = None
    load_balancing_loss: float | None = None
    train_choices: list[list[int]] | None = None  # [layer][expert], the router's choices before capacity
    dropped_fraction: float | None = None  # of the training slots, dropped by expert capacity
    seconds: float = 0.0


@dataclass
class RouterTrainingResult:
    out_dir: Path
    epochs: list[EpochLog]
    best_epoch: int
    seconds: float


class TrainedRouter(torch.nn.Module):
    """A drop-in for the router module of transformers' Mixtral / Qwen MoE blocks (`block.gate`): the same
    (logits, weights, experts) answer, routed by merge.moe.routing.route with float32 weights. Noise and capacity
    apply in training mode only; in eval mode it is exactly the checkpoint's router."""

    def __init__(
        self, weight: torch.Tensor, top_k: int, normalize: bool, settings: RouterSettings, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().float().clone())
        self.top_k, self.normalize, self.generator = top_k, normalize, generator
        self.noise, self.capacity_factor = settings.logit_noise, settings.capacity_factor
        self.valid: torch.Tensor | None = None  # (T,) the batch's non-padding tokens, set before each forward
        self.balance: torch.Tensor | None = None  # the last forward's load-balancing loss (training mode)
        self.reset_counts()

    def reset_counts(self) -> None:
        self.counts = torch.zeros(self.weight.shape[0], dtype=torch.long)
        self.weight_sums = torch.zeros(self.weight.shape[0], dtype=torch.float64)
        self.dropped, self.tokens = 0, 0

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_experts = self.weight.shape[0]
        logits = torch.nn.functional.linear(hidden.reshape(-1, self.weight.shape[1]).float(), self.weight)
        routing = route(
            logits,
            self.top_k,
            noise=self.noise if self.training else 0.0,
            capacity_factor=self.capacity_factor if self.training else None,
            valid=self.valid,
            normalize=self.normalize,
            generator=self.generator,
        )
        self.balance = load_balancing_loss(routing, num_experts, self.valid) if self.training else None
        with torch.no_grad():
            valid = torch.ones_like(routing.kept[:, 0]) if self.valid is None else self.valid.bool()
            self.counts += choice_counts(routing.experts, num_experts, valid).cpu()
            self.dropped += int((~routing.kept[valid]).sum())
            self.tokens += int(valid.sum())
            sums = torch.zeros(num_experts, dtype=torch.float64, device=logits.device)
            sums.index_add_(0, routing.experts[valid].reshape(-1), routing.weights[valid].reshape(-1).double())
            self.weight_sums += sums.cpu()
        return logits, routing.weights, routing.experts


def moe_blocks(model: Any) -> list[tuple[int, Any]]:
    """(layer, MoE block) for every MoE layer of a transformers Mixtral / Qwen MoE model."""
    blocks = []
    for index, layer in enumerate(model.model.layers):
        for attribute in ("block_sparse_moe", "mlp"):
            block = getattr(layer, attribute, None)
            if block is not None and hasattr(block, "gate") and hasattr(block, "experts"):
                blocks.append((index, block))
                break
    return blocks


def router_tensor(checkpoint: Checkpoint, layer: int) -> str:
    """The name layer `layer`'s router weight has in the checkpoint (Mixtral's block_sparse_moe.gate or Qwen's
    mlp.gate: transformers 5 renames the first when it loads it)."""
    for block in ("block_sparse_moe", "mlp"):
        name = f"model.layers.{layer}.{block}.gate.weight"
        if name in checkpoint.tensors:
            return name
    raise UserError(f"{checkpoint.ref}: no router tensor for layer {layer} (model.layers.{layer}.*.gate.weight)")


def attach_routers(
    model: Any, checkpoint: Checkpoint, top_k: int, settings: RouterSettings
) -> dict[str, TrainedRouter]:
    """Replace every MoE block's router by a TrainedRouter holding its weights (keyed by the checkpoint's tensor
    name); freeze everything else."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    normalize = bool(getattr(model.config, "norm_topk_prob", True))  # Mixtral always renormalises
    routers = {}
    for layer, block in moe_blocks(model):
        router = TrainedRouter(block.gate.weight.to(device), top_k, normalize, settings, generator).to(device)
        block.gate = router
        routers[router_tensor(checkpoint, layer)] = router
    if not routers:
        raise UserError(f"{checkpoint.ref}: transformers loaded no MoE block with a router from it")
    return routers


def _set_valid(routers: dict[str, TrainedRouter], mask: torch.Tensor) -> None:
    for router in routers.values():
        router.valid = mask.reshape(-1)


def _counts(routers: dict[str, TrainedRouter]) -> list[list[int]]:
    return [router.counts.tolist() for router in routers.values()]


def _mean_weights(routers: dict[str, TrainedRouter]) -> list[list[float]]:
    return [[round(w, 6) for w in (r.weight_sums / max(r.tokens, 1)).tolist()] for r in routers.values()]


def _reset(routers: dict[str, TrainedRouter], training: bool) -> None:
    for router in routers.values():
        router.reset_counts()
        router.train(training)


def score(
    model: Any, routers: dict[str, TrainedRouter], questions: list[EncodedQuestion], batch_size: int, pad_id: int
) -> tuple[float, float, list[list[int]], list[list[float]]]:
    """(accuracy, mean -log P(gold), choice counts and mean routing weights per layer and expert), with inference
    routing (no noise, no capacity)."""
    _reset(routers, training=False)
    device = next(model.parameters()).device
    right, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            ids, mask = batch_inputs(batch, pad_id, device)
            _set_valid(routers, mask)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for q, scores in zip(batch, option_loglikelihoods(logits, batch)):
                right += int(int(scores.argmax()) == q.gold)
                loss -= float(scores[q.gold])
    return right / len(questions), loss / len(questions), _counts(routers), _mean_weights(routers)


def _train_epoch(
    model: Any,
    routers: dict[str, TrainedRouter],
    questions: list[EncodedQuestion],
    optimizer: torch.optim.Optimizer,
    settings: RouterSettings,
    shuffle: random.Random,
    pad_id: int,
    step: Callable[[str], None],
) -> tuple[float, float, list[list[int]], float]:
    """One pass over the training questions in a seeded order: (mean task loss, mean load-balancing loss, choice
    counts per layer, fraction of slots dropped by capacity)."""
    _reset(routers, training=True)
    device = next(model.parameters()).device
    order = list(range(len(questions)))
    shuffle.shuffle(order)
    task_total = balance_total = 0.0
    batches = 0
    for start in range(0, len(order), settings.batch_size):
        batch = [questions[i] for i in order[start : start + settings.batch_size]]
        ids, mask = batch_inputs(batch, pad_id, device)
        _set_valid(routers, mask)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        scores = option_loglikelihoods(logits, batch)
        task = -torch.stack([s[q.gold] for q, s in zip(batch, scores)]).mean()
        balance = torch.stack([r.balance for r in routers.values() if r.balance is not None]).mean()
        loss = task + settings.load_balancing * balance if settings.load_balancing else task
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        task_total += float(task.detach())
        balance_total += float(balance.detach())
        batches += 1
        step(f"loss {float(task.detach()):.4f}")
    slots = sum(r.tokens * r.top_k for r in routers.values())
    dropped = sum(r.dropped for r in routers.values()) / slots if slots else 0.0
    return task_total / batches, balance_total / batches, _counts(routers), dropped


def check_settings(settings: RouterSettings, num_experts: int, top_k: int) -> None:
    """Refuse settings that cannot train, before the model is loaded."""
    problems = []
    if settings.router == "linear" and settings.noise not in (None, 0):
        problems.append("--noise belongs to --router noisy_topk (the linear router adds none)")
    if settings.noise is not None and not (math.isfinite(settings.noise) and settings.noise >= 0):
        problems.append(f"--noise {settings.noise}: expected a standard deviation >= 0")
    if not 1 <= top_k <= num_experts:
        problems.append(f"--top-k {top_k}: the MoE has {num_experts} experts; choose 1 to {num_experts}")
    elif top_k == 1 and settings.load_balancing == 0:
        problems.append(
            "--top-k 1 leaves the answer loss no gradient to the router (the chosen expert's weight is always 1); "
            "use --top-k 2 or more, or train on --load-balancing alone"
        )
    if settings.capacity_factor is not None and not (
        math.isfinite(settings.capacity_factor) and settings.capacity_factor > 0
    ):
        problems.append(f"--capacity-factor {settings.capacity_factor}: expected a number > 0 (e.g. 1.25)")
    if not (math.isfinite(settings.load_balancing) and settings.load_balancing >= 0):
        problems.append(f"--load-balancing {settings.load_balancing}: expected a coefficient >= 0 (e.g. 0.01)")
    if not (math.isfinite(settings.lr) and settings.lr > 0):
        problems.append(f"--lr {settings.lr}: expected a learning rate > 0")
    if not 0 < settings.validation_fraction < 1:
        problems.append(f"--validation-fraction {settings.validation_fraction}: expected a fraction between 0 and 1")
    if settings.limit is not None and not settings.limit > 0:
        problems.append(f"--limit {settings.limit}: expected a count or a fraction > 0")
    if problems:
        raise UserError(*problems)


def open_moe(ref: str) -> Checkpoint:
    """The MoE checkpoint to train (a directory or hub id), checked to be a Mixtral / Qwen MoE."""
    checkpoint = open_model(ref)
    model_type = checkpoint.config.get("model_type")
    if model_type not in MOE_TYPES:
        checkpoint.close()
        raise UserError(
            f"{ref}: config.json has model_type {model_type!r}, not a mixture of experts ({', '.join(MOE_TYPES)}); "
            "build one with `medmerge moe CONFIG OUT_DIR`"
        )
    return checkpoint


def load_model(checkpoint: Checkpoint, settings: RouterSettings, device: torch.device) -> Any:
    """The MoE in the chosen dtype on the chosen device (its linear layers in 4/8 bits with quantization)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise UserError(
            f"train-router needs transformers >= 5 (its MoE blocks take the router's choice from the router "
            f"module); this environment has {transformers.__version__}"
        )
    dtype = model_dtype(settings.dtype, device.type)
    assert checkpoint.directory is not None
    return load_causal_lm(str(checkpoint.directory), dtype, settings.device, settings.quantization)


def train_router(
    moe: str,
    out_dir: str | Path,
    train: list[ChoicePrompt],
    validation: list[ChoicePrompt] | None = None,
    *,
    settings: RouterSettings | None = None,
    data_names: tuple[str, str | None] = ("", None),
    overwrite: bool = False,
    progress: Progress | None = None,
    say: Say | None = None,
) -> RouterTrainingResult:
    """Train the routers of MoE `moe` on `train` (validated on `validation`, else on a held-out fraction) and
    write OUT_DIR atomically: MOE_DIR with the best epoch's routers, and the training log."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    settings = settings or RouterSettings()
    say = say or (lambda _: None)
    out = Path(out_dir)
    checkpoint = open_moe(moe)
    try:
        config = checkpoint.config
        num_experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
        top_k = settings.top_k or int(config.get("num_experts_per_tok") or 2)
        check_settings(settings, num_experts, top_k)
        device = check_device(settings.device)
        if settings.quantization:
            check_quantization(settings.quantization)
        train_questions, validation_questions = split_labelled(
            train,
            validation,
            seed=settings.seed,
            validation_fraction=settings.validation_fraction,
            limit=settings.limit,
        )
        check_output_dir(out, overwrite, inputs=input_dirs(moe))
        assert checkpoint.directory is not None
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.directory))
        pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        train_encoded = encode_prompts(tokenizer, train_questions)
        validation_encoded = encode_prompts(tokenizer, validation_questions)

        model = load_model(checkpoint, settings, device)
        routers = attach_routers(model, checkpoint, top_k, settings)
        optimizer = torch.optim.AdamW([r.weight for r in routers.values()], lr=settings.lr, weight_decay=0.0)
        shuffle = random.Random(settings.seed)
        batches = math.ceil(len(train_encoded) / settings.batch_size)

        epoch_start = time.perf_counter()
        accuracy, loss, choices, weights = score(model, routers, validation_encoded, settings.batch_size, pad_id)
        log = [EpochLog(0, accuracy, loss, choices, weights, seconds=time.perf_counter() - epoch_start)]
        say(f"epoch 0 (routers as built): validation accuracy {accuracy:.4f}, loss {loss:.4f}")
        best, best_state = 0, _state(routers)
        for epoch in range(1, settings.epochs + 1):
            epoch_start = time.perf_counter()
            done = (epoch - 1) * batches

            def step(label: str, epoch: int = epoch) -> None:
                nonlocal done
                done += 1
                if progress:
                    progress(done, settings.epochs * batches, f"epoch {epoch}/{settings.epochs} {label}")

            train_loss, balance, train_choices, dropped = _train_epoch(
                model, routers, train_encoded, optimizer, settings, shuffle, pad_id, step
            )
            accuracy, loss, choices, weights = score(model, routers, validation_encoded, settings.batch_size, pad_id)
            log.append(
                EpochLog(
                    epoch,
                    accuracy,
                    loss,
                    choices,
                    weights,
                    train_loss,
                    balance,
                    train_choices,
                    dropped,
                    time.perf_counter() - epoch_start,
                )
            )
            say(
                f"epoch {epoch}: train loss {train_loss:.4f}, validation accuracy {accuracy:.4f}, loss {loss:.4f}"
                + (f", {dropped:.1%} of slots over capacity" if settings.capacity_factor else "")
            )
            if (accuracy, -loss) > (log[best].validation_accuracy, -log[best].validation_loss):
                best, best_state = epoch, _state(routers)
            elif epoch - best >= settings.patience:
                say(f"no better validation score for {settings.patience} epoch(s): stopping")
                break
        if best == 0:
            say("no epoch scored better on validation than the routers as built: OUT_DIR keeps them")
        result = RouterTrainingResult(out, log, best, 0.0)
        record = {
            "moe": moe,
            "data": data_names[0],
            "validation_data": data_names[1] or f"{settings.validation_fraction} of --data, held out",
            "questions": {"train": len(train_encoded), "validation": len(validation_encoded)},
            "settings": settings.model_dump() | {"top_k": top_k},
            "routers": list(routers),
            "experts": num_experts,
            "best_epoch": best,
            "epochs": [asdict(e) for e in log],
        }
        del model, routers
        _write(checkpoint, out, best_state, top_k, record, overwrite, moe, say)
    finally:
        checkpoint.close()
    result.seconds = time.perf_counter() - start
    return result


def _state(routers: dict[str, TrainedRouter]) -> dict[str, torch.Tensor]:
    return {name: router.weight.detach().to("cpu", copy=True) for name, router in routers.items()}


def _write(
    checkpoint: Checkpoint,
    out: Path,
    routers: dict[str, torch.Tensor],
    top_k: int,
    record: dict[str, Any],
    overwrite: bool,
    moe: str,
    say: Say,
) -> None:
    """OUT_DIR: every tensor of the MoE (the routers replaced, in their stored dtype), its other files byte for
    byte, config.json with num_experts_per_tok, the log, and the model card with a training section."""
    assert checkpoint.directory is not None
    source = checkpoint.directory
    outputs = [OutputTensor(name, info.dtype, info.shape) for name, info in checkpoint.tensors.items()]
    with model_output(
        out, outputs, overwrite=overwrite, inputs=input_dirs(moe), shard_bytes=5 * 10**9, metadata={}, say=say
    ) as (staging, writer):
        for item in outputs:
            tensor = routers[item.name].to(item.dtype) if item.name in routers else checkpoint.read(item.name)
            writer.write(item.name, tensor)
        for path in sorted(source.iterdir()):
            if (
                path.is_file()
                and not path.name.endswith(WEIGHT_SUFFIXES)
                and path.name not in ("config.json", "README.md", LOG_FILE)
            ):
                (staging / path.name).write_bytes(path.read_bytes())
        config = read_json_object(source / "config.json") | {"num_experts_per_tok": top_k}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / LOG_FILE).write_text(json.dumps(record, indent=1) + "\n")
        card = (source / "README.md").read_text() if (source / "README.md").is_file() else f"# {out.name}\n"
        (staging / "README.md").write_text(card.rstrip() + "\n\n" + training_card(record))


def training_card(record: dict[str, Any]) -> str:
    """The model card's section on router training: settings, data, and the validation score per epoch."""
    settings = record["settings"]
    lines = [
        "## Router training (medmerge moe train-router)",
        "",
        f"Routers trained with the experts frozen: `{settings['router']}` router, top-{settings['top_k']}"
        + (f", logit noise σ={settings['noise'] or 1.0}" if settings["router"] == "noisy_topk" else "")
        + (f", capacity factor {settings['capacity_factor']}" if settings["capacity_factor"] else "")
        + (f", load-balancing α={settings['load_balancing']}" if settings["load_balancing"] else "")
        + f"; lr {settings['lr']}, batch {settings['batch_size']}, seed {settings['seed']}. Data: "
        f"{record['data']} ({record['questions']['train']} questions, MedMCQA [INST] prompt); validation: "
        f"{record['validation_data']} ({record['questions']['validation']} questions). Epoch "
        f"{record['best_epoch']} kept (best validation accuracy); per-layer expert choices in `{LOG_FILE}`.",
        "",
        "| epoch | train loss | validation accuracy | validation loss |",
        "|---|---|---|---|",
    ]
    for e in record["epochs"]:
        train = "-" if e["train_loss"] is None else f"{e['train_loss']:.4f}"
        lines.append(f"| {e['epoch']} | {train} | {e['validation_accuracy']:.4f} | {e['validation_loss']:.4f} |")
    return "\n".join(lines) + "\n"
