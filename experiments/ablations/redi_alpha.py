"""REDI alpha ablation (REDI paper: the asymmetric weighting alpha = 0.8 is stable and beats the
symmetric alpha = 1; alpha = 0 is SFT on the positives).

  python experiments/ablations/redi_alpha.py --out runs/ablations/redi_alpha [--alphas 0,0.5,0.8,1.0] [--seeds 0]
      [--set data.data_dir=... --set sft.workdir=...]

REDI from the SFT base on the main job's cached pairs for each alpha (launch/sweep.py), then
``alpha.md`` (gold reward, sequence KL to the SFT model, the positives' and negatives'
length-normalised log-likelihoods, their margin, the positives' change from the start,
pair accuracy, entropy, distinct-2; mean over seeds) and ``alpha.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from tdpo_alpha import REPO, alpha_sweep  # noqa: E402

COLUMNS = ("sample/reward", "sample/kl_ref", "logps/chosen_norm", "logps/rejected_norm", "logps/margin_norm",
           "logps/chosen_change", "rewards/accuracies", "sample/entropy", "sample/distinct2")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/redi_alpha")
  p.add_argument("--alphas", default="0,0.5,0.8,1.0")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--set", action="append", default=[], help="field=value for every run (repeatable)")
  p.add_argument("--skip_runs", action="store_true", help="only re-make the table and plot")
  a = p.parse_args(argv)
  alpha_sweep(os.path.join(REPO, "experiments", "redi.py"), a.out, a.alphas, a.seeds, a.steps, a.set, COLUMNS,
              "alpha (REDI)", "linear", a.skip_runs)


if __name__ == "__main__":
  main()
