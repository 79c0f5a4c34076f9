"""medmerge: merge biomedical language models and evaluate them with lm-eval.

The command line, experiment runner, demo and reports live here; they build on `merge` (the recipe
interpreter) and `medmerge_tasks` (the lm-eval plugin), which know nothing of each other.
"""

__version__ = "0.1.0"
