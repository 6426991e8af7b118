"""DPO (Rafailov et al., 2023), the baseline of TDPO: the same pipeline and
evaluation as experiments/tdpo.py with ``config.method.loss = "dpo"``.

  python -m jaxopd.main --config experiments/dpo.py --workdir runs/dpo

Its sequential KL of chosen and rejected responses is computed (detached) and
logged like TDPO's, for the KL-over-training comparison.
"""

import os

from jaxopd.experiment import load_module

_tdpo = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tdpo.py"))
build, prepare, report = _tdpo.build, _tdpo.prepare, _tdpo.report


def get_config(arg: str | None = None):
  c = _tdpo.get_config(arg)
  c.method.loss = "dpo"
  c.compare_with = ""
  return c
