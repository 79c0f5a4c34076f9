"""`medmerge fuse train CONFIG -o FUSION_DIR`: train a combiner on frozen members' outputs.

    members:                          # lm-eval hf models: a directory or hub id each, dtype, quantization 4bit|8bit
      - {pretrained: BioMistral/BioMistral-7B}
      - {pretrained: mistralai/Mistral-7B-Instruct-v0.1, quantization: 4bit}
    data: medmcqa                     # medmcqa | FILE (MedMCQA schema) | task:NAME[:train|validation]
    validation_data: null             # default: validation_fraction of data held out
    validation_fraction: 0.1
    limit: null                       # training questions: a count, or a fraction (the study's 1%, 10%, 20k)
    combiner: late_fusion             # weighted | late_fusion | transformer
    features: auto                    # option_logits (options of one token) | loglikelihoods | auto
    seeds: [0]                        # one training per seed; the best on validation is kept
    epochs: 200
    patience: 20                      # stop after this many epochs without a better validation score
    lr: 0.01
    weight_decay: 0.0
    batch_size: 64                    # questions per combiner step
    member_batch_size: 8              # questions per member forward pass
    device: cpu                       # where the members run (the combiner trains on the CPU)
    cache_dir: null                   # default ~/.cache/medmerge/fusion (MEDMERGE_FUSION_CACHE)
    transformer: {width: 32, heads: 4, dropout: 0.1}

Relative paths (members, data files) are relative to the config file. Each member runs once per question: its
outputs are cached (medmerge_tasks.fusion.features), so training the other combiners on the same data runs no model.
FUSION_DIR: combiner.safetensors, fusion.json (combiner, options, features, members with their fingerprints),
training_log.json (per seed and epoch), training_curves.png and README.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from medmerge.labelled import TASK_PREFIX, labelled_prompts, split_labelled
from medmerge_common.errors import UserError
from medmerge_common.outdir import Say, atomic_output_dir, check_output_dir
from medmerge_common.quantization import check_quantization
from medmerge_tasks.fusion.combiners import build_combiner
from medmerge_tasks.fusion.features import (
    FEATURES,
    FeatureCache,
    Member,
    adapter_directory,
    member_directory,
    member_features,
)
from medmerge_tasks.fusion.saved import COMBINER_FILE, FORMAT, FUSION_FILE
from merge.run import Progress, check_device
from merge.yamlfile import load_yaml, validate_model

LOG_FILE = "training_log.json"


class TransformerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(32, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class FusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    members: list[Member] = Field(min_length=2)
    data: str = "medmcqa"
    validation_data: str | None = None
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    limit: int | float | None = Field(None, gt=0)
    combiner: Literal["weighted", "late_fusion", "transformer"] = "late_fusion"
    features: Literal["auto", "option_logits", "loglikelihoods"] = "auto"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    epochs: int = Field(200, ge=1)
    patience: int = Field(20, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)
    member_batch_size: int = Field(8, ge=1)
    device: str = "cpu"
    cache_dir: str | None = None
    transformer: TransformerSettings = Field(default_factory=TransformerSettings)


def load_fusion_config(path: str | Path) -> FusionConfig:
    """The config with relative member directories and data files resolved against the config file's directory;
    errors name file:line:field."""
    data, lines = load_yaml(path)
    config = validate_model(FusionConfig, data, path, lines)
    assert isinstance(config, FusionConfig)
    return resolve_paths(config, Path(path).resolve().parent)


def with_overrides(config: FusionConfig, **options: Any) -> FusionConfig:
    """The config with command-line options (None: not given) in place of its fields, validated again; a bad
    value is one UserError naming the option."""
    from pydantic import ValidationError

    given = {name: value for name, value in options.items() if value is not None}
    try:
        return FusionConfig.model_validate(config.model_dump() | given)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]).replace("_", "-")
        raise UserError(f"--{'seed' if name == 'seeds' else name}: {error['msg']}") from None


def resolve_paths(config: FusionConfig, base: Path) -> FusionConfig:
    def local(ref: str | None) -> str | None:
        if ref is None or ref.startswith(("medmcqa", TASK_PREFIX)) or Path(ref).is_absolute():
            return ref
        return str((base / ref).resolve()) if (base / ref).exists() else ref

    def located(member: Member) -> str:  # BASE+ADAPTER: each part on its own
        return "+".join(local(part) or "" for part in (member.base, member.adapter) if part)

    members = [m.model_copy(update={"pretrained": located(m)}) for m in config.members]
    return config.model_copy(
        update={"members": members, "data": local(config.data), "validation_data": local(config.validation_data)}
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDMERGE_FUSION_CACHE") or Path.home() / ".cache" / "medmerge" / "fusion")


@dataclass
class EpochLog:
    epoch: int
    validation_accuracy: float
    validation_loss: float
    train_loss: float | None = None
    train_accuracy: float | None = None


@dataclass
class FusionResult:
    out_dir: Path
    validation_accuracy: float
    best_seed: int
    best_epoch: int
    member_runs: int  # questions the members had to run on (0: everything came from the cache)
    seconds: float


def train_fusion(
    config: FusionConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    say: Say | None = None,
    progress: Progress | None = None,
) -> FusionResult:
    """Cache the members' features, train the combiner once per seed, and write FUSION_DIR atomically."""
    start = time.perf_counter()
    say = say or (lambda _: None)
    out = Path(out_dir)
    check_device(config.device)
    for member in config.members:
        if member.quantization:
            check_quantization(member.quantization)
    directories = [member_directory(m) for m in config.members]
    adapters = [a for a in map(adapter_directory, config.members) if a is not None]
    check_output_dir(out, overwrite, markers=[FUSION_FILE], inputs=directories + adapters)
    train = labelled_prompts(config.data, "data")
    validation = labelled_prompts(config.validation_data, "validation_data") if config.validation_data else None
    train, validation = split_labelled(
        train, validation, seed=config.seeds[0], validation_fraction=config.validation_fraction, limit=config.limit
    )
    options = option_count(train + validation)
    cache = FeatureCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir())
    prompts = train + validation
    per_member, identities, member_runs = [], [], 0
    for i, (member, directory) in enumerate(zip(config.members, directories), 1):

        def step(done: int, total: int, i: int = i) -> None:
            if progress:
                progress(done, total, f"member {i}/{len(config.members)}")

        features, identity, ran = member_features(
            member,
            prompts,
            device=config.device,
            batch_size=config.member_batch_size,
            cache=cache,
            say=say,
            step=step,
            directory=directory,
        )
        per_member.append(features)
        identities.append(identity)
        member_runs += ran
    kind = choose_features(config.features, per_member)
    stacked = torch.stack([f[kind] for f in per_member], dim=1)  # (questions, members, options)
    gold = torch.tensor([p.gold for p in prompts])
    n = len(train)
    runs = []
    for seed in config.seeds:
        state, log = fit_combiner(config, options, stacked[:n], gold[:n], stacked[n:], gold[n:], seed)
        best = max(range(len(log)), key=lambda e: (log[e].validation_accuracy, -log[e].validation_loss))
        say(
            f"seed {seed}: best epoch {best} of {len(log) - 1}, validation accuracy "
            f"{log[best].validation_accuracy:.4f} (untrained {log[0].validation_accuracy:.4f})"
        )
        runs.append((seed, best, state, log))
    seed, best, state, log = max(runs, key=lambda r: (r[3][r[1]].validation_accuracy, -r[3][r[1]].validation_loss))
    record = {
        "format": FORMAT,
        "combiner": config.combiner,
        "options": options,
        "features": kind,
        "transformer": config.transformer.model_dump() if config.combiner == "transformer" else None,
        "members": [m.model_dump() | {"fingerprint": fp} for m, fp in zip(config.members, identities)],
        "data": {
            "train": config.data,
            "validation": config.validation_data or f"{config.validation_fraction} of data, held out",
            "questions": {"train": n, "validation": len(validation)},
        },
        "settings": config.model_dump(exclude={"members", "data", "validation_data", "cache_dir", "transformer"}),
        "best": {"seed": seed, "epoch": best, "validation_accuracy": log[best].validation_accuracy},
    }
    training_log = {str(s): [asdict(e) for e in lg] for s, _, _, lg in runs}
    with atomic_output_dir(out, overwrite, markers=[FUSION_FILE], inputs=directories, say=say) as staging:
        save_file(state, str(staging / COMBINER_FILE), metadata={"format": str(FORMAT)})
        (staging / LOG_FILE).write_text(json.dumps({"best": record["best"], "seeds": training_log}, indent=1) + "\n")
        draw_curves(training_log, record, staging / "training_curves.png")
        (staging / "README.md").write_text(fusion_card(record, training_log))
        (staging / FUSION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return FusionResult(out, log[best].validation_accuracy, seed, best, member_runs, time.perf_counter() - start)


def option_count(prompts: list[Any]) -> int:
    """The one option count every question shares (a combiner's input and output have that width)."""
    counts = sorted({len(p.continuations) for p in prompts})
    if len(counts) != 1:
        raise UserError(
            f"data: questions with {', '.join(map(str, counts))} options; a combiner is trained for one option count"
        )
    return counts[0]


def choose_features(wanted: str, per_member: list[dict[str, torch.Tensor]]) -> str:
    """`option_logits` where every option is one token (what `auto` picks then), else `loglikelihoods`."""
    single = not any(bool(f["option_logits"].isnan().any()) for f in per_member)
    if wanted == "option_logits" and not single:
        raise UserError(
            "features: option_logits needs options of one token each; these options have several "
            "(use features: loglikelihoods)"
        )
    return wanted if wanted != "auto" else FEATURES[0] if single else FEATURES[1]


def fit_combiner(
    config: FusionConfig,
    options: int,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    validation_x: torch.Tensor,
    validation_y: torch.Tensor,
    seed: int,
) -> tuple[dict[str, torch.Tensor], list[EpochLog]]:
    """Train one combiner (cross-entropy on the right option, AdamW, seeded order and initialisation): the best
    epoch's weights and the log of every epoch (epoch 0: as initialised)."""
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    combiner = build_combiner(config.combiner, train_x.shape[1], options, **config.transformer.model_dump())
    combiner.standardize.fit(train_x)  # type: ignore[operator]
    optimizer = torch.optim.AdamW(combiner.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def state() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in combiner.state_dict().items()}

    accuracy, loss = score(combiner, validation_x, validation_y)
    log, best_state = [EpochLog(0, accuracy, loss)], state()
    best = 0
    for epoch in range(1, config.epochs + 1):
        combiner.train()
        permutation = torch.randperm(len(train_y), generator=order)
        total = right = 0.0
        for first in range(0, len(permutation), config.batch_size):
            rows = permutation[first : first + config.batch_size]
            logits = combiner(train_x[rows])
            batch_loss = torch.nn.functional.cross_entropy(logits, train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            total += float(batch_loss.detach()) * len(rows)
            right += float((logits.argmax(-1) == train_y[rows]).sum())
        accuracy, loss = score(combiner, validation_x, validation_y)
        log.append(EpochLog(epoch, accuracy, loss, total / len(train_y), right / len(train_y)))
        if (accuracy, -loss) > (log[best].validation_accuracy, -log[best].validation_loss):
            best, best_state = epoch, state()
        elif epoch - best >= config.patience:
            break
    return best_state, log


@torch.no_grad()
def score(combiner: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in inference mode (no dropout)."""
    combiner.eval()
    logits = combiner(x)
    return float((logits.argmax(-1) == y).float().mean()), float(torch.nn.functional.cross_entropy(logits, y))


def draw_curves(training_log: dict[str, list[dict[str, Any]]], record: dict[str, Any], path: Path) -> None:
    """Training and validation loss and accuracy per epoch, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, accuracies) = plt.subplots(1, 2, figsize=(10, 4))
    for seed, epochs in training_log.items():
        x = [e["epoch"] for e in epochs]
        color = losses.plot(x, [e["validation_loss"] for e in epochs], label=f"validation, seed {seed}")[0].get_color()
        losses.plot(x[1:], [e["train_loss"] for e in epochs[1:]], "--", color=color, label=f"train, seed {seed}")
        accuracies.plot(x, [e["validation_accuracy"] for e in epochs], color=color)
        accuracies.plot(x[1:], [e["train_accuracy"] for e in epochs[1:]], "--", color=color)
    best = record["best"]
    accuracies.axvline(best["epoch"], color="grey", linewidth=0.8)
    losses.set(xlabel="epoch", ylabel="cross-entropy", title=f"{record['combiner']}: loss")
    accuracies.set(xlabel="epoch", ylabel="accuracy", title=f"kept: seed {best['seed']}, epoch {best['epoch']}")
    losses.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def fusion_card(record: dict[str, Any], training_log: dict[str, list[dict[str, Any]]]) -> str:
    best = record["best"]
    epochs = training_log[str(best["seed"])]
    lines = [
        f"# Trained fusion: {record['combiner']}",
        "",
        f"A `{record['combiner']}` combiner over {len(record['members'])} frozen members' {record['features']}, for "
        f"questions with {record['options']} options. Evaluate it with",
        "",
        "    lm_eval --model medmerge-fusion --model_args pretrained=THIS_DIR --tasks ...",
        "",
        "Members (checked by fingerprint when loaded):",
        "",
        *[
            f"- `{m['pretrained']}` ({m['dtype'] or 'default dtype'}, {m['quantization'] or 'unquantized'}, "
            f"fingerprint {m['fingerprint'][:12]})"
            for m in record["members"]
        ],
        "",
        f"Trained on {record['data']['train']} ({record['data']['questions']['train']} questions), validated on "
        f"{record['data']['validation']} ({record['data']['questions']['validation']} questions). Kept: seed "
        f"{best['seed']}, epoch {best['epoch']}, validation accuracy {best['validation_accuracy']:.4f}.",
        "",
        "| epoch | train loss | validation accuracy | validation loss |",
        "|---|---|---|---|",
    ]
    for e in epochs:
        train = "-" if e["train_loss"] is None else f"{e['train_loss']:.4f}"
        lines.append(f"| {e['epoch']} | {train} | {e['validation_accuracy']:.4f} | {e['validation_loss']:.4f} |")
    return "\n".join(lines) + "\n"
