"""Baselines the paper compares CCA with."""
