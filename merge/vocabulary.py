"""Merging models whose vocabularies differ: `tokenizer_source` / `tokenizer:` as mergekit 0.1.5 defines them.

The output vocabulary is the base's (`base`), one model's (`ORG/NAME`), or the union (`union`: the base's tokens,
then every other model's tokens it lacks, then their special tokens), plus the tokens `tokenizer.tokens` names.
Every vocabulary tensor (embeddings, lm_head: rows indexed by token) of every model is then re-indexed to it
before the merge method sees it: a model's row for each output token is its own row when it has the token;
for a token some models lack, the others get a stand-in row (`align_rows`). `pad_to_multiple_of` pads with
the mean row.

Unlike mergekit, whose new tokens come in set and hash-map order (their ids change from run to run), the union
is built in a fixed order: the base first, then the recipe's models in order, each model's tokens by id.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medmerge_common.errors import UserError
from medmerge_common.outdir import Say
from merge.io.checkpoint import config_int
from merge.recipe import ModelToken, Recipe, TokenizerSettings, ZeroToken

TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]


@dataclass(frozen=True)
class TokenRule:
    """Where a configured token's stand-in row comes from: `zero`, a `model`'s row for the same token, or a
    `model_token` (that model's row `row` in its own vocabulary). `force`: every model takes it."""

    kind: str
    model: str | None = None
    row: int | None = None
    force: bool = False


@dataclass
class Vocabulary:
    """The output vocabulary and, per model, its own row for each output token (-1: it lacks the token)."""

    tokens: list[str]
    rows: dict[str, torch.Tensor]
    rules: dict[int, TokenRule]
    size: int  # rows of the output tensors: len(tokens), padded to pad_to_multiple_of
    tokenizer: Any  # the output tokenizer (transformers); saved unless `copy_from` holds its files verbatim
    copy_from: Path | None

    def missing_model(self, sources: Sequence[str]) -> str | None:
        """A model a token rule reads that is not among one tensor's `sources` (mergekit stops there too)."""
        for rule in self.rules.values():
            if rule.model is not None and rule.model not in sources:
                return rule.model
        return None

    def align(self, sources: Sequence[str], tensors: list[torch.Tensor], base_index: int | None) -> list[torch.Tensor]:
        """Each source's vocabulary tensor re-indexed to the output vocabulary (see `align_rows`)."""
        rules = {
            token: (rule.kind, None if rule.model is None else list(sources).index(rule.model), rule.row, rule.force)
            for token, rule in self.rules.items()
        }
        return align_rows(tensors, [self.rows[s] for s in sources], base_index, rules, self.size)

    def save(self, out: Path) -> None:
        if self.copy_from is None:
            self.tokenizer.save_pretrained(str(out))
        else:
            copy_tokenizer_files(self.copy_from, out)


def copy_tokenizer_files(source: Path, out: Path) -> None:
    """The tokenizer files of model directory `source`, copied byte for byte into `out`."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def align_rows(
    tensors: list[torch.Tensor],
    rows: list[torch.Tensor],
    base_index: int | None,
    rules: dict[int, tuple[str, int | None, int | None, bool]],
    size: int,
) -> list[torch.Tensor]:
    """Re-index vocabulary tensors (token on dim 0) to the output vocabulary, as mergekit 0.1.5 does.

    Model m's row for output token j is E_m[rows_m[j]] when m has the token. A token that some of the models lack
    (or a forced one) gets one stand-in row s_j, which the lacking models take:

            s_j = the configured source (zero, a model's row for j, or a model's row by its own id), else
              E_d[rows_d[j]]                   when exactly one model d has the token,
              0                                when none has it,
              E_base[rows_base[j]]             when the base is among the models and has it,
              (Σ_{m has j} E_m[rows_m[j]]) / #{m has j}   otherwise (summed in model order, in the merge dtype).

    Rows past the vocabulary (`pad_to_multiple_of`) are the mean of the model's aligned rows."""
    n = rows[0].numel()
    present = torch.stack([r >= 0 for r in rows])  # [models, tokens]
    count = present.sum(0)
    shape, dtype = tensors[0].shape[1:], tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    own = [t.to(dtype)[r.clamp(min=0)] for t, r in zip(tensors, rows)]  # [tokens, ...] per model

    forced = torch.zeros(n, dtype=torch.bool)
    configured = torch.zeros(n, dtype=torch.bool)
    for token, (kind, _, _, force) in rules.items():
        configured[token] = kind != "default"  # a token listed without a source keeps the rules below
        forced[token] = force
    needs = ((count < len(rows)) | forced) & ~configured
    stand_in = torch.zeros((n, *shape), dtype=dtype)
    one = needs & (count == 1)
    for m, mine in enumerate(own):
        stand_in[one & present[m]] = mine[one & present[m]]
    several = needs & (count > 1)
    if base_index is not None:
        from_base = several & present[base_index]
        stand_in[from_base] = own[base_index][from_base]
        several &= ~present[base_index]
    if several.any():
        total = torch.zeros((int(several.sum()), *shape), dtype=dtype)
        for m, mine in enumerate(own):
            total = total + torch.where(_rows(present[m][several], shape), mine[several], 0)
        stand_in[several] = total / _rows(count[several], shape).to(dtype)
    for token, (kind, m, row, _) in rules.items():
        if kind == "model":  # the model has the token: checked when the vocabulary was built
            stand_in[token] = own[m][token]  # type: ignore[index]
        elif kind == "model_token":
            stand_in[token] = tensors[m][row].to(dtype)  # type: ignore[index]

    out = []
    for m, mine in enumerate(own):
        keep = present[m] & ~forced
        aligned = torch.where(_rows(keep, shape), mine, stand_in)
        if size > n:
            aligned = torch.cat([aligned, aligned.mean(0, keepdim=True).expand(size - n, *shape)])
        out.append(aligned)
    return out


def _rows(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-token vector viewed to broadcast over each token's row."""
    return mask.reshape(-1, *([1] * len(shape)))


def vocab_size(config: dict[str, Any]) -> int | None:
    """The number of token rows a model's config declares."""
    return config_int(config, "vocab_size")


def has_tokenizer(directory: Path | None) -> bool:
    return directory is not None and any(
        (directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )


def build_vocabulary(
    recipe: Recipe,
    configs: dict[str, dict[str, Any]],
    tokenizer_dirs: dict[str, Path | None],
    warn: Say | None = None,
) -> Vocabulary:
    """The output vocabulary of `recipe` (a Recipe with vocabulary settings) and each model's rows for it, from
    the models' tokenizers (`tokenizer_dirs`) and configs (their `vocab_size`: rows past it are padding)."""
    from transformers import AutoTokenizer

    settings = recipe.vocabulary_settings
    assert settings is not None
    refs = recipe.model_refs()
    base = recipe.base_model or refs[0]

    def load(ref: str) -> Any:
        try:
            return AutoTokenizer.from_pretrained(str(tokenizer_dirs[ref]))
        except Exception as exc:  # a tokenizer transformers cannot read: say which and why, in one line
            raise UserError(f"model '{ref}': its tokenizer cannot be loaded ({type(exc).__name__}: {exc})") from None

    if not has_tokenizer(tokenizer_dirs.get(base)):
        raise UserError(f"model '{base}' has no tokenizer files: the output vocabulary starts from its tokenizer")
    tokenizers = {}
    for ref in refs:
        if has_tokenizer(tokenizer_dirs.get(ref)):
            tokenizers[ref] = load(ref)
        elif warn:
            warn(f"model '{ref}' has no tokenizer files; its vocabulary is taken to be the base's (as mergekit does)")
    sizes = {ref: vocab_size(configs[ref]) or len(tokenizers.get(ref, tokenizers[base]).get_vocab()) for ref in refs}
    beyond = [t for t, i in tokenizers[base].get_vocab().items() if i >= sizes[base]]
    if beyond:
        raise UserError(
            f"model '{base}': its tokenizer has {len(beyond)} token(s) past its vocab_size {sizes[base]} "
            f"(e.g. {beyond[0]!r}), which medmerge cannot strip yet"
        )

    source = settings.source
    origin = tokenizer_dirs[base] if source in ("union", "base") else tokenizer_dirs[source]
    if source != "union" and not has_tokenizer(origin):
        raise UserError(f"model '{source}' has no tokenizer files to take the vocabulary from")
    out = load(base if source in ("union", "base") else source)
    before = len(out)
    if source == "union":
        _add_union(
            out,
            [tokenizers[base], *(tokenizers[r] for r in refs if r != base and r in tokenizers)],
            [sizes[base], *(sizes[r] for r in refs if r != base and r in tokenizers)],
        )
    present = out.get_vocab()
    out.add_tokens([t for t in (settings.tokens or {}) if t not in present])
    vocab = out.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise UserError(f"the output tokenizer's ids are not 0..{len(tokens) - 1} without gaps; it cannot index rows")

    rows = {}
    for ref in refs:
        own = tokenizers.get(ref, tokenizers[base]).get_vocab()
        rows[ref] = torch.tensor([own[t] if own.get(t, sizes[ref]) < sizes[ref] else -1 for t in tokens])
    rules = _token_rules(recipe, settings, vocab, rows, tokenizers, sizes)
    size = len(tokens)
    if settings.pad_to_multiple_of:
        size = -(-size // settings.pad_to_multiple_of) * settings.pad_to_multiple_of
    return Vocabulary(tokens, rows, rules, size, out, origin if len(out) == before else None)


def _add_union(out: Any, tokenizers: list[Any], sizes: list[int]) -> None:
    """Add to `out` (the base's tokenizer) every token of the others it lacks, in model order and by id; their
    added (special) tokens last, as mergekit adds them."""
    tokens: dict[str, None] = {}
    special: dict[str, Any] = {}
    for tokenizer, size in zip(tokenizers, sizes):
        added = {info.content for info in tokenizer.added_tokens_decoder.values()}
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < size and token not in added:
                tokens.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index < size:
                special.setdefault(info.content, info)
    known = out.get_vocab()
    out.add_tokens([t for t in tokens if t not in special and t not in known])
    out.add_tokens([info for content, info in special.items() if content not in known])


def _token_rules(
    recipe: Recipe,
    settings: TokenizerSettings,
    vocab: dict[str, int],
    rows: dict[str, torch.Tensor],
    tokenizers: dict[str, Any],
    sizes: dict[str, int],
) -> dict[int, TokenRule]:
    """`tokenizer.tokens`, resolved to output ids and source rows, each checked against the models."""
    rules = {}
    for token, entry in (settings.tokens or {}).items():
        where = recipe.where("tokenizer", "tokens", token, "source")
        source, index = entry.source, vocab[token]
        if source is None:
            rules[index] = TokenRule("default", force=entry.force)
        elif isinstance(source, ZeroToken):
            rules[index] = TokenRule("zero", force=entry.force)
        elif isinstance(source, ModelToken):
            own = tokenizers.get(source.model)
            row = source.token_id if source.token is None else (own.get_vocab().get(source.token) if own else None)
            if row is None:
                raise UserError(f"model '{source.model}' has no token {source.token!r}", **where)
            if row >= sizes[source.model]:
                raise UserError(
                    f"token id {row} is past model '{source.model}' vocab_size {sizes[source.model]}", **where
                )
            rules[index] = TokenRule("model_token", source.model, row, entry.force)
        else:
            if rows[source][index] < 0:
                raise UserError(f"model '{source}' does not have the token {token!r}", **where)
            rules[index] = TokenRule("model", source, force=entry.force)
    return rules
