"""AlignDistil's boost ``beta2`` and its adaptive coefficient: a sweep, and the coefficient
as a detector of the reward-bearing tokens (which the controlled task knows; the paper
cannot check this on real data).

  python experiments/ablations/aligndistil_beta2.py --out runs/ablations/aligndistil_beta2 \\
      [--beta2 1,5,15,30] [--seeds 0] [--steps 400] [--set data.data_dir=... --set sft.workdir=...] \\
      [--skip_runs]

1. The sweep: the adaptive teacher, on-policy, for each ``beta2`` (launch/sweep.py, through
   experiments/tdpo_alpha.py's one-field sweep): ``beta2.md`` (gold reward, sequence KL to
   the SFT model, entropy, distinct-2 and the coefficient's mean / max / fraction above 10 on
   the held-out chosen responses, mean over seeds) and ``beta2.png``.
2. The coefficient, from the frozen models alone (it depends on the DPO and reverse DPO
   models, not on the policy, so it is the same at every step of every run): on the
   held-out pairs' response tokens (chosen and rejected), the per-token disagreement
   ``d = sum_v |p_dpo - p_rdpo|``, the extrapolation weight ``w = beta2 d + 1e-3`` and the
   coefficient ``c = beta / w`` (jaxopd/losses/aligndistil.py's ``teacher``), against the
   task's gold reward-bearing tokens (jaxopd/tasks/reviews.py's ``gold_tokens``).
   ``coef.md``: AUROC of ``w`` (equivalently of ``d``; ``c``'s is one minus it) and, for
   comparison, of the DPO model's token reward magnitude ``|beta (log p_dpo - log p_ref)|``
   and of ``|log p_dpo - log p_rdpo|`` at the target token; ``c``'s distribution per
   ``beta2`` (mean, median, fraction above 10, max; mean on gold vs other tokens).
   ``coef.png``: histograms of ``d`` on gold and other tokens.
The stages (SFT base, pairs, DPO, reverse DPO) are experiments/aligndistil.py's cached ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from tdpo_alpha import REPO, alpha_sweep  # noqa: E402  (puts launch/ on the path)

import aot_memory  # noqa: E402  (its override: field=value onto a config, typed as --config.<field>)

sys.path.insert(0, REPO)
CONFIG = os.path.join(REPO, "experiments", "aligndistil.py")
COLUMNS = ("sample/reward", "sample/kl_ref", "sample/entropy", "sample/distinct2", "coef/mean", "coef/max",
           "coef/above_10")


def token_signals(sets, batch: int = 64, spec: str = CONFIG + ":adaptive"):
  """Per response token of the held-out pairs (chosen and rejected): ``d``, the two comparison
  signals, the gold flags; numpy ``[n]`` each. Trains any missing stage first (cached)."""
  import jax
  import jax.numpy as jnp
  from jaxopd.experiment import load_config
  from jaxopd.losses.aligndistil import FLOOR, token_terms
  from jaxopd.losses.common import response_mask
  from jaxopd.methods import aligndistil
  from jaxopd.tasks import reviews as reviews_task
  from jaxopd.tasks import pairs
  from jaxopd.models import table
  from jaxopd.models.heads import chunked_terms

  c = load_config(spec)
  for s in sets:
    aot_memory.override(c, *s.split("=", 1))
  c = aligndistil.prepare(c, None)
  beta = c.method.beta
  models = {n: table.load_model(c.models[n].init, n)[0] for n in ("reference", "dpo", "rdpo")}
  _, test_recs, _ = pairs.pair_data(c)
  tokens = np.stack([r["tokens"] for r in test_recs]).reshape(-1, c.seq_len)
  lmask = np.stack([r["loss_mask"] for r in test_recs]).reshape(-1, c.seq_len)
  gold = reviews_task.gold_tokens(c)(tokens)[:, 1:]

  @jax.jit
  def signals(tok):
    def per_chunk(z, targets):
      # beta2 = 1 gives w = d + FLOOR; the policy's logits do not enter the terms used here.
      t = token_terms("adaptive", z["reference"], z["reference"], z["dpo"], z["rdpo"], targets, beta, 1.0)
      lp = lambda n: jnp.take_along_axis(jax.nn.log_softmax(z[n].astype(jnp.float32), -1), targets[..., None],
                                         -1)[..., 0]
      return {"d": beta / t["coef"] - FLOOR, "reward": jnp.abs(t["reward_token"]),
              "contrast": jnp.abs(lp("dpo") - lp("rdpo"))}
    return chunked_terms(models, tok, per_chunk, 32, frozen=tuple(models))

  out = {k: [] for k in ("d", "reward", "contrast")}
  for i in range(0, len(tokens), batch):
    got = jax.device_get(signals(jnp.asarray(tokens[i:i + batch])))
    for k in out:
      out[k].append(np.asarray(got[k], np.float64))
  m = np.asarray(response_mask(jnp.asarray(lmask))) > 0
  res = {k: np.concatenate(v)[m] for k, v in out.items()}
  res["gold"] = gold[m] > 0
  res["beta"] = beta
  res["pairs"] = len(test_recs)
  return res


def coefficient_report(sig, beta2s, out):
  from jaxopd.losses.aligndistil import FLOOR
  from jaxopd.methods.sparsepo import auroc
  d, gold, beta = sig["d"], sig["gold"], sig["beta"]
  lines = [f"Held-out pairs: {sig['pairs']} (chosen and rejected responses), {len(d)} response tokens, "
           f"{int(gold.sum())} gold reward-bearing ({gold.mean():.3f}).", "",
           "| signal | AUROC (gold reward-bearing tokens) | mean on gold | mean on other |", "| --- | --- | --- | --- |"]
  for name, key in (("AlignDistil's w (d = sum_v \\|p_dpo - p_rdpo\\|)", "d"),
                    ("\\|beta (log p_dpo - log p_ref)\\| of the target token", "reward"),
                    ("\\|log p_dpo - log p_rdpo\\| of the target token", "contrast")):
    s = sig[key]
    lines.append(f"| {name} | {auroc(s, gold):.3f} | {s[gold].mean():.3f} | {s[~gold].mean():.3f} |")
  lines += ["", f"The coefficient c = beta / (beta2 d + {FLOOR}) (beta = {beta}); its AUROC is 1 minus w's.", "",
            "| beta2 | c mean | c median | c > 10 | c max | c mean on gold | c mean on other |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  stats = {"tokens": int(len(d)), "gold_fraction": float(gold.mean()),
           "auroc": {k: auroc(sig[k], gold) for k in ("d", "reward", "contrast")}, "beta2": {}}
  for b2 in beta2s:
    cc = beta / (b2 * d + FLOOR)
    row = {"mean": cc.mean(), "median": float(np.median(cc)), "above_10": float((cc > 10).mean()), "max": cc.max(),
           "gold": cc[gold].mean(), "other": cc[~gold].mean()}
    stats["beta2"][str(b2)] = {k: float(v) for k, v in row.items()}
    lines.append(f"| {b2:g} | {row['mean']:.3f} | {row['median']:.4f} | {row['above_10']:.3f} | {row['max']:.1f} | "
                 f"{row['gold']:.3f} | {row['other']:.3f} |")
  with open(os.path.join(out, "coef.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "coef.json"), "w") as f:
    json.dump(stats, f, indent=2)
  print("\n".join(lines))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  bins = np.linspace(0.0, 2.0, 41)
  ax.hist(d[~gold], bins, density=True, alpha=0.6, color="tab:gray", label=f"other tokens ({int((~gold).sum())})")
  ax.hist(d[gold], bins, density=True, alpha=0.6, color="tab:red", label=f"gold reward-bearing ({int(gold.sum())})")
  ax.set(xlabel="d = sum_v |p_dpo(v) - p_rdpo(v)|  (w = beta2 d + 1e-3, c = beta / w)", ylabel="density",
         yscale="log", title=f"AlignDistil's disagreement on held-out responses (AUROC {stats['auroc']['d']:.3f})")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "coef.png"), dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/ablations/aligndistil_beta2")
  p.add_argument("--beta2", default="1,5,15,30")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--set", action="append", default=[], help="field=value for every run (repeatable)")
  p.add_argument("--skip_runs", action="store_true", help="only re-make the sweep's table and plot")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  beta2s = [float(x) for x in a.beta2.split(",")]
  coefficient_report(token_signals(a.set), beta2s, a.out)
  alpha_sweep(CONFIG + ":adaptive,on_policy", a.out, a.beta2, a.seeds, a.steps, a.set, COLUMNS,
              "beta2 (AlignDistil, adaptive, on-policy)", "log", a.skip_runs, field="method.beta2")


if __name__ == "__main__":
  main()
