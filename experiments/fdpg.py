"""f-DPG (Go et al., ICML 2023): approximate a target distribution with any f-divergence.

  python -m jaxopd.main --config experiments/fdpg.py --workdir runs/fdpg                 # pointwise, JS
  python -m jaxopd.main --config experiments/fdpg.py:rlhf,fkl --workdir runs/fdpg_rlhf_fkl

Pipeline (each stage cached): data and the SFT base of experiments/tdpo.py
(``config.sft.workdir``, shared with TDPO/SparsePO) -> target fit ->
on-policy f-DPG from the base -> before/after report (summary.json, .png).

The base model ``a`` is the SFT base (frozen, ``frozen["base"]``); the policy
starts from it. Targets (``config.method.target``):

* ``pointwise``: ``P(x) = a(x) b(x)``, ``b`` = the response uses one of
  ``config.method.words`` (default "wonderful", ~2% of base samples);
* ``distributional``: ``P(x) = a(x) exp(lambda phi(x))``, ``phi`` = the review
  mentions ``config.method.topic`` (music: ~20% of base samples), ``lambda``
  fitted on ``config.method.fit_samples`` base samples so that
  ``E_p[phi] = config.method.topic_mean`` (0.5, the GDC "half of the
  biographies" setting);
* ``rlhf``: ``P(x) = a(x) exp(r(x) / beta)`` with the gold reward ``r``.

Unconditional by default (every sample starts from BOS, one log Z); with
``config.method.conditional`` each training prompt of the reviews suite is a
context with its own log Z. ``config.method.offline``: samples come from a
proposal that is replaced by the policy when the policy's estimated
KL(p||pi) is lower (checked every ``proposal_every`` steps), as in disco.

Evaluation (held-out samples from the policy): importance-sampled KL(p||pi),
KL(pi||p), TV and JS to the true target, using a log Z estimated once from
``fit_samples`` base samples per evaluation context (stored in
``config.eval.log_z``); alignment (b, E[phi] or the gold reward), KL(pi||a),
per-token entropy, distinct-1/2, self-BLEU.

Presets: ``pointwise``, ``distributional``, ``rlhf``; ``fkl``, ``rkl``, ``tv``,
``js``; ``offline``, ``conditional``; ``smoke``. Measured numbers:
experiments/README.md.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxopd import checkpoint as ckpt_lib
from jaxopd import config as config_lib
from jaxopd import fdpg, train
from jaxopd.data import batched_iterator, reviews, suite as suite_lib
from jaxopd.errors import ConfigError
from jaxopd.evaluation import compiled, distinct_n, self_bleu, to_host, token_entropy
from jaxopd.experiment import Experiment, load_module, parse_arg
from jaxopd.losses import response_mask, token_logprobs
from jaxopd.losses.fdpg import F_DIVERGENCES, divergence_estimates
from jaxopd.models import Transformer, table
from jaxopd.sampling import SamplingConfig, sample

HERE = os.path.dirname(os.path.abspath(__file__))
TDPO = load_module(os.path.join(HERE, "tdpo.py"))


def get_config(arg: str | None = None):
  args = parse_arg(arg, presets=("smoke", "offline", "conditional") + fdpg.TARGETS + F_DIVERGENCES)
  smoke = bool(args.get("smoke"))
  t = TDPO.get_config("smoke" if smoke else None)
  c = config_lib.base_config()
  c.total_steps = 300
  c.batch_size = 64              # samples per step
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 20
  c.optim.clip_norm = 1.0
  c.eval_every = 50
  c.eval_batches = 0             # no eval split: evaluation samples from the policy
  c.checkpoint.every = 100
  c.model = t.model              # the SFT base's architecture
  c.data = t.data
  c.sft = t.sft                  # the SFT base run (shared with TDPO)
  c.models.policy = table.role(init="stage:sft")
  c.models.base = table.role(init="stage:sft", trainable=False)   # the base (proposal, target's a(x))

  c.method = ml_collections.ConfigDict()
  c.method.target = "pointwise"  # pointwise | distributional | rlhf
  c.method.divergence = "js"     # fkl (= DPG) | rkl | tv | js
  c.method.eps = -1.0            # pointwise: floor of b in the training target; -1 = auto (1e-3 for rkl, else 0)
  c.method.words = "wonderful"   # pointwise: "|"-separated words, any of which satisfies b
  c.method.topic = "music"       # distributional: phi = the review names one of this topic's nouns
  c.method.topic_mean = 0.5      # distributional: target E_p[phi]
  c.method.lambdas = ()          # distributional: filled by the fit in prepare() (or set by hand)
  c.method.reward_beta = 0.1     # rlhf: P = a exp(r / beta)
  c.method.conditional = False   # per-prompt targets (one log Z per training prompt)
  c.method.samples_per_context = 8  # conditional: samples per prompt in a step (batch_size / 8 prompts)
  c.method.offline = False       # sample from a proposal, replaced when the policy is closer
  c.method.proposal_every = 16   # offline: steps between proposal checks (disco's default)
  c.method.baseline_window = 1024  # pseudo-rewards in the moving-average baseline (disco's default)
  c.method.fit_samples = 4096    # base samples for lambda and the evaluation log Z (per eval context)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.max_new_tokens = 64  # response budget (base samples average ~30 tokens)
  c.rollout.prompt_len = 16      # conditional: padded prompt tokens (unconditional: 1, BOS)
  c.rollout.temperature = 1.0    # f-DPG needs ancestral sampling: other values are refused
  c.rollout.top_k = 0
  c.rollout.top_p = 1.0

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 256       # policy samples per evaluation (spread over the contexts)
  c.eval.contexts = 16           # conditional: held-out prompts evaluated
  c.eval.log_z = ()              # filled by prepare(): log Z of the true target per eval context
  c.eval.bleu_samples = 200      # samples in the self-BLEU estimate

  for name in fdpg.TARGETS:
    if args.get(name):
      c.method.target = name
  for name in F_DIVERGENCES:
    if args.get(name):
      c.method.divergence = name
  c.method.offline = bool(args.get("offline"))
  c.method.conditional = bool(args.get("conditional"))
  if smoke:
    c.total_steps = 6
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.eval_every = 3
    c.log_every = 1
    c.checkpoint.every = 3
    c.method.fit_samples = 64
    c.method.proposal_every = 2
    c.method.words = "the"     # frequent enough for a 64-sample fit of a smoke model
    c.rollout.max_new_tokens = 12
    c.rollout.prompt_len = 8
    c.eval.num_samples = 16
    c.eval.contexts = 2
    c.eval.bleu_samples = 16
    c.method.samples_per_context = 4
  c.seq_len = _prompt_len(c) + c.rollout.max_new_tokens
  return c


def _prompt_len(c) -> int:
  return c.rollout.prompt_len if c.method.conditional else 1


def _scfg(c, tok) -> SamplingConfig:
  return SamplingConfig(max_new_tokens=c.rollout.max_new_tokens, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id, temperature=c.rollout.temperature, top_k=c.rollout.top_k,
                        top_p=c.rollout.top_p)


def _check(c):
  m = c.method
  if m.target not in fdpg.TARGETS:
    raise ConfigError(f"config.method.target={m.target!r}: must be one of {fdpg.TARGETS}")
  if m.divergence not in F_DIVERGENCES:
    raise ConfigError(f"config.method.divergence={m.divergence!r}: must be one of {F_DIVERGENCES}")
  if m.target != "pointwise" and m.eps != -1.0:
    raise ConfigError(f"config.method.eps={m.eps}: the floor applies to pointwise targets only (leave it at -1)")
  if m.target == "rlhf" and m.reward_beta <= 0:
    raise ConfigError(f"config.method.reward_beta={m.reward_beta}: must be positive")
  if m.target == "distributional" and not 0.0 < m.topic_mean < 1.0:
    raise ConfigError(f"config.method.topic_mean={m.topic_mean}: must be in (0, 1)")
  if m.topic not in reviews.TOPIC_NAMES:
    raise ConfigError(f"config.method.topic={m.topic!r}: must be one of {reviews.TOPIC_NAMES}")
  if m.conditional and (c.batch_size // c.grad_accum) % m.samples_per_context:
    raise ConfigError(f"config.method.samples_per_context={m.samples_per_context}: must divide the microbatch "
                      f"config.batch_size / config.grad_accum = {c.batch_size // c.grad_accum}")
  for f in ("proposal_every", "baseline_window", "fit_samples", "samples_per_context"):
    if m[f] <= 0:
      raise ConfigError(f"config.method.{f}={m[f]}: must be positive")
  if c.seq_len != _prompt_len(c) + c.rollout.max_new_tokens:
    raise ConfigError(f"config.seq_len={c.seq_len}: f-DPG's sequences are prompt + response, so it must equal "
                      f"{_prompt_len(c)} + config.rollout.max_new_tokens={c.rollout.max_new_tokens}")
  if c.seq_len > c.model.max_len:
    raise ConfigError(f"config.rollout.max_new_tokens={c.rollout.max_new_tokens}: prompt + response exceeds "
                      f"config.model.max_len={c.model.max_len}")
  if c.eval.num_samples % _eval_contexts(c) != 0:
    raise ConfigError(f"config.eval.num_samples={c.eval.num_samples}: must be a multiple of the "
                      f"{_eval_contexts(c)} evaluation contexts")
  fdpg.check_sampling(SamplingConfig(max_new_tokens=1, eos_id=0, temperature=c.rollout.temperature,
                                     top_k=c.rollout.top_k, top_p=c.rollout.top_p))


def _eps(c) -> float:
  """The pointwise floor actually used (reverse KL needs one: log P = -inf where b = 0)."""
  if c.method.eps != -1.0:
    return float(c.method.eps)
  return 1e-3 if (c.method.target == "pointwise" and c.method.divergence == "rkl") else 0.0


def _eval_contexts(c) -> int:
  return c.eval.contexts if c.method.conditional else 1


def _word_ids(tok, words: str, field: str, skip_unknown: bool = False) -> tuple:
  """Token ids of ``"w1|w2"``; a word outside the vocabulary (this world's
  corpus never uses it) is an error, or skipped for a topic's noun list."""
  ids = []
  for w in [w.strip() for w in words.split("|") if w.strip()]:
    i = tok.convert_tokens_to_ids(w)
    if i is None or i == tok.unk_token_id:
      if skip_unknown:
        continue
      raise ConfigError(f"{field}={words!r}: {w!r} is not a word of the reviews vocabulary")
    ids.append(int(i))
  if not ids:
    raise ConfigError(f"{field}={words!r}: none of these words is in the reviews vocabulary")
  return tuple(ids)


