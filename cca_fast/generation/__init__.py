"""Decoding: batched greedy / sampled generation with stop rules, and prefix key/value reuse.

* :mod:`~cca_fast.generation.state`: :class:`DecodeState` (cache, next logits, mask, positions),
  :func:`prefill`;
* :mod:`~cca_fast.generation.decode`: :class:`GenerationConfig`, :func:`decode`, :func:`generate`;
* :mod:`~cca_fast.generation.prefix`: the one prefix key/value mechanism and :class:`PrefixCache`.
"""
from cca_fast.generation.decode import (DecodeResult, Generation, GenerationConfig, StopScanner, decode, encode,
                                        final_text, generate, greedy_from_logits, row_seed, sample_from_logits)
from cca_fast.generation.prefix import (PrefixCache, can_share, common_prefix_len, crop_copy, expand, run_prefix,
                                        shared_len)
from cca_fast.generation.state import DecodeState, GenerationStats, extend_state, prefill

__all__ = ["DecodeResult", "DecodeState", "Generation", "GenerationConfig", "GenerationStats", "PrefixCache",
           "StopScanner", "can_share", "common_prefix_len", "crop_copy", "decode", "encode", "expand", "extend_state",
           "final_text", "generate", "greedy_from_logits", "prefill", "row_seed", "run_prefix", "sample_from_logits",
           "shared_len"]
