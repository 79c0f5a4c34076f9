"""Multiple-choice questions scored as lm-eval's `hf` model scores them, for code that trains on them.

lm-eval scores option i of a question as log P(continuation_i | context), the context and continuation encoded
as `_encode_pair` does (trailing spaces of the context moved into the continuation, the whole encoded and split
at the context's length, the tokenizer's own special tokens). Training on the same encoding means that what is
trained is what `lm_eval --model hf` measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class EncodedQuestion:
    """One question: the distinct model inputs its options need and where each option's tokens are read.

    Option i's tokens t_1..t_m follow the context c: the model reads input c + t_1..t_{m-1} and t_j is scored at
    position len(c) - 2 + j. Options of one token share one input (the context)."""

    inputs: tuple[tuple[int, ...], ...]
    option_input: tuple[int, ...]  # index into `inputs`, per option
    option_tokens: tuple[tuple[int, ...], ...]  # the continuation tokens of each option
    context_length: int
    gold: int


def encode_question(tokenizer: Any, context: str, continuations: list[str], gold: int) -> EncodedQuestion:
    """Encode a question as lm-eval 0.4's `_encode_pair` does for a causal model."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuations = [context[-spaces:] + c for c in continuations]
        context = context[:-spaces]
    context_ids = _encode(tokenizer, context)
    inputs: dict[tuple[int, ...], int] = {}
    option_input, option_tokens = [], []
    for continuation in continuations:
        whole = _encode(tokenizer, context + continuation)
        tokens = tuple(whole[len(context_ids) :])
        if not tokens:
            raise ValueError(f"option {continuation!r} encodes to no tokens after the context")
        model_input = tuple(context_ids) + tokens[:-1]
        option_input.append(inputs.setdefault(model_input, len(inputs)))
        option_tokens.append(tokens)
    return EncodedQuestion(tuple(inputs), tuple(option_input), tuple(option_tokens), len(context_ids), gold)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """lm-eval's tok_encode: the tokenizer's default special tokens, none added to text that starts with BOS."""
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=special))


def batch_inputs(
    questions: list[EncodedQuestion], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask): every distinct input of the questions, in order, right-padded."""
    rows = [model_input for q in questions for model_input in q.inputs]
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def option_loglikelihoods(logits: torch.Tensor, questions: list[EncodedQuestion]) -> list[torch.Tensor]:
    """Per question, the (options,) log-likelihoods of its options, from the model's logits on `batch_inputs`
    (differentiable: a trainer may back-propagate through them)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out, first_row = [], 0
    for q in questions:
        scores = []
        for option, tokens in enumerate(q.option_tokens):
            row = logprobs[first_row + q.option_input[option]]
            start = q.context_length - 1
            positions = torch.arange(start, start + len(tokens), device=row.device)
            scores.append(row[positions, torch.tensor(tokens, device=row.device)].sum())
        out.append(torch.stack(scores))
        first_row += len(q.inputs)
    return out


@dataclass(frozen=True)
class ChoicePrompt:
    """One labelled multiple-choice question as lm-eval scores it: the context, each option's continuation (with
    its leading delimiter, e.g. " B"), and the index of the right one."""

    context: str
    continuations: tuple[str, ...]
    gold: int
    id: str = ""


def encode_prompts(tokenizer: Any, prompts: list[ChoicePrompt]) -> list[EncodedQuestion]:
    return [encode_question(tokenizer, p.context, list(p.continuations), p.gold) for p in prompts]


def single_token_options(questions: list[EncodedQuestion]) -> bool:
    """Whether every option of every question is one token (then its logit at the context's last position is the
    model's whole output for it)."""
    return all(len(tokens) == 1 for q in questions for tokens in q.option_tokens)


def option_logits(logits: torch.Tensor, questions: list[EncodedQuestion]) -> list[torch.Tensor]:
    """Per question, the (options,) raw logits of each option's first token at the context's last position: the
    model's last-position output reduced to the answer options (from the model's logits on `batch_inputs`)."""
    out, first_row = [], 0
    for q in questions:
        position = q.context_length - 1
        rows = torch.tensor([first_row + i for i in q.option_input], device=logits.device)
        first = torch.tensor([tokens[0] for tokens in q.option_tokens], device=logits.device)
        out.append(logits[rows, position, first].float())
        first_row += len(q.inputs)
    return out
