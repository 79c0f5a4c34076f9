"""Routing a batch of tokens to experts: the linear and noisy top-k routers, expert capacity, load balancing.

Pure functions on tensors; `medmerge moe train-router` (router_training.py) puts them in a model. At inference
(noise off, no capacity) both routers are exactly the router a Mixtral / Qwen MoE checkpoint runs, so what is
trained is what `transformers` and lm-eval evaluate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    weights: torch.Tensor  # (T, k) float32: each token's weight for its k chosen experts (0 where dropped)
    experts: torch.Tensor  # (T, k) long: the chosen experts, in rank order
    kept: torch.Tensor  # (T, k) bool: the slots within their expert's capacity (all, without capacity)
    probabilities: torch.Tensor  # (T, E) float32: softmax of the (noisy) logits, for the load-balancing loss


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    noise: float = 0.0,
    capacity_factor: float | None = None,
    valid: torch.Tensor | None = None,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> Routing:
    """Top-k routing of T tokens among E experts, with optional Gaussian logit noise and expert capacity.

    Noisy top-k gating (Shazeer et al. 2017, eqs. 3-5; here with a fixed noise scale σ = `noise`):

        H(x) = x·W_g + σ·ε,   ε ~ N(0, I)          (σ = 0: the plain linear router)
        G(x) = softmax(KeepTopK(H(x), k))          = softmax(H)_i / Σ_{j ∈ topk} softmax(H)_j  on the top k

    which is Mixtral's router (`normalize`; without it, Qwen's norm_topk_prob = false, G keeps softmax(H) on the
    top k). Expert capacity (Switch Transformer, Fedus et al. 2022; GShard's k-slot form):

        C = ceil(k · T / E · capacity_factor)

    token slots per expert per batch, T counting the `valid` (non-padding) tokens only. Slots claim their expert in
    rank order (every token's first choice before any second choice), then token order; a slot past C is dropped:
    its weight is 0, so the token's other expert, or the residual stream, carries it. (Its expert index stays a real
    one: transformers' grouped experts kernels handle an out-of-range "dropped" index only under expert
    parallelism, and read past the weights otherwise.)"""
    tokens, num_experts = logits.shape
    logits = logits.float()
    if noise > 0:
        logits = logits + noise * torch.randn(logits.shape, generator=generator, device=logits.device)
    probabilities = torch.softmax(logits, dim=-1)
    top, experts = torch.topk(probabilities, top_k, dim=-1)
    weights = top / top.sum(dim=-1, keepdim=True) if normalize else top
    kept = torch.ones_like(experts, dtype=torch.bool)
    if capacity_factor is not None:
        valid_mask = torch.ones(tokens, dtype=torch.bool, device=logits.device) if valid is None else valid.bool()
        capacity = expert_capacity(int(valid_mask.sum()), num_experts, top_k, capacity_factor)
        kept = within_capacity(experts, num_experts, capacity, valid_mask)
        weights = weights * kept
    return Routing(weights, experts, kept, probabilities)


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(k · T / E · capacity_factor): the token slots one expert takes per batch."""
    return math.ceil(top_k * tokens / num_experts * capacity_factor)


def within_capacity(chosen: torch.Tensor, num_experts: int, capacity: int, valid: torch.Tensor) -> torch.Tensor:
    """(T, k) bool: which chosen slots fit their expert's capacity, claimed in rank order, then token order.
    Invalid (padding) tokens claim nothing and are kept (they are masked out of attention and loss anyway)."""
    slots = torch.nn.functional.one_hot(chosen.T.reshape(-1), num_experts)  # (k·T, E), rank-major
    slots = slots * valid.repeat(chosen.shape[1]).unsqueeze(-1)
    position = (slots.cumsum(dim=0) * slots).sum(dim=-1)  # 1-based place in the expert's queue; 0 for padding
    kept = position <= capacity
    return kept.view(chosen.shape[1], -1).T


def load_balancing_loss(routing: Routing, num_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss (Fedus et al. 2022, eq. 4), for top-k routing:

        L_aux = E · Σ_i f_i · P_i,   f_i = (1/(k·T)) Σ_t Σ_{r<k} 1{chosen_{t,r} = i},   P_i = (1/T) Σ_t p_i(x_t)

    over the T valid tokens: f_i is the fraction of slots the router sends to expert i (before capacity), P_i its
    mean router probability. It is 1 when routing is uniform and grows as it concentrates; the trainer multiplies
    it by its coefficient (α)."""
    chosen, probabilities = routing.experts, routing.probabilities
    if valid is not None:
        chosen, probabilities = chosen[valid.bool()], probabilities[valid.bool()]
    if chosen.numel() == 0:
        return probabilities.sum() * 0
    fraction = torch.nn.functional.one_hot(chosen, num_experts).float().mean(dim=(0, 1))
    return num_experts * (fraction * probabilities.mean(dim=0)).sum()


def choice_counts(
    experts: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """(E,) long: how many valid tokens chose each expert (among their k); only the `kept` slots, if given."""
    counted = torch.ones_like(experts, dtype=torch.bool) if kept is None else kept.bool()
    if valid is not None:
        counted = counted & valid.bool().unsqueeze(-1)
    return torch.bincount(experts[counted], minlength=num_experts)
