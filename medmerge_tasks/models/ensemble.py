"""`--model medmerge-ensemble`: combine several models' predictions (BioMistral's "Ensemble" row).

    lm_eval --model medmerge-ensemble \\
        --model_args pretrained=BioMistral/BioMistral-7B|mistralai/Mistral-7B-Instruct-v0.1,weights=0.5|0.5,combine=prob

Weights are normalised to sum to 1; members with weight 0 are never loaded. `combine`:
  prob     log Σ_i w_i p_i(continuation)      the paper's ensemble (a mixture of the models)
  logprob  Σ_i w_i log p_i(continuation)      a product of experts
For `loglikelihood` (every multiple-choice task) each member scores all requests with lm-eval's own `hf` model
and the scores are combined; with `sequential=true` members are loaded one at a time (all requests through
A, free it, then B), so a 2x7B ensemble fits where one 7B fits. `generate_until` decodes greedily from the
per-step combination of the members' next-token distributions (all members in memory). Every other model
argument (dtype, device, batch_size, ...) is passed to each member. Members must share one tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import LM

from medmerge_common.quantization import free_memory

COMBINES = ("prob", "logprob")


def combine_loglikelihoods(lls: Sequence[float], weights: Sequence[float], combine: str) -> float:
    """One continuation's combined log-likelihood from the members' (weights positive, summing to 1)."""
    if combine == "logprob":
        return math.fsum(w * ll for w, ll in zip(weights, lls))
    terms = [ll + math.log(w) for ll, w in zip(lls, weights)]
    top = max(terms)
    if top == -math.inf:
        return top
    return top + math.log(math.fsum(math.exp(t - top) for t in terms))


def combine_next_token(logprobs: Sequence[torch.Tensor], weights: Sequence[float], combine: str) -> torch.Tensor:
    """The members' next-token log-distributions combined the same way (mixture or product)."""
    stacked = torch.stack([lp.double() for lp in logprobs])
    w = torch.tensor(list(weights), dtype=torch.float64).reshape(-1, 1)
    if combine == "logprob":
        return (w * stacked).sum(dim=0)
    return torch.logsumexp(stacked + w.log(), dim=0)


def parse_members(pretrained: str, weights: str | None) -> tuple[list[str], list[float]]:
    """'A|B', '0.7|0.3' -> (['A', 'B'], [0.7, 0.3]) normalised; zero-weight members dropped."""
    members = [m for m in str(pretrained).split("|") if m]
    if len(members) < 1:
        raise ValueError("medmerge-ensemble: pretrained=A|B names the member models")
    raw = [1.0] * len(members) if weights in (None, "") else [float(w) for w in str(weights).split("|")]
    if len(raw) != len(members):
        raise ValueError(f"medmerge-ensemble: {len(members)} models but {len(raw)} weights")
    if any(w < 0 for w in raw) or sum(raw) <= 0:
        raise ValueError("medmerge-ensemble: weights must be non-negative and not all zero")
    total = sum(raw)
    kept = [(m, w / total) for m, w in zip(members, raw) if w > 0]
    return [m for m, _ in kept], [w for _, w in kept]


def check_shared_tokenizer(members: Sequence[str], **kwargs: Any) -> None:
    """Raise ValueError naming the first member whose vocabulary differs from the first member's."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(members[0], **kwargs).get_vocab()
    for member in members[1:]:
        vocab = AutoTokenizer.from_pretrained(member, **kwargs).get_vocab()
        if vocab != reference:
            differing = len(set(vocab.items()) ^ set(reference.items()))
            raise ValueError(
                f"medmerge-ensemble: {member} does not share {members[0]}'s tokenizer "
                f"({differing} vocabulary entries differ); ensembles need one tokenizer"
            )


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("true", "1", "yes")


class EnsembleLM(LM):
    def __init__(
        self,
        pretrained: str,
        weights: str | None = None,
        combine: str = "prob",
        sequential: bool | str = False,
        **member_kwargs: Any,
    ) -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"medmerge-ensemble: combine must be prob or logprob, got {combine!r}")
        self.members, self.weights = parse_members(pretrained, weights)
        self.combine = combine
        self.sequential = _truthy(sequential)
        self.member_kwargs = member_kwargs
        check_shared_tokenizer(self.members, trust_remote_code=_truthy(member_kwargs.get("trust_remote_code")))
        self._loaded: dict[str, Any] = {}
        if not self.sequential:
            for member in self.members:
                self._member(member)

    def _member(self, name: str) -> Any:
        from lm_eval.models.huggingface import HFLM

        if name not in self._loaded:
            self._loaded[name] = HFLM(pretrained=name, **self.member_kwargs)
        return self._loaded[name]

    def _release(self, name: str) -> None:
        if self.sequential:
            self._loaded.pop(name, None)
            free_memory()

    def _per_member(self, method: str, requests: list[Any]) -> list[list[Any]]:
        results = []
        for name in self.members:
            results.append(getattr(self._member(name), method)(requests))
            self._release(name)
        return results

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        per_member = self._per_member("loglikelihood", requests)
        return [
            (
                combine_loglikelihoods([r[i][0] for r in per_member], self.weights, self.combine),
                all(r[i][1] for r in per_member),
            )  # greedy under every member (exact only for one member)
            for i in range(len(requests))
        ]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        if self.combine != "logprob" and len(self.members) > 1:
            raise NotImplementedError(
                "medmerge-ensemble: rolling log-likelihood (perplexity tasks) needs "
                "combine=logprob; a mixture must be combined token by token"
            )
        per_member = self._per_member("loglikelihood_rolling", requests)
        return [math.fsum(w * r[i] for w, r in zip(self.weights, per_member)) for i in range(len(requests))]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        lms = [self._member(name) for name in self.members]  # every member is needed at every step
        return [self._greedy(lms, *request.args) for request in requests]

    @torch.no_grad()
    def _greedy(self, lms: list[Any], context: str, gen_kwargs: dict[str, Any]) -> str:
        first = lms[0]
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", first.max_gen_toks))
        ids = torch.tensor([first.tok_encode(context)])
        pasts: list[Any] = [None] * len(lms)
        step_input = ids
        generated: list[int] = []
        text = ""
        for _ in range(max_new):
            logprobs = []
            for i, lm in enumerate(lms):
                out = lm.model(input_ids=step_input.to(lm.device), past_key_values=pasts[i], use_cache=True)
                pasts[i] = out.past_key_values
                logprobs.append(torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu())
            token = int(combine_next_token(logprobs, self.weights, self.combine).argmax())
            if token == first.tokenizer.eos_token_id:
                break
            generated.append(token)
            text = first.tok_decode(generated)
            if any(stop in text for stop in until):
                break
            step_input = torch.tensor([[token]])
        for stop in until:
            text = text.split(stop)[0]
        return text
