"""Whole experiments: the `cca run` pipeline, the `cca study`, their reports."""