def make_target(c, suite, lambdas=None) -> fdpg.Target:
  m, tok = c.method, suite.tokenizer
  if m.target == "pointwise":
    return fdpg.Target("pointwise", token_ids=_word_ids(tok, m.words, "config.method.words"))
  if m.target == "distributional":
    ids = _word_ids(tok, "|".join(reviews.TOPIC_NOUNS[m.topic]), "config.method.topic", skip_unknown=True)
    lam = tuple(float(x) for x in (m.lambdas if lambdas is None else lambdas)) or (0.0,)
    return fdpg.Target("distributional", feature_ids=(ids,), lambdas=lam)
  return fdpg.Target("rlhf", reward_fn=suite_lib.gold_reward_fn(suite), beta=float(m.reward_beta))


def _prompts(c, suite, split: str, n: int | None = None):
  """(prompt [N, P], prompt_len [N]); unconditional: N rows of BOS."""
  tok = suite.tokenizer
  if not c.method.conditional:
    n = n or 1
    return np.full((n, 1), tok.bos_token_id, np.int32), np.ones((n,), np.int32)
  recs = suite_lib.prompt_records(suite, split, c.rollout.prompt_len, verbose=False)[:n]
  return np.stack([r["prompt"] for r in recs]), np.stack([r["prompt_len"] for r in recs])


