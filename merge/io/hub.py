"""Model references -> checkpoints: local directories, an offline mirror, or the Hugging Face hub.

Resolution order for a reference `org/name[@revision]`:
  1. a local directory of that path;
  2. `$MEDMERGE_MODEL_DIR/org/name/` (a plain copy of the hub repository, for offline sites);
  3. the hub, through huggingface_hub, fetching only what is needed: config.json and safetensors
     headers to validate (`--dry-run`), the weight files and tokenizer files to merge.
Offline (no network, or HF_HUB_OFFLINE=1) a reference that is not cached fails at once with one line.
`BASE+ADAPTER` resolves both halves this way (an adapter: its adapter_config.json and weights).
"""

from __future__ import annotations

import json
from pathlib import Path

from medmerge_common.errors import UserError
from medmerge_common.hub import hub_reachable, local_dir, split_ref
from merge.io.checkpoint import Checkpoint, tensors_from_header
from merge.io.lora import ADAPTER_FILES, adapt, split_adapter
from merge.vocabulary import TOKENIZER_FILES

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
META_PATTERNS = ["config.json", "generation_config.json", *TOKENIZER_FILES]


def input_dirs(ref: str) -> list[Path]:
    """The local directories a reference reads (a model, and the adapter of `BASE+ADAPTER`)."""
    return [d for part in ref.split("+") if (d := local_dir(part))]


def tokenizer_dir(ref: str) -> Path:
    """A directory holding the tokenizer files of `ref` (of the base, for `BASE+ADAPTER`): the model's own
    directory, or the hub's files (tokenizer and configs only)."""
    ref = split_adapter(ref)[0]
    return local_dir(ref) or _download(ref, META_PATTERNS)


def open_model(ref: str, *, weights: bool = True) -> Checkpoint:
    """Open a model for merging (`weights=True`: download what is missing) or for validation only."""
    base_ref, adapter_ref = split_adapter(ref)
    if adapter_ref is not None:
        base = open_model(base_ref, weights=weights)
        return adapt(ref, base, local_dir(adapter_ref) or _download(adapter_ref, ADAPTER_FILES))
    directory = local_dir(ref)
    if directory is not None:
        return Checkpoint.open(ref, directory)
    if weights:
        return Checkpoint.open(ref, _download(ref, META_PATTERNS + WEIGHT_PATTERNS))
    return _open_headers(ref)


def _download(ref: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    repo, revision = split_ref(ref)
    try:
        return Path(
            snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=not hub_reachable())
        )
    except Exception as exc:  # network, auth, missing repo: all user-facing
        raise _hub_error(ref, exc) from None


def _open_headers(ref: str) -> Checkpoint:
    """Config and tensor shapes from the hub without downloading weights (safetensors range reads)."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    repo, revision = split_ref(ref)
    if not hub_reachable():  # headers need the network; a cached snapshot has the real files
        return Checkpoint.open(ref, _download(ref, META_PATTERNS + WEIGHT_PATTERNS))
    try:
        config = json.loads(Path(hf_hub_download(repo, "config.json", revision=revision)).read_text())
        metadata = get_safetensors_metadata(repo, revision=revision)
    except Exception as exc:
        raise _hub_error(ref, exc) from None
    tensors = {}
    for file, file_meta in metadata.files_metadata.items():
        header = {
            name: {"dtype": info.dtype, "shape": info.shape, "data_offsets": info.data_offsets}
            for name, info in file_meta.tensors.items()
        }
        tensors.update(tensors_from_header(header, file, data_start=None))
    return Checkpoint(ref, None, config, tensors)


def _hub_error(ref: str, exc: Exception) -> UserError:
    name = type(exc).__name__
    if "RepositoryNotFound" in name or "RevisionNotFound" in name or "GatedRepo" in name:
        why = "not found on the hub (or gated: run `hf auth login`)"
    elif "NotEnoughFreeSpace" in name:
        why = f"not enough disk space to download it ({exc})"
    else:
        why = (
            "not available locally and the hub cannot be reached; download it where there is a network "
            "(`hf download ORG/NAME --local-dir $MEDMERGE_MODEL_DIR/ORG/NAME`) and set MEDMERGE_MODEL_DIR"
        )
    return UserError(f"model '{ref}': {why}")
