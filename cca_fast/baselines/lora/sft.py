"""The gold-solution SFT data and loss the LoRA baseline trains with: they live in
:mod:`cca_fast.stages.sft` (the method's ``gold_nll`` objective uses them too); re-exported here."""
from cca_fast.stages.sft import (SFTBatch, SFTExample, build_sft_examples, collate_sft, gold_target,  # noqa: F401
                                 sft_nll, shared_prefix_len, target_text)