# --- stages --------------------------------------------------------------------

def prepare(config, workdir: str):
  """Data and SFT base (TDPO's cached stages), then the target fit (cached in workdir/target.json)."""
  _check(config)
  if config.data.task != "reviews":
    raise ConfigError(f"config.data.task={config.data.task!r}: f-DPG's targets are defined on the reviews task")
  suite_lib.ensure(config.data)
  sft, s = TDPO._sft_config(config)
  if not ckpt_lib.finished(config.sft.workdir, s.total_steps):
    print(f"[stage] SFT base -> {config.sft.workdir} ({s.total_steps} steps)", flush=True)
    train.run(s, config.sft.workdir, sft.build(s))
  table.fill_stage(config, "sft", TDPO.sft_init(config))
  fit = _fit_target(config, workdir)
  with config.unlocked():
    if config.method.target == "distributional" and not config.method.lambdas:
      config.method.lambdas = tuple(fit["lambdas"])
    config.eval.log_z = tuple(fit["log_z"])
  return config


def _draw_with_features(scfg, target, with_features, model, prompt, plen, rng):
  """Samples of ``model`` and the target's features of them (zeros when it has none)."""
  out = sample(model, prompt, plen, rng, scfg)
  feats = target.features(out.tokens, out.loss_mask) if with_features else jnp.zeros((prompt.shape[0], 1))
  return out.tokens, out.loss_mask, feats


