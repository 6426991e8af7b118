"""SparsePO (Christopoulou et al., Findings EMNLP 2025) on the controlled reviews task.

  python -m jaxopd.main --config experiments/sparsepo.py --workdir runs/sparsepo             # learned, shared
  python -m jaxopd.main --config experiments/sparsepo.py:independent --workdir runs/sparsepo_indep
  python -m jaxopd.main --config experiments/sparsepo.py:mapo --workdir runs/mapo

The same pipeline as experiments/tdpo.py (its ``prepare``, evaluation and report
are reused, so the data, the SFT base in ``config.sft.workdir`` and the
preference pairs are shared and cached), with the SparsePO loss of
:mod:`jaxopd.sparsepo`: token weights ``w_u`` on the reward and ``w_d`` on the
KL term of TDPO1, from a learned mask head on the reference's hidden states
(trainable model "mask", optimizer group ``config.optim.groups.mask``, weight
decay 0.01 as the official setup) or from the reference's activations (MaPO).

Extra metrics: ``mask/*`` on the training and held-out pairs (mean weight,
fraction of exact zeros, mean weight on the gold reward-bearing tokens and on
the others) and ``mask/auroc_u`` (``auroc_d``): the mask as a detector of the
reward-bearing response tokens of the held-out pairs (``reviews.reward_positions``).
The report adds ``mask_examples.json`` and ``heatmap.png`` (held-out responses
coloured by their token weights).

Presets: ``mapo``, ``independent``, ``smoke``. Official IMDb setting: beta 0.8,
no L1 (lambda 0), mask weight decay 0.01; here beta defaults to TDPO's 0.1 so
that the two are compared at equal beta. Measured numbers: experiments/README.md.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxopd import sparsepo
from jaxopd.data import batched_iterator, preferences, reviews, suite as suite_lib
from jaxopd.errors import ConfigError
from jaxopd.evaluation import compiled
from jaxopd.experiment import Experiment, load_module, parse_arg
from jaxopd.models import table

HERE = os.path.dirname(os.path.abspath(__file__))
_tdpo = load_module(os.path.join(HERE, "tdpo.py"))


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke", "mapo", "independent"))
  c = _tdpo.get_config("smoke" if args.get("smoke") else None)
  c.method = ml_collections.ConfigDict()
  c.method.mask = "learned"      # learned (mask head on the reference's hidden states) | mapo (activations)
  c.method.shared = True         # learned: one mask for w_u and w_d (False: two independent heads); mapo: True
  c.method.beta = 0.1            # inverse temperature (TDPO's default; the paper's IMDb runs use 0.8)
  c.method.lambda_u = 0.0        # L1 penalty on w_u per response token (halved when shared); learned only
  c.method.lambda_d = 0.0        # L1 penalty on w_d (halved when shared); learned only
  c.method.mask_init = "uniform"  # learned: uniform (PyTorch nn.Linear default, official) | ones (starts at 1 = TDPO1)
  c.method.kl_chunk = 64         # positions per chunk of the vocabulary-wide KL
  c.optim.groups.mask = ml_collections.ConfigDict({"weight_decay": 0.01})  # the mask head's group (learned)
  c.heatmap_examples = 6         # held-out responses drawn in heatmap.png
  c.compare_with = ""            # a finished TDPO/DPO run to put in the report ("" = none)
  if args.get("mapo"):
    c.method.mask = "mapo"
    del c.optim.groups["mask"]
  if args.get("independent"):
    c.method.shared = False
  return c


def label(config) -> str:
  m = config.method
  return "mapo" if m.mask == "mapo" else f"sparsepo-{'shared' if m.shared else 'indep'}"


def _check(c):
  m = c.method
  if m.mask not in sparsepo.MASKS:
    raise ConfigError(f"config.method.mask={m.mask!r}: must be one of {sparsepo.MASKS}")
  if m.beta <= 0:
    raise ConfigError(f"config.method.beta={m.beta}: must be positive")
  for f in ("lambda_u", "lambda_d"):
    if m[f] < 0:
      raise ConfigError(f"config.method.{f}={m[f]}: must be >= 0")
  if m.mask_init not in sparsepo.INITS:
    raise ConfigError(f"config.method.mask_init={m.mask_init!r}: must be one of {sparsepo.INITS}")
  if m.kl_chunk <= 0:
    raise ConfigError(f"config.method.kl_chunk={m.kl_chunk}: must be positive")
  if m.mask == "mapo":
    if not m.shared:
      raise ConfigError("config.method.shared=False: MaPO has one mask for both terms (use mask=learned)")
    if m.lambda_u or m.lambda_d:
      raise ConfigError(f"config.method.lambda_u={m.lambda_u}, lambda_d={m.lambda_d}: the MaPO mask is "
                        f"detached, an L1 penalty on it does nothing (use 0)")
    if m.mask_init != "uniform":
      raise ConfigError(f"config.method.mask_init={m.mask_init!r}: only the learned mask is initialised")
    if "mask" in c.optim.groups:
      raise ConfigError("config.optim.groups.mask: MaPO has no mask model to train (the preset ':mapo' "
                        "drops this group)")


def _tdpo_view(config, loss="tdpo1"):
  """The config as experiments/tdpo.py reads it (data, SFT base, pairs, evaluation)."""
  v = config.copy_and_resolve_references()
  v.method = ml_collections.ConfigDict(dict(loss=loss, beta=config.method.beta, alpha=0.5, log_kl=True,
                                            kl_chunk=config.method.kl_chunk))
  return v


def prepare(config, workdir: str):
  """TDPO's stages 1-3 (data, SFT base, pairs; cached); policy and reference start from the SFT base,
  the mask head from its initialiser."""
  if config.method.mask == "mapo" and "mask" in config.optim.groups:
    del config.optim.groups["mask"]        # --config.method.mask=mapo on the default config
  _check(config)
  view = _tdpo.prepare(_tdpo_view(config), workdir)
  config.models = view.models
  return config


def gold_tokens(suite, tokens: np.ndarray) -> np.ndarray:
  """``tokens[..., T]`` -> 1.0 where the token is a word that carries the gold reward of its full text
  (``reviews.reward_positions``), same shape."""
  tok = suite.tokenizer
  special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
  vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
  flat = tokens.reshape(-1, tokens.shape[-1])
  out = np.zeros(flat.shape, np.float32)
  for r, row in enumerate(flat.tolist()):
    idx = [i for i, t in enumerate(row) if t not in special]
    for p in reviews.reward_positions([vocab[row[i]] for i in idx]):
      out[r, idx[p]] = 1.0
  return out.reshape(tokens.shape)


def build(config) -> Experiment:
  _check(config)
  model_cfg = table.arch(config, "policy")
  m = config.method
  suite = None
  if config.data.task == "files":
    _, train_recs, test_recs = suite_lib.file_records(config.data, "preference", config.seq_len,
                                                      default_tokenizer=table.tokenizer_dir(config))
  else:
    suite = suite_lib.ensure(config.data, verbose=False)
    pc = _tdpo._prefs_config(config)
    train_recs, st = preferences.records(pc, "train", config.data.data_dir, suite.tokenizer, config.seq_len,
                                         config.data.over_length, config.prefs.prompt_len)
    test_recs, _ = preferences.records(pc, "test", config.data.data_dir, suite.tokenizer, config.seq_len,
                                       config.data.over_length, config.prefs.prompt_len)
    print(f"preference pairs: {st}")
    train_recs = [dict(r, gold=gold_tokens(suite, r["tokens"])) for r in train_recs]
    test_recs = [dict(r, gold=gold_tokens(suite, r["tokens"])) for r in test_recs]
  loss_fn = sparsepo.make_loss_fn(m.mask, m.shared, m.beta, m.lambda_u, m.lambda_d, m.kl_chunk)

  def init_heads(rng):
    return {"mask": sparsepo.SparseMask(model_cfg.n_layers, model_cfg.d_model, m.shared, nnx.Rngs(params=rng),
                                        m.mask_init)}

  return Experiment(roles={"policy": True, "reference": False},
                    init_heads=init_heads if m.mask == "learned" else None, loss_fn=loss_fn,
                    train_data=lambda shard: batched_iterator(train_recs, shard),
                    eval_data=(lambda shard: batched_iterator(test_recs, shard, shuffle=False, repeat=False))
                    if test_recs else None,
                    evaluate=make_evaluate(config, suite, test_recs) if suite is not None else None)


def _token_weights(mask, reference, mask_model, tokens, loss_mask):
  from jaxopd.losses import response_mask
  ref_logits, hidden = sparsepo.reference_outputs(reference, tokens)
  m = response_mask(loss_mask)
  w_u, w_d = sparsepo.token_weights(mask, mask_model, hidden, ref_logits, m)
  return w_u, w_d, m


def mask_weights(config, mask_model, reference, tokens, loss_mask):
  """Token weights on ``tokens[N, T]``: ``(w_u, w_d, m)`` numpy ``[N, T-1]`` (entry t weights token t+1)."""
  fn = compiled(_token_weights, (config.method.mask,), reference, mask_model)
  out = fn(jnp.asarray(tokens), jnp.asarray(loss_mask))
  return tuple(np.asarray(x) for x in jax.device_get(out))


def make_evaluate(config, suite, test_recs):
  """TDPO's sampled evaluation plus the mask's AUROC on the held-out pairs' reward-bearing tokens."""
  sample_eval = _tdpo.make_evaluate(config, suite)
  tokens = np.stack([r["tokens"] for r in test_recs]).reshape(-1, config.seq_len)
  lmask = np.stack([r["loss_mask"] for r in test_recs]).reshape(-1, config.seq_len)
  gold = np.stack([r["gold"] for r in test_recs]).reshape(-1, config.seq_len)[:, 1:]
  independent = config.method.mask == "learned" and not config.method.shared

  def evaluate(params, frozen, step):
    out = sample_eval(params, frozen, step)
    w_u, w_d, m = mask_weights(config, params.get("mask"), frozen["reference"], tokens, lmask)
    valid = m > 0
    out["mask/auroc_u"] = sparsepo.auroc(w_u[valid], gold[valid])
    if independent:
      out["mask/auroc_d"] = sparsepo.auroc(w_d[valid], gold[valid])
    return out
  return evaluate


