"""`--model medmerge-hf`: lm-eval's `hf` model plus working bitsandbytes 4-/8-bit loading.

lm-eval 0.4.13 passes `load_in_4bit=True` straight to `from_pretrained`, which transformers 5 rejects. This
model type takes `quantization=4bit|8bit` (with `bnb_4bit_quant_type`, `bnb_4bit_compute_dtype`,
`bnb_4bit_use_double_quant`) and hands transformers a `BitsAndBytesConfig`; everything else is `hf`'s.

    lm_eval --model medmerge-hf --model_args pretrained=BioMistral/BioMistral-7B,quantization=4bit ...
"""

from __future__ import annotations

from typing import Any

from lm_eval.models.huggingface import HFLM

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def bnb_config(
    quantization: str | None, quant_type: str = "nf4", compute_dtype: str = "bfloat16", double_quant: bool | str = False
) -> Any:
    """A transformers BitsAndBytesConfig for `quantization` (None: no quantization). Bad values raise ValueError."""
    if quantization in (None, "", "none"):
        return None
    if quantization not in ("4bit", "8bit"):
        raise ValueError(f"medmerge-hf: quantization must be 4bit or 8bit, got {quantization!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"medmerge-hf: bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}"
        )
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"medmerge-hf: bnb_4bit_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}"
        )
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_use_double_quant=str(double_quant).lower() in ("true", "1"),
    )


def check_bitsandbytes() -> None:
    """Raise one clear RuntimeError where bitsandbytes cannot quantize here (not installed, no CUDA GPU)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("medmerge-hf: quantization needs bitsandbytes: pip install 'medmerge[quant]'")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "medmerge-hf: bitsandbytes 4-/8-bit loading needs a CUDA GPU and none is available "
            "here; drop quantization= to evaluate in bf16/fp32"
        )


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
        self._bnb_config = bnb_config(
            quantization, bnb_4bit_quant_type, bnb_4bit_compute_dtype, bnb_4bit_use_double_quant
        )
        if self._bnb_config is not None:
            check_bitsandbytes()
        super().__init__(pretrained=pretrained, **kwargs)

    def _create_model(self, *args: Any, quantization_config: Any = None, **kwargs: Any) -> None:
        super()._create_model(*args, quantization_config=self._bnb_config or quantization_config, **kwargs)
