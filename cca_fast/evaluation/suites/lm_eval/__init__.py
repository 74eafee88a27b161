"""lm-eval-harness task files for cca_fast's local side-effect suites.

``TASK_DIR`` is the folder to pass to ``lm_eval --include_path``; the tasks are
``cca_mmlu_local``, ``cca_truthfulqa_mc1_local``, ``cca_gsm8k_ppl_local`` and the group
``cca_side_effects``. ``utils.py`` (loaded by lm-eval from this folder) builds the documents
with cca_fast's own code, so prompts, subsets and continuations are the suites' own (see
``docs/side_effects.md``). lm-eval is not a dependency of cca_fast.
"""
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
TASKS = ("cca_mmlu_local", "cca_truthfulqa_mc1_local", "cca_gsm8k_ppl_local")
GROUP = "cca_side_effects"

__all__ = ["TASK_DIR", "TASKS", "GROUP"]