def examples(config, suite, params, frozen, n: int, split: str = "test") -> list[dict]:
  """The first ``n`` held-out pairs' responses (chosen, then rejected) with their per-token weights."""
  pc = _tdpo._prefs_config(config)
  recs, _ = preferences.records(pc, split, config.data.data_dir, suite.tokenizer, config.seq_len,
                                config.data.over_length, config.prefs.prompt_len)
  recs = recs[:max(1, (n + 1) // 2)]
  tokens = np.stack([r["tokens"] for r in recs]).reshape(-1, config.seq_len)
  lmask = np.stack([r["loss_mask"] for r in recs]).reshape(-1, config.seq_len)
  gold = gold_tokens(suite, tokens)
  w_u, w_d, _ = mask_weights(config, params.get("mask"), frozen["reference"], tokens, lmask)
  vocab = suite.tokenizer.convert_ids_to_tokens(list(range(len(suite.tokenizer))))
  special = {suite.tokenizer.pad_token_id, suite.tokenizer.bos_token_id}
  out = []
  for i in range(min(n, len(tokens))):
    resp = [t for t in range(1, config.seq_len) if lmask[i, t]]
    prompt = [t for t in range(config.seq_len) if not lmask[i, t] and tokens[i, t] not in special
              and (not resp or t < resp[0])]
    out.append({"side": "chosen" if i % 2 == 0 else "rejected",
                "prompt": [vocab[tokens[i, t]] for t in prompt],
                "words": [vocab[tokens[i, t]] for t in resp],
                "w_u": [float(w_u[i, t - 1]) for t in resp],      # w[:, t-1] weights token t
                "w_d": [float(w_d[i, t - 1]) for t in resp],
                "gold": [int(gold[i, t]) for t in resp]})
  return out


def heatmap(panels: dict, path: str, key: str = "w_u"):
  """One panel per mask (``{title: examples}``): each response's words on a background coloured by
  its token weight (``key``), the prompt in grey, reward-bearing words underlined."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import colors
  width, char_w, line_h = 118, 1.0, 1.0
  layouts, total = [], 0
  for title, exs in panels.items():
    lines = []
    for ex in exs:
      row, col = [], 0
      items = [(w, None, 0) for w in ex["prompt"]] + list(zip(ex["words"], ex[key], ex["gold"]))
      for word, weight, g in items:
        if col + len(word) + 1 > width and row:
          lines.append(row)
          row, col = [], 0
        row.append((col, word, weight, g))
        col += len(word) + 1
      lines.append(row)
      lines.append([(0, f"({ex['side']})", None, 0)])
    vmax = max([max(ex[key], default=0.0) for ex in exs] + [1e-6])
    layouts.append((title, lines, vmax))
    total += len(lines) + 2
  fig, ax = plt.subplots(figsize=(width * 0.105, total * 0.26 + 0.6))
  ax.set_xlim(0, width)
  ax.set_ylim(total, 0)
  ax.axis("off")
  y = 0
  cmap = matplotlib.colormaps["YlOrRd"]
  for title, lines, vmax in layouts:
    norm = colors.Normalize(0.0, vmax)
    ax.text(0, y + 0.8, f"{title}   (colour: {key}, 0 pale yellow -> {vmax:.2f} red; underlined: gold reward-bearing)",
            fontsize=9, fontweight="bold", family="monospace")
    y += 1.6
    for line in lines:
      for col, word, weight, g in line:
        kw = dict(fontsize=8, family="monospace", va="center")
        if weight is None:
          ax.text(col * char_w, y + 0.5, word, color="grey", **kw)
        else:
          ax.text(col * char_w, y + 0.5, word, bbox=dict(boxstyle="square,pad=0.1", lw=0,
                  facecolor=cmap(norm(weight))), **kw)
          if g:
            ax.plot([col * char_w, (col + len(word)) * char_w], [y + 0.9, y + 0.9], color="black", lw=0.8)
      y += line_h
    y += 0.4
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def report(config, workdir: str, summary: dict):
  """TDPO's before/after table and summary files, the mask statistics, mask_examples.json and heatmap.png."""
  _tdpo.report(_tdpo_view(config, loss=label(config)), workdir, summary)
  ev = summary["eval"]
  names = ("u", "d") if config.method.mask == "learned" and not config.method.shared else ("u",)
  for n in names:
    print(f"mask w_{n}: zero fraction {ev.get(f'mask/{n}_zero', float('nan')):.3f}, mean "
          f"{ev.get(f'mask/{n}_mean', float('nan')):.3f}, on gold reward-bearing tokens "
          f"{ev.get(f'mask/{n}_gold', float('nan')):.3f} vs others {ev.get(f'mask/{n}_other', float('nan')):.3f}, "
          f"AUROC {ev.get(f'mask/auroc_{n}', float('nan')):.3f}")
  if config.data.task == "files":
    return
  suite = suite_lib.ensure(config.data, verbose=False)
  params, frozen = summary["trainer"].models(summary["state"], summary["frozen"])
  exs = examples(config, suite, params, frozen, config.heatmap_examples)
  with open(os.path.join(workdir, "mask_examples.json"), "w") as f:
    json.dump({"label": label(config), "examples": exs}, f)
  heatmap({label(config): exs}, os.path.join(workdir, "heatmap.png"))
  print(f"wrote {os.path.join(workdir, 'mask_examples.json')} and heatmap.png")
