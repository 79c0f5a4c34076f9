"""`--model medmerge-hf`: lm-eval's `hf` model plus working bitsandbytes 4-/8-bit loading.

lm-eval 0.4.13 passes `load_in_4bit=True` straight to `from_pretrained`, which transformers 5 rejects. This
model type takes `quantization=4bit|8bit` (with `bnb_4bit_quant_type`, `bnb_4bit_compute_dtype`,
`bnb_4bit_use_double_quant`) and hands transformers a `BitsAndBytesConfig`; everything else is `hf`'s.

    lm_eval --model medmerge-hf --model_args pretrained=BioMistral/BioMistral-7B,quantization=4bit ...
"""

from __future__ import annotations

from typing import Any

from lm_eval.models.huggingface import HFLM

from medmerge_common.quantization import bnb_config, check_bitsandbytes

__all__ = ["QuantizedHFLM", "bnb_config", "check_bitsandbytes"]


class QuantizedHFLM(HFLM):
    """HFLM that builds a BitsAndBytesConfig from `quantization=4bit|8bit` model args."""

    def __init__(
        self,
        pretrained: Any = None,
        quantization: str | None = None,
        bnb_4bit_quant_type: str = "nf4",
        bnb_4bit_compute_dtype: str = "bfloat16",
        bnb_4bit_use_double_quant: bool | str = False,
        **kwargs: Any,
    ) -> None:
        for legacy in ("load_in_4bit", "load_in_8bit"):
            if kwargs.pop(legacy, False):
                raise ValueError(
                    f"medmerge-hf: use quantization={legacy[8:]} instead of {legacy}=True "
                    "(transformers 5 rejects the raw flag)"
                )
        try:
            self._bnb_config = bnb_config(
                quantization, bnb_4bit_quant_type, bnb_4bit_compute_dtype, bnb_4bit_use_double_quant
            )
            if self._bnb_config is not None:
                check_bitsandbytes()
        except (RuntimeError, ValueError) as exc:
            raise type(exc)(f"medmerge-hf: {exc}") from None
        super().__init__(pretrained=pretrained, **kwargs)

    def _create_model(self, *args: Any, quantization_config: Any = None, **kwargs: Any) -> None:
        super()._create_model(*args, quantization_config=self._bnb_config or quantization_config, **kwargs)
