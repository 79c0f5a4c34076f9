"""A trained fusion directory (`medmerge fuse train`'s FUSION_DIR), loaded for evaluation: the combiner, and its
members checked to be the models it was trained on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from medmerge_tasks.fusion.combiners import build_combiner
from medmerge_tasks.fusion.features import Member, member_fingerprint

FUSION_FILE = "fusion.json"  # marks a directory `medmerge fuse train` wrote
COMBINER_FILE = "combiner.safetensors"
FORMAT = 1


@dataclass
class Fusion:
    """A trained combiner, ready to combine its members' features."""

    directory: Path
    record: dict[str, Any]
    combiner: torch.nn.Module

    @property
    def members(self) -> list[Member]:
        return [Member(**{k: v for k, v in m.items() if k != "fingerprint"}) for m in self.record["members"]]

    @torch.no_grad()
    def log_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(questions, members, options) features -> (questions, options) log P(option) under the combiner."""
        return torch.log_softmax(self.combiner(features.float()), dim=-1)


def load_fusion(directory: str | Path, members: list[str] | None = None) -> Fusion:
    """A FUSION_DIR's combiner; each member (or its replacement in `members`, for a model that moved) must have
    the fingerprint it was trained with."""
    path = Path(directory)
    if not (path / FUSION_FILE).is_file():
        raise ValueError(f"{path}: not a fusion directory (no {FUSION_FILE}); train one with `medmerge fuse train`")
    record = json.loads((path / FUSION_FILE).read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path / FUSION_FILE}: format {record.get('format')!r}, this medmerge reads {FORMAT}")
    if members is not None:
        if len(members) != len(record["members"]):
            raise ValueError(f"{path}: trained with {len(record['members'])} members, {len(members)} given")
        record["members"] = [m | {"pretrained": p} for m, p in zip(record["members"], members)]
    for i, m in enumerate(record["members"], 1):
        found = member_fingerprint(Member(pretrained=m["pretrained"]))
        if found != m["fingerprint"]:
            raise ValueError(
                f"{path}: member {i} ({m['pretrained']}) is not the model this combiner was trained on "
                f"(fingerprint {found[:12]}, trained with {m['fingerprint'][:12]})"
            )
    settings = record.get("transformer") or {}
    combiner = build_combiner(record["combiner"], len(record["members"]), int(record["options"]), **settings)
    combiner.load_state_dict(load_file(str(path / COMBINER_FILE)))
    return Fusion(path, record, combiner.eval())
