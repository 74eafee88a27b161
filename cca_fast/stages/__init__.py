"""The three stages of CCA: traces and pivots (stage 1), localize (stage 2), update (stage 3)."""
