"""Decoding: batched greedy / sampled generation with stop rules, and prefix key/value reuse."""
