"""SparsePO heat map: the same held-out responses coloured by the token weights of
several finished runs (e.g. the learned masks and MaPO), one panel per run.

  python experiments/ablations/sparsepo_heatmap.py --runs RUN_DIR [RUN_DIR ...] --out heatmap.png \\
      [--key w_u|w_d]

Each run directory holds ``mask_examples.json``, written by the report of
experiments/sparsepo.py (its first ``config.heatmap_examples`` held-out
responses, chosen then rejected, with per-token weights and the gold
reward-bearing flags). Words are the tokenizer's (word-level) tokens; prompts
are grey, gold reward-bearing words underlined.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", nargs="+", required=True, help="run directories with mask_examples.json")
  p.add_argument("--out", required=True, help="PNG path")
  p.add_argument("--key", default="w_u", choices=("w_u", "w_d"))
  p.add_argument("--examples", type=int, default=0, help="at most this many responses per run (0 = all)")
  a = p.parse_args(argv)
  from jaxopd.methods import sparsepo as sp
  panels = {}
  for run in a.runs:
    with open(os.path.join(run, "mask_examples.json")) as f:
      d = json.load(f)
    exs = d["examples"][:a.examples] if a.examples else d["examples"]
    panels[f"{d['label']} ({os.path.basename(os.path.normpath(run))})"] = exs
  sp.heatmap(panels, a.out, a.key)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
