"""What a combiner sees of its members: each member's output on each question reduced to the answer options,
computed once per member and question and cached on disk.

Per question and member, two (options,) vectors from one forward pass, the question encoded as lm-eval's `hf`
model encodes it (medmerge_tasks.choices):
  loglikelihoods   log P(continuation_i | context), what lm-eval's `acc` compares
  option_logits    the raw logits of each option's token at the context's last position (options of one token)

The cache holds, per member identity (a fingerprint of its files) and loading settings (dtype, quantization),
chunks of rows keyed by a digest of each question's token ids and label: a later training on the same or
overlapping questions runs the member only on the questions it has not seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from medmerge_common.errors import UserError
from medmerge_common.hub import hub_reachable, local_dir, split_ref
from medmerge_common.quantization import free_memory, load_causal_lm, model_dtype
from medmerge_tasks.choices import (
    ChoicePrompt,
    EncodedQuestion,
    batch_inputs,
    encode_prompts,
    option_logits,
    option_loglikelihoods,
    single_token_options,
)

FEATURES = ("option_logits", "loglikelihoods")
SAMPLES_PER_FILE = 16  # evenly spaced 64 KiB reads per weight file: a retrained model changes them
SAMPLE_BYTES = 1 << 16
Step = Callable[[int, int], None]


class Member(BaseModel):
    """One member model: a directory or hub id, loaded as lm-eval's `hf` / `medmerge-hf` would load it; BASE+ADAPTER
    is the base with a PEFT adapter on top (lm-eval's `peft`)."""

    model_config = ConfigDict(extra="forbid")
    pretrained: str
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: bfloat16 on CUDA, else float32
    quantization: Literal["4bit", "8bit"] | None = None

    def torch_dtype(self, device: str) -> torch.dtype:
        return model_dtype(self.dtype, device)

    @property
    def base(self) -> str:
        return self.pretrained.partition("+")[0]

    @property
    def adapter(self) -> str | None:
        return self.pretrained.partition("+")[2] or None


def member_directory(member: Member) -> Path:
    """The member's (base model's) local files: a directory, its copy under $MEDMERGE_MODEL_DIR, or the hub's
    snapshot (downloaded, or found in the hub cache offline)."""
    return _files(member.base)


def adapter_directory(member: Member) -> Path | None:
    """The member's adapter files (BASE+ADAPTER), found as a model's are; None without one."""
    return None if member.adapter is None else _files(member.adapter)


def _files(ref: str) -> Path:
    directory = local_dir(ref)
    if directory is not None:
        return directory
    from huggingface_hub import snapshot_download

    repo, revision = split_ref(ref)
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=not hub_reachable()))
    except Exception as exc:  # network, auth, missing repo: all the user's to fix
        raise UserError(f"{ref}: not a directory, and the hub gave {type(exc).__name__}: {exc}") from None


