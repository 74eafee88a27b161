"""Side-effect suites: does an update hurt what the model could do before? (docs/method.md section 0)

Local-file versions of lm-eval-harness tasks, scored by continuation log-likelihood exactly as
lm-eval scores them (:mod:`.loglik`):

* :mod:`.mmlu`: MMLU 5-shot multiple choice (``mmlu/{dev,test}/<subject>_*.csv``), accuracy
  overall and per subject; ``limit`` takes a subset stratified over subjects.
* :mod:`.truthfulqa`: TruthfulQA MC1-style (best answer vs each incorrect answer of
  ``truthfulqa/TruthfulQA.csv``), lm-eval's QA primer, summed log-probs.
* :mod:`.perplexity`: perplexity of held-out GSM8K solutions given their question.

:func:`run_suites` runs them (with a :class:`SuiteConfig`) and returns per-suite metrics plus
per-item records; :func:`compare` turns two runs (before / after a delta) into paired deltas
with bootstrap intervals. The task YAMLs in ``cca_fast/suites/lm_eval/`` run the same suites
through lm-eval-harness (see ``docs/side_effects.md``); lm-eval is not a dependency.
"""
from cca_fast.evaluation.suites.common import SuiteResult, resolve_data_root
from cca_fast.evaluation.suites.loglik import Loglik, LoglikConfig, LoglikStats, encode_pair, loglikelihood, loglikelihood_tokens
from cca_fast.evaluation.suites.runner import SUITES, SuiteConfig, compare, parse_suites, run_suites

__all__ = ["SUITES", "SuiteConfig", "SuiteResult", "run_suites", "compare", "parse_suites", "resolve_data_root",
           "Loglik", "LoglikConfig", "LoglikStats", "encode_pair", "loglikelihood", "loglikelihood_tokens"]
