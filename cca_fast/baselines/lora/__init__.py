"""The LoRA baseline (peft): SFT on gold solutions, peft-format adapters, merge with exact restore."""
