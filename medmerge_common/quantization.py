"""Loading causal LMs (bitsandbytes 4-/8-bit included), shared by `--model medmerge-hf`, `medmerge moe`, `medmerge moe
train-router` and fusion's members.

torch and transformers are imported only when a config is made, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def bnb_config(
    quantization: str | None, quant_type: str = "nf4", compute_dtype: str = "bfloat16", double_quant: bool | str = False
) -> Any:
    """A transformers BitsAndBytesConfig for `quantization` (None: no quantization). Bad values raise ValueError."""
    if quantization in (None, "", "none"):
        return None
    if quantization not in ("4bit", "8bit"):
        raise ValueError(f"quantization must be 4bit or 8bit, got {quantization!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"bnb_4bit_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
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
        raise RuntimeError("quantization needs bitsandbytes: pip install 'medmerge[quant]'")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "bitsandbytes 4-/8-bit loading needs a CUDA GPU and none is available "
            "here; load the model unquantized (bf16/fp32) instead"
        )


def check_quantization(quantization: str) -> None:
    """`--quantization MODE` checked before anything is loaded or written: one UserError line if it cannot run."""
    from medmerge_common.errors import UserError

    try:
        bnb_config(quantization)
        check_bitsandbytes()
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--quantization {quantization}: {exc}") from None


def load_causal_lm(directory: str, dtype: Any, device: str, quantization: str | None = None) -> Any:
    """A transformers causal LM in `dtype` on `device`, in eval mode; with `quantization` its linear layers in
    4/8 bits (bitsandbytes, placed by device_map)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization:
        kwargs |= {"quantization_config": bnb_config(quantization), "device_map": device}
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    return (model if quantization else model.to(device)).eval()


def model_dtype(name: str | None, device: str) -> Any:
    """The torch dtype a model is loaded in: `name` (float32, bfloat16, float16), or for None / "auto" bfloat16 on
    CUDA and float32 elsewhere."""
    import torch

    if name not in (None, "auto"):
        return getattr(torch, name)
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def free_memory() -> None:
    """Give a released model's memory back (the caller drops its references first)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
