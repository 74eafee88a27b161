"""Stage 2: localise the components that decide the pivotal token.

* :mod:`.atp`: gradient x activation attribution at the intervention position (fast selector,
  DCM warm start);
* :mod:`.dcm`: desiderata-based component masking (paper default), full-prefix or
  last-position execution;
* :mod:`.select`: turning scores or masks into a :class:`Selection` (dcm, atp-topk,
  atp-fraction, random control).
"""
from cca_fast.stages.localize.atp import AtPConfig, atp_scores, run_atp
from cca_fast.stages.localize.dcm import DCMConfig, DCMResult, PivotPrefixCache, dcm_loss, run_dcm
from cca_fast.stages.localize.select import (METHODS, Selection, select, select_atp_fraction, select_atp_topk, select_dcm,
                     select_random)

__all__ = ["AtPConfig", "atp_scores", "run_atp", "DCMConfig", "DCMResult", "PivotPrefixCache", "dcm_loss",
           "run_dcm", "METHODS", "Selection", "select", "select_atp_fraction", "select_atp_topk",
           "select_dcm", "select_random"]
