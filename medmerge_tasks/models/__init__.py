"""lm-eval model types registered by medmerge: `medmerge-hf` (4-/8-bit loading), `medmerge-ensemble` (fixed
weights) and `medmerge-fusion` (a trained combiner)."""

MODELS = {
    "medmerge-hf": "medmerge_tasks.models.quantized:QuantizedHFLM",
    "medmerge-ensemble": "medmerge_tasks.models.ensemble:EnsembleLM",
    "medmerge-fusion": "medmerge_tasks.models.fusion:FusionLM",
}
