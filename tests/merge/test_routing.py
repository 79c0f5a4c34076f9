"""Routing math (merge/moe/routing.py): Mixtral's router at inference, noisy top-k, expert capacity, balancing."""

from __future__ import annotations

import math

import pytest
import torch

from merge.moe.routing import choice_counts, expert_capacity, load_balancing_loss, route, within_capacity


def test_without_noise_or_capacity_it_is_the_mixtral_router_of_transformers() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    config = MixtralConfig(hidden_size=16, num_local_experts=4, num_experts_per_tok=2)
    router = MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(11, 16, generator=torch.Generator().manual_seed(1))
    logits, weights, experts = router(hidden)
    mine = route(logits, 2)
    assert torch.equal(mine.experts, experts)
    torch.testing.assert_close(mine.weights, weights, rtol=0, atol=1e-7)


def test_without_normalisation_the_top_k_keep_their_softmax_probabilities() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    routing = route(logits, 2, normalize=False)
    torch.testing.assert_close(routing.weights, torch.softmax(logits, -1)[:, :2])
    assert torch.equal(route(logits, 2).weights.sum(-1), torch.tensor([1.0]))


def test_noise_is_seeded_and_changes_choices_only_within_its_scale() -> None:
    logits = torch.zeros(200, 4) + torch.tensor([3.0, 0.0, 0.0, 0.0])

    def noisy(seed: int, noise: float) -> torch.Tensor:
        return route(logits, 1, noise=noise, generator=torch.Generator().manual_seed(seed)).experts

    assert torch.equal(noisy(3, 1.0), noisy(3, 1.0))
    assert not torch.equal(noisy(3, 1.0), noisy(4, 1.0))
    assert (noisy(3, 0.01) == 0).all()  # a margin of 3 is never crossed by noise of 0.01
    share = (noisy(3, 1.0) == 0).float().mean()
    assert 0.8 < share < 0.99  # N(0,1) noise on a margin of 3: expert 0 still wins most tokens, not all


def test_capacity_is_the_switch_formula_and_no_expert_takes_more() -> None:
    assert expert_capacity(10, 4, 2, 1.25) == math.ceil(2 * 10 / 4 * 1.25) == 7
    assert expert_capacity(8, 2, 1, 1.0) == 4
    logits = torch.tensor([[5.0, 0.0]] * 8)  # every token prefers expert 0
    routing = route(logits, 1, capacity_factor=1.0)
    assert routing.kept[:, 0].tolist() == [True] * 4 + [False] * 4 and (routing.experts == 0).all()
    assert torch.equal(routing.weights, torch.tensor([[1.0]] * 4 + [[0.0]] * 4))
    assert choice_counts(routing.experts, 2).tolist() == [8, 0]  # what the router chose
    assert choice_counts(routing.experts, 2, kept=routing.kept).tolist() == [4, 0]  # what capacity let through


def test_first_choices_claim_capacity_before_second_choices() -> None:
    # 4 tokens, 2 experts, top-2, capacity 1: one slot per expert
    chosen = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]])
    kept = within_capacity(chosen, 2, 1, torch.ones(4, dtype=torch.bool))
    # first choices in token order: token 0 takes expert 1, token 1 takes expert 0; nothing else fits
    assert kept.tolist() == [[True, False], [True, False], [False, False], [False, False]]


def test_padding_takes_no_capacity_and_is_not_counted() -> None:
    logits = torch.tensor([[5.0, 0.0]] * 6)
    valid = torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool)
    routing = route(logits, 1, capacity_factor=1.0, valid=valid)  # C = ceil(1·4/2·1) = 2 for the 4 real tokens
    assert routing.kept[:, 0].tolist() == [True, True, True, True, False, False]
    assert choice_counts(routing.experts, 2, valid, routing.kept).tolist() == [2, 0]


def test_load_balancing_loss_is_one_when_uniform_and_e_when_collapsed() -> None:
    uniform = route(torch.zeros(8, 4) + torch.eye(4).repeat(2, 1) * 1e-3, 1)
    assert load_balancing_loss(uniform, 4).item() == pytest.approx(1.0, abs=1e-3)
    collapsed = route(torch.tensor([[50.0, 0.0, 0.0, 0.0]] * 8), 1)
    assert load_balancing_loss(collapsed, 4).item() == pytest.approx(4.0, abs=1e-3)
    valid = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    mixed = route(torch.cat([torch.zeros(4, 4) + torch.eye(4) * 1e-3, torch.tensor([[50.0, 0, 0, 0]] * 4)]), 1)
    assert load_balancing_loss(mixed, 4, valid).item() == pytest.approx(1.0, abs=1e-3)  # padding not counted


def test_load_balancing_gradient_pushes_probability_away_from_the_busy_expert() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]] * 8, requires_grad=True)
    load_balancing_loss(route(logits, 1), 4).backward()
    assert logits.grad is not None and (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()