def _fit_target(config, workdir: str) -> dict:
  """lambda (distributional) and the true target's log Z per evaluation context, from base samples.

  Cached by its inputs under ``config.data.data_dir/fdpg_targets/`` (runs of a
  sweep share one fit) and copied to ``workdir/target.json``."""
  m = config.method
  key = {"sft": config.models.base.init, "target": m.target, "words": m.words, "topic": m.topic,
         "topic_mean": m.topic_mean, "lambdas": list(m.lambdas), "reward_beta": m.reward_beta,
         "conditional": m.conditional, "fit_samples": m.fit_samples, "contexts": _eval_contexts(config),
         "max_new_tokens": config.rollout.max_new_tokens, "seed": config.seed}
  import hashlib
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  shared = os.path.join(config.data.data_dir, "fdpg_targets", f"{digest}.json")
  path = os.path.join(workdir, "target.json")
  for p in (path, shared):
    if os.path.exists(p):
      with open(p) as f:
        cached = json.load(f)
      if cached["key"] == key:
        if p == shared:
          os.makedirs(workdir, exist_ok=True)
          with open(path, "w") as f:
            json.dump(cached, f, indent=2)
        return cached
  suite = suite_lib.ensure(config.data, verbose=False)
  base, _ = table.load_model(config.models.base.init, "base")
  k = _eval_contexts(config)
  prompt, plen = _prompts(config, suite, "test", k)
  scfg = _scfg(config, suite.tokenizer)
  target0 = make_target(config, suite, lambdas=(0.0,))
  draw = compiled(_draw_with_features, (scfg, target0, m.target != "rlhf"), base)

  chunk = 512
  feats, log_phi_extra, ctx_ids = [], [], []
  rng = jax.random.PRNGKey(config.seed + 7)
  for ci in range(k):
    done = 0
    while done < m.fit_samples:
      n = min(chunk, m.fit_samples - done)
      rng, sub = jax.random.split(rng)
      toks, mask, f = jax.device_get(draw(np.repeat(prompt[ci:ci + 1], n, 0), np.repeat(plen[ci:ci + 1], n), sub))
      feats.append(np.asarray(f, np.float64))
      if m.target == "rlhf":
        log_phi_extra.append(np.asarray(target0.reward_fn(toks, mask), np.float64) / m.reward_beta)
      ctx_ids.append(np.full(n, ci))
      done += n
  feats, ctx_ids = np.concatenate(feats), np.concatenate(ctx_ids)
  out = {"key": key, "base_rate": float(feats[:, 0].mean())}
  if m.target == "pointwise":
    log_phi = np.where(feats[:, 0] > 0, 0.0, -np.inf)
  elif m.target == "distributional":
    lam = np.asarray(m.lambdas, np.float64) if m.lambdas else fdpg.fit_lambdas(feats, np.array([m.topic_mean]))
    out["lambdas"] = lam.tolist()
    log_phi = feats @ lam
  else:
    log_phi = np.concatenate(log_phi_extra)
    out["base_reward"] = float(np.mean(log_phi) * m.reward_beta)
  # Samples are from a, so Z = E_a[P / a] = E_a[phi] per context.
  log_z = []
  for ci in range(k):
    lp = log_phi[ctx_ids == ci]
    if not np.any(np.isfinite(lp)):
      raise ValueError(f"target fit: none of {len(lp)} base samples of context {ci} satisfies "
                       f"config.method.words={m.words!r}; Z cannot be estimated (choose a more frequent word "
                       f"or raise config.method.fit_samples)")
    mx = lp[np.isfinite(lp)].max()
    log_z.append(float(mx + np.log(np.mean(np.exp(lp - mx)))))
  out["log_z"] = log_z
  rate = f"base reward {out['base_reward']:.4f}" if m.target == "rlhf" else f"base rate {out['base_rate']:.4f}"
  print(f"[stage] target {m.target}: {rate}"
        + (f", lambda {out['lambdas']}" if "lambdas" in out else "")
        + f", log Z {np.round(log_z[:4], 4).tolist()}{' ...' if k > 4 else ''} "
        f"({m.fit_samples} base samples per context)", flush=True)
  for p in (path, shared):
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
      json.dump(out, f, indent=2)
  return out


