"""The ensembling study's three trained combiners, as plain torch modules.

Input: x ∈ R^{B×M×O}, member m's output on question b reduced to the O answer options (its last-position logits
over the option tokens, or its per-option log-likelihoods), standardised per member with the training set's
mean and spread (stored with the combiner). Output: R^{B×O} logits over the options; the predicted answer is
their argmax and log softmax gives each option's log-likelihood. `weighted` and `late_fusion` start as the plain
average of the members (training moves away from the fixed-weight ensemble only where the data says so).
"""

from __future__ import annotations

import torch
from torch import nn

COMBINERS = ("weighted", "late_fusion", "transformer")


class Standardize(nn.Module):
    """x̂_m = (x_m − μ_m) / σ_m, one (μ, σ) per member over every option of every training question."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(members))
        self.register_buffer("std", torch.ones(members))

    def fit(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(dim=(0, 2)))
        self.std.copy_(features.std(dim=(0, 2)).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean[:, None]) / self.std[:, None]


class WeightedAverage(nn.Module):
    """z = Σ_m a_m x̂_m with a = softmax(v) (learned member weights), then y = W z + b (O×O)."""

    def __init__(self, members: int, options: int) -> None:
        super().__init__()
        self.standardize = Standardize(members)
        self.member_logits = nn.Parameter(torch.zeros(members))
        self.out = nn.Linear(options, options)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(options))
            self.out.bias.zero_()

    def member_weights(self) -> torch.Tensor:
        return torch.softmax(self.member_logits, dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        combined = torch.einsum("m,bmo->bo", self.member_weights(), self.standardize(features))
        return self.out(combined)


class LateFusion(nn.Module):
    """y = W [x̂_1; …; x̂_M] + b: one linear layer over the members' concatenated outputs (W ∈ R^{O×MO})."""

    def __init__(self, members: int, options: int) -> None:
        super().__init__()
        self.standardize = Standardize(members)
        self.out = nn.Linear(members * options, options)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(options).repeat(1, members) / members)
            self.out.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.standardize(features).flatten(1))


class TransformerFusion(nn.Module):
    """h_m = E x̂_m + p_m (a token per member, p_m a learned member embedding); H = Block(h_1..h_M), one
    unmasked self-attention block (pre-norm attention and MLP, residuals); y = W [H_1; …; H_M] + b."""

    def __init__(self, members: int, options: int, width: int = 32, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.standardize = Standardize(members)
        self.embed = nn.Linear(options, width)
        self.member_embedding = nn.Parameter(torch.zeros(members, width))
        self.block = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=dropout, batch_first=True, norm_first=True
        )
        self.out = nn.Linear(members * width, options)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.standardize(features)) + self.member_embedding
        return self.out(self.block(tokens).flatten(1))


def build_combiner(kind: str, members: int, options: int, **kwargs: int | float) -> nn.Module:
    if kind == "weighted":
        return WeightedAverage(members, options)
    if kind == "late_fusion":
        return LateFusion(members, options)
    if kind == "transformer":
        return TransformerFusion(members, options, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown combiner {kind!r} (one of {', '.join(COMBINERS)})")
