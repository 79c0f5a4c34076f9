"""Mixtures of experts from dense models: mergekit-moe's YAML (config.py), gate vectors from prompts (gates.py),
the output architectures (layouts.py) and the streaming build (build.py)."""