def fingerprint(directory: Path) -> str:
    """A digest of a model's identity: config.json, and per weight file its size, its header and evenly spaced
    samples of its bytes (reading 1 MiB per file, not the whole model, so checking it costs well under a second)."""
    digest = hashlib.sha256()
    config = directory / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    weights = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise UserError(f"{directory}: holds no weight files (*.safetensors, *.bin)")
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as file:
            for i in range(SAMPLES_PER_FILE):
                file.seek(max(0, size - SAMPLE_BYTES) * i // max(1, SAMPLES_PER_FILE - 1))
                digest.update(file.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def member_fingerprint(member: Member, directory: Path | None = None) -> str:
    """The member's identity: its base's fingerprint, and with an adapter, the adapter's (its adapter_config.json
    and weights) folded in. `directory`: the base's files, where the caller has already found them."""
    identity = fingerprint(directory or member_directory(member))
    adapter = adapter_directory(member)
    if adapter is None:
        return identity
    config = adapter / "adapter_config.json"
    folded = [identity, fingerprint(adapter), config.read_text() if config.is_file() else ""]
    return hashlib.sha256("\0".join(folded).encode()).hexdigest()[:32]


def question_key(question: EncodedQuestion) -> bytes:
    """16 bytes naming what a member's features of a question depend on: its inputs, options and label."""
    text = json.dumps([question.inputs, question.option_input, question.option_tokens, question.gold])
    return hashlib.sha256(text.encode()).digest()[:16]


def load_member(member: Member, directory: Path, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) as lm-eval's hf model loads them, in the member's dtype (4/8-bit with quantization)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = load_causal_lm(str(directory), member.torch_dtype(device), device, member.quantization)
    adapter = adapter_directory(member)
    if adapter is not None:  # as lm-eval's hf model applies `peft`: the adapter on top, not merged in
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model, tokenizer


@torch.no_grad()
def compute_features(
    model: Any, questions: list[EncodedQuestion], pad_id: int, batch_size: int, step: Step | None = None
) -> dict[str, torch.Tensor]:
    """{loglikelihoods, option_logits}: (questions, options) float32 each (option_logits NaN where an option has
    more than one token), from one forward pass per distinct input."""
    device = next(model.parameters()).device
    options = len(questions[0].option_tokens) if questions else 0
    lls, logits_out = [], []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        ids, mask = batch_inputs(batch, pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        lls += [s.cpu() for s in option_loglikelihoods(logits, batch)]
        if single_token_options(batch):
            logits_out += [s.cpu() for s in option_logits(logits, batch)]
        else:
            logits_out += [torch.full((options,), torch.nan)] * len(batch)
        if step:
            step(min(start + batch_size, len(questions)), len(questions))
    return {"loglikelihoods": torch.stack(lls), "option_logits": torch.stack(logits_out)}


def pad_token(tokenizer: Any) -> int:
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


class FeatureCache:
    """Features per member and question under `root/<member fingerprint>-<dtype>-<quantization>/`, in chunk
    files of rows (a `keys` (rows, 16) uint8 tensor beside the features), each written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, member: Member, fingerprint: str, device: str) -> Path:
        dtype = str(member.torch_dtype(device)).removeprefix("torch.")
        return self.root / f"{fingerprint}-{dtype}-{member.quantization or 'full'}"

    def lookup(self, member: Member, fingerprint: str, device: str) -> dict[bytes, dict[str, torch.Tensor]]:
        rows: dict[bytes, dict[str, torch.Tensor]] = {}
        directory = self._dir(member, fingerprint, device)
        for chunk in sorted(directory.glob("chunk-*.safetensors")) if directory.is_dir() else []:
            tensors = load_file(str(chunk))
            for i, key in enumerate(tensors["keys"]):
                rows[bytes(key.tolist())] = {name: tensors[name][i] for name in FEATURES}
        return rows

    def store(
        self, member: Member, fingerprint: str, device: str, keys: list[bytes], features: dict[str, torch.Tensor]
    ) -> None:
        directory = self._dir(member, fingerprint, device)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8)} | {
            name: features[name].contiguous() for name in FEATURES
        }
        name = f"chunk-{uuid.uuid4().hex[:12]}.safetensors"
        staging = directory / f".{name}.partial"
        save_file(tensors, str(staging), metadata={"member": member.pretrained})
        os.replace(staging, directory / name)


def member_features(
    member: Member,
    prompts: list[ChoicePrompt],
    *,
    device: str,
    batch_size: int,
    cache: FeatureCache | None,
    say: Callable[[str], None] = lambda _: None,
    step: Step | None = None,
    directory: Path | None = None,
) -> tuple[dict[str, torch.Tensor], str, int]:
    """Member `member`'s features of `prompts` (rows in order), from the cache where it has them: (features,
    the member's fingerprint, how many questions the member had to run on). `directory`: the member's files,
    where the caller has already found them."""
    from transformers import AutoTokenizer

    directory = directory or member_directory(member)
    identity = member_fingerprint(member, directory)
    questions = encode_prompts(AutoTokenizer.from_pretrained(str(directory)), prompts)
    keys = [question_key(q) for q in questions]
    cached = cache.lookup(member, identity, device) if cache else {}
    missing = [i for i, key in enumerate(keys) if key not in cached]
    if missing:
        cached_count = len(keys) - len(missing)
        say(f"{member.pretrained}: running on {len(missing)} of {len(keys)} questions ({cached_count} cached)")
        model, tokenizer = load_member(member, directory, device)
        try:
            computed = compute_features(model, [questions[i] for i in missing], pad_token(tokenizer), batch_size, step)
        finally:
            del model
            free_memory()
        if cache:
            cache.store(member, identity, device, [keys[i] for i in missing], computed)
        for row, i in enumerate(missing):
            cached[keys[i]] = {name: computed[name][row] for name in FEATURES}
    else:
        say(f"{member.pretrained}: all {len(keys)} questions cached")
    features = {name: torch.stack([cached[key][name] for key in keys]) for name in FEATURES}
    return features, identity, len(missing)
