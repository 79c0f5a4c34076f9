"""`medmerge fisher MODEL --data ... -o FISHER_DIR`: a model's diagonal Fisher information, for the `fisher` merge
method (Matena & Raffel, NeurIPS 2022, arXiv:2111.09832).

    F(j) = 1/N Σ_n ( ∂/∂θ_j  log p_θ(y_n | x_n) )²

over N calibration texts x_n, one text at a time (a squared sum of per-text gradients, not the square of a batch's).
y_n is either sampled from the model at every position (`--estimator model`, the paper's Fisher: the expectation
over the model's own predictions) or the text's own next tokens (`--estimator empirical`, the empirical Fisher).
FISHER_DIR holds the Fisher under the model's tensor names (float32 safetensors, sharded like a model) and
fisher.json (model, data, estimator, texts, tokens, seed). Runs on any device; memory: the model, its gradients and
one float32 Fisher per weight.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from medmerge_common.errors import UserError
from medmerge_common.outdir import atomic_output_dir
from merge.io.checkpoint import OutputTensor
from merge.io.hub import input_dirs
from merge.io.writer import ShardedWriter

Say = Callable[[str], None]
RECORD = "fisher.json"


def calibration_texts(source: str) -> list[str]:
    """Texts to estimate on: a .txt file (one text per non-empty line), a .jsonl file of {"text": ...} records, or
    any labelled source `medmerge moe train-router` reads (medmcqa, a MedMCQA-schema file, task:NAME[:SPLIT]),
    each question with its right answer."""
    path = Path(source)
    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError("--data: no such file", file=path)
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".jsonl" and path.is_file() and '"text"' in path.read_text(encoding="utf-8")[:10_000]:
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"not a JSON record ({exc.msg})", file=path, line=number) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError('expected a record with a "text" string', file=path, line=number)
            texts.append(record["text"])
    else:
        from medmerge.labelled import labelled_prompts

        texts = [p.context + p.continuations[p.gold] for p in labelled_prompts(source, "--data")]
    if not texts:
        raise UserError(f"--data {source}: no texts to estimate the Fisher on")
    return texts


def estimate_fisher(
    model_ref: str,
    data: str,
    out: Path,
    *,
    estimator: Literal["model", "empirical"] = "model",
    limit: int | None = None,
    max_length: int = 512,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
    say: Say = print,
) -> dict[str, Any]:
    """Estimate `model_ref`'s diagonal Fisher on `data` and write FISHER_DIR `out` (whole or not at all)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge.run import check_device

    target = check_device(device)
    texts = calibration_texts(data)[:limit] if limit else calibration_texts(data)
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=getattr(torch, dtype)).to(target)
    model.eval()  # dropout off: the Fisher of the model as it predicts
    named = model.state_dict(keep_vars=True)  # every name the checkpoint uses (tied weights: two names, one tensor)
    params = list(dict.fromkeys(p for p in named.values() if isinstance(p, torch.nn.Parameter) and p.requires_grad))
    fisher = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=target) for p in params}
    generator = torch.Generator(device=target).manual_seed(seed)
    tokens, started = 0, time.monotonic()
    for n, text in enumerate(texts, 1):
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].to(target)
        if ids.shape[1] < 2:
            raise UserError(f"--data: text {n} is shorter than two tokens: {text[:60]!r}")
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        if estimator == "model":
            targets = torch.multinomial(log_probs.exp().detach(), 1, generator=generator)[:, 0]
        else:
            targets = ids[0, 1:]
        log_likelihood = log_probs.gather(1, targets[:, None]).sum()
        for p, grad in zip(params, torch.autograd.grad(log_likelihood, params)):
            fisher[id(p)].add_(grad.float().square())
        tokens += ids.shape[1] - 1
        if n == len(texts) or n % max(1, len(texts) // 10) == 0:
            say(f"[fisher] {n}/{len(texts)} texts, {tokens} tokens, {time.monotonic() - started:.1f}s")
    names = [name for name, p in named.items() if isinstance(p, torch.nn.Parameter) and id(p) in fisher]
    outputs = [OutputTensor(name, torch.float32, tuple(named[name].shape)) for name in names]
    record = {
        "method": "diagonal Fisher (Matena & Raffel 2022): mean over texts of the squared gradient of log p(y|x)",
        "model": model_ref,
        "data": data,
        "data_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
        "estimator": estimator,
        "texts": len(texts),
        "tokens": tokens,
        "max_length": max_length,
        "dtype": dtype,
        "seed": seed,
    }
    with atomic_output_dir(out, overwrite, inputs=input_dirs(model_ref), say=say) as staging:
        writer = ShardedWriter(staging, outputs, 5 * 10**9, {"medmerge_fisher": estimator})
        try:
            for item in outputs:
                writer.write(item.name, (fisher[id(named[item.name])] / len(texts)).cpu())
            writer.close()
        finally:
            writer.abort()
        (staging / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    say(f"wrote {out}: the Fisher of {len(names)} tensors over {len(texts)} texts ({tokens} tokens)")
    return record
