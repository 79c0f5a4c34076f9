"""Gate (router) rows for a mixture of experts built from dense models, as mergekit-moe initialises them.

For expert e and layer l, with P_e its positive and N_e its negative prompts:

    hidden, hidden_last:  g_{l,e} = n( mean_{p∈P_e} h_l(p)[-1] − mean_{q∈N_e} h_l(q)[-1] )
    hidden_avg:           the same with h_l(p) averaged over the padded positions instead of the last one
    cheap_embed:          g_{l,e} = n( c(P_e) − c(N_e) ),  c(S) = n( Σ_{p∈S} Σ_t E[x_{p,t}] )   (every layer alike)
    random:               g ~ N(0, 1);   uniform_random: g ~ U(−1/√d, 1/√d) (torch.nn.Linear's initialisation)

where h_l(p) is the hidden state entering decoder layer l (the embeddings for l = 0), E the base's token
embeddings, n(v) = v / max(‖v‖₂, 1e-8), and a missing N_e contributes nothing. The router then scores a token
x at layer l by g_{l,e} · x, so an expert is chosen for tokens that look like its prompts.

Hidden states come from the base model in bfloat16 by default (mergekit's choice, kept so the rows agree with it
to the bit; float32 is ~5x faster on CPUs without bfloat16 units, and rows then differ in their last bits). Prompts
are prefixed with the BOS text and left-padded with BOS, so the last position is always a prompt token
(hidden_avg does average over the padding, as mergekit does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from merge.moe.config import Expert

Encode = Callable[[Sequence[str]], torch.Tensor]  # prompts -> (layers, hidden)


def prompt_tokenizer(tokenizer: Any) -> Any:
    """The base's tokenizer set up as mergekit-moe uses it: left padding with the BOS token (EOS without one)."""
    tokenizer.padding_side = "left"
    if tokenizer.bos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.bos_token_id
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of the prompts, each prefixed with the BOS text, left-padded to one length."""
    batch = tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def hidden_state_means(model: Any, batch: dict[str, torch.Tensor], *, average_positions: bool) -> torch.Tensor:
    """(layers, hidden): over the prompts, the mean of the hidden state entering each decoder layer, taken at the
    last position or averaged over all positions. Sums divided by counts in the model's dtype, as mergekit."""
    device = next(model.parameters()).device
    with torch.no_grad():  # the decoder alone: the states are the same, without the vocabulary projection
        output = model.base_model(
            **{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True, return_dict=True
        )
    states = torch.stack(output.hidden_states[:-1])  # (layers, prompts, positions, hidden): inputs of each layer
    states = states.sum(dim=2) / states.shape[2] if average_positions else states[:, :, -1, :]
    return (states.sum(dim=1) / states.shape[1]).cpu()


def cheap_embedding(embed: torch.Tensor, batch: dict[str, torch.Tensor], num_layers: int) -> torch.Tensor:
    """(layers, hidden): c(S) = n(Σ_p Σ_t E[x_{p,t}]) over the prompts' real tokens, in float32, for every layer."""
    rows = embed.float()[batch["input_ids"]]  # (prompts, positions, hidden)
    summed = (rows * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return normalize(summed).repeat(num_layers, 1)


def normalize(v: torch.Tensor) -> torch.Tensor:
    """n(v) = v / max(‖v‖₂, 1e-8) along the last dimension."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def prompt_gates(experts: Sequence[Expert], encode: Encode) -> torch.Tensor:
    """(layers, experts, hidden): g_{l,e} = n(encode(P_e) − encode(N_e)) for each expert in order."""
    rows = []
    for expert in experts:
        vector = encode(expert.positive_prompts or [])
        if expert.negative_prompts:
            vector = vector - encode(expert.negative_prompts)
        rows.append(normalize(vector))
    return torch.stack(rows, dim=1)


def random_gates(mode: str, num_layers: int, num_experts: int, hidden: int, seed: int) -> torch.Tensor:
    """(layers, experts, hidden) drawn from a generator seeded by `seed`: N(0, 1), or U(−1/√d, 1/√d)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (num_layers, num_experts, hidden)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    bound = math.sqrt(1.0 / hidden)
    return torch.rand(shape, generator=generator) * 2 * bound - bound


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose gate rows are nearly linearly dependent (condition number above `threshold`): there the
    router cannot tell some experts apart, and they will be chosen rarely."""
    return [layer for layer in range(gates.shape[0]) if float(torch.linalg.cond(gates[layer].float())) > threshold]
