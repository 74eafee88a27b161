"""Stage 1b: the pivotal token of a trace pair (model-free algorithms and their search on a model)."""
