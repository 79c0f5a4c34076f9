"""lm-eval model types registered by medmerge: `medmerge-hf` (4-/8-bit loading) and `medmerge-ensemble`."""

MODELS = {
    "medmerge-hf": "medmerge_tasks.models.quantized:QuantizedHFLM",
    "medmerge-ensemble": "medmerge_tasks.models.ensemble:EnsembleLM",
}
