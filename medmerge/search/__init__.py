"""`medmerge search`: parameter search over merge recipes, scored by lm-eval on held-out tasks."""