def build(config) -> Experiment:
  _check(config)
  if len(config.eval.log_z) != _eval_contexts(config):
    raise ConfigError(f"config.eval.log_z has {len(config.eval.log_z)} values for {_eval_contexts(config)} "
                      f"evaluation contexts: run through jaxopd.main (prepare() fits them)")
  if config.method.target == "distributional" and not config.method.lambdas:
    raise ConfigError("config.method.lambdas is empty: run through jaxopd.main (prepare() fits them)")
  m = config.method
  suite = suite_lib.ensure(config.data, verbose=False)
  model_cfg = table.arch(config, "policy")
  target = make_target(config, suite)
  scfg = _scfg(config, suite.tokenizer)
  if m.conditional:
    prompt, plen = _prompts(config, suite, "train")
    records = [{"prompt": p, "prompt_len": l, "context": np.int32(i)} for i, (p, l) in enumerate(zip(prompt, plen))]
  else:
    bos = np.array([suite.tokenizer.bos_token_id], np.int32)
    records = [{"prompt": bos, "prompt_len": np.int32(1), "context": np.int32(0)}] * max(config.batch_size, 64)
  num_contexts = len(records) if m.conditional else 1
  rollout = fdpg.make_rollout(target, m.divergence, scfg, eps=_eps(config), offline=bool(m.offline),
                              proposal_every=int(m.proposal_every) * config.grad_accum,
                              samples_per_context=int(m.samples_per_context) if m.conditional else 1)

  def init_aux():
    proposal = None
    if m.offline:   # overwritten by the policy (= the base) at the first rollout
      proposal = nnx.state(Transformer(model_cfg, nnx.Rngs(params=0)), nnx.Param)
    return fdpg.init_aux(num_contexts, int(m.baseline_window), proposal)

  return Experiment(roles={"policy": True, "base": False}, loss_fn=fdpg.make_loss_fn(m.divergence),
                    train_data=lambda shard: batched_iterator(records, shard),
                    rollout=rollout, init_aux=init_aux, evaluate=make_evaluate(config, suite, target))


