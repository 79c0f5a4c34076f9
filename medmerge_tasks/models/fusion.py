"""`--model medmerge-fusion`: a trained combiner over frozen members (`medmerge fuse train`), for lm-eval.

    lm_eval --model medmerge-fusion --model_args pretrained=FUSION_DIR --tasks medmerge_medmcqa_inst

(`fusion=FUSION_DIR` is the same; `pretrained=` also names the row after it in lm-eval's output.) The requests
of one document (its options) are scored together: each member, loaded one at a time, gives its outputs reduced
to the options exactly as in training, the combiner turns them into P(option), and each option's
"log-likelihood" is log P(option) (`acc` is the combiner's argmax; `acc_norm` divides by option length as
always). The document's option count must be the one the combiner was trained for. `members=A|B` points at
members that moved (their fingerprints are still checked); `device`, `batch_size` and `dtype` are the members'
(dtype default: as trained).
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM


class FusionLM(LM):
    def __init__(
        self,
        pretrained: str | None = None,
        fusion: str | None = None,
        members: str | None = None,
        device: str = "cpu",
        batch_size: int | str = 8,
        dtype: str | None = None,
        **unused: Any,
    ) -> None:
        from medmerge_tasks.fusion.saved import load_fusion

        super().__init__()
        directory = fusion or pretrained
        if not directory:
            raise ValueError("medmerge-fusion: give the trained combiner as pretrained=FUSION_DIR")
        self.fusion = load_fusion(directory, members.split("|") if members else None)
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's default device; its hf model falls back to the CPU the same way
        self.device_name = device
        self.member_batch = int(batch_size) if str(batch_size).isdigit() else 8
        self.dtype = None if dtype in (None, "auto") else str(dtype)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from medmerge_tasks.choices import ChoicePrompt
        from medmerge_tasks.fusion.features import member_features

        options = int(self.fusion.record["options"])
        groups: dict[tuple[Any, Any], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.task_name, request.doc_id), []).append(i)
        prompts, positions = [], []
        for (task, doc), indices in groups.items():
            indices.sort(key=lambda i: requests[i].idx)
            if len(indices) != options:
                raise ValueError(
                    f"medmerge-fusion: {task} document {doc} has {len(indices)} option(s); this combiner was trained "
                    f"for questions with {options}"
                )
            contexts = {requests[i].args[0] for i in indices}
            if len(contexts) != 1:
                raise ValueError(f"medmerge-fusion: {task} document {doc}: its options do not share one context")
            prompts.append(ChoicePrompt(contexts.pop(), tuple(requests[i].args[1] for i in indices), 0))
            positions.append(indices)
        kind = self.fusion.record["features"]
        per_member = []
        for member in self.fusion.members:
            member = member.model_copy(update={"dtype": self.dtype or member.dtype})
            features, _, _ = member_features(
                member, prompts, device=self.device_name, batch_size=self.member_batch, cache=None
            )
            if kind == "option_logits" and bool(features[kind].isnan().any()):
                raise ValueError(
                    "medmerge-fusion: this combiner reads option logits, which need options of one token each; "
                    "these options have several"
                )
            per_member.append(features[kind])
        log_probabilities = self.fusion.log_probabilities(torch.stack(per_member, dim=1))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for row, indices in zip(log_probabilities, positions):
            best = int(row.argmax())
            for option, i in enumerate(indices):
                results[i] = (float(row[option]), option == best)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("medmerge-fusion scores multiple-choice tasks only (no perplexity)")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("medmerge-fusion scores multiple-choice tasks only (no generation)")