def make_evaluate(config, suite, target: fdpg.Target):
  """Held-out samples from the policy, scored against the true target (no eps floor)."""
  e = config.eval
  k = _eval_contexts(config)
  prompt, plen = _prompts(config, suite, "test", k)
  per = e.num_samples // k
  prompt, plen = np.repeat(prompt, per, 0), np.repeat(plen, per)
  log_z = np.repeat(np.asarray(e.log_z, np.float32), per)
  scfg = _scfg(config, suite.tokenizer)
  rng = jax.random.PRNGKey(config.seed + 1)

  def evaluate(params, frozen, step):
    fn = compiled(_sample_and_score, (scfg, target), params["policy"], frozen["base"])
    toks, mask, res = to_host(fn(prompt, plen, log_z, rng))
    resp = [t[mm == 1].tolist() for t, mm in zip(np.asarray(toks), np.asarray(mask))]
    out = {f"sample/{n}": float(v) for n, v in res.items()}
    out.update({"sample/distinct1": distinct_n(resp, 1), "sample/distinct2": distinct_n(resp, 2),
                "sample/self_bleu": self_bleu(resp[:e.bleu_samples]),
                "sample/length": float(np.mean([len(r) for r in resp]))})
    return out
  return evaluate


def _sample_and_score(scfg, target, policy, base, prompt, plen, log_z, rng):
  """Samples of the policy scored against the true target: IS divergence estimates, alignment,
  KL to the base, entropy (one compiled call; report() reuses training's through jax's cache)."""
  out = sample(policy, prompt, plen, rng, scfg)
  m = response_mask(out.loss_mask)
  logits = policy(out.tokens).logits
  pi = jnp.sum(token_logprobs(logits, out.tokens) * m, 1)
  a = jnp.sum(token_logprobs(base(out.tokens).logits, out.tokens) * m, 1)
  log_p_score = a + target.log_phi(out.tokens, out.loss_mask)
  res = {f"target/{n}": v for n, v in divergence_estimates(pi, pi, log_p_score, log_z).items()}
  res.update({"alignment": jnp.mean(target.alignment(out.tokens, out.loss_mask)),
              "kl_base": jnp.mean(pi - a), "entropy": token_entropy(logits[:, :-1], m)})
  return out.tokens, out.loss_mask, res

KEYS = ("sample/alignment", "sample/target/kl_target_policy", "sample/target/kl_policy_target", "sample/target/tv",
        "sample/target/js", "sample/kl_base", "sample/entropy", "sample/distinct2", "sample/self_bleu")


def report(config, workdir: str, summary: dict):
  """Before (the base) / after table, summary.json and summary.png in ``workdir``."""
  from jaxopd import logs
  suite = suite_lib.ensure(config.data, verbose=False)
  evaluate = make_evaluate(config, suite, make_target(config, suite))
  _, frozen = summary["trainer"].models(summary["state"], summary["frozen"])
  before = evaluate({"policy": frozen["base"]}, frozen, 0)
  after = summary["eval"]
  print("\n" + f"{'':<12}" + "".join(f"{k.split('/')[-1]:>18}" for k in KEYS))
  for name, r in (("base", before), (f"{config.method.divergence} (after)", after)):
    print(f"{name:<12}" + "".join(f"{r.get(k, float('nan')):>18.4f}" for k in KEYS))
  m = config.method
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"target": m.target, "divergence": m.divergence, "offline": bool(m.offline),
               "conditional": bool(m.conditional), "before": before, "after": after}, f, indent=2)
  _plot(logs.read_metrics(workdir, "eval"), before, os.path.join(workdir, "summary.png"), config)
  print(f"wrote {os.path.join(workdir, 'summary.json')} and summary.png")


def _plot(recs, before, path, config):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  recs = [r for r in recs if "sample/alignment" in r]
  steps = [0] + [r["step"] for r in recs]
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, key, label in ((axes[0], "sample/alignment", "alignment"),
                         (axes[1], "sample/target/tv", "TV(p, pi)"),
                         (axes[2], "sample/distinct2", "distinct-2")):
    ax.plot(steps, [before[key]] + [r[key] for r in recs], marker="o")
    ax.set(xlabel="step", ylabel=label, title=f"{config.method.target}, {config.method.divergence}: {label}")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
