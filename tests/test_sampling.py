"""The KV-cache sampler and speculative decoding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopd import mesh as mesh_lib
from jaxopd.losses import token_logprobs
from jaxopd.models import ModelConfig, Transformer
from jaxopd.sampling import SamplingConfig, process_logits, sample, speculative_sample
from jaxopd.mesh import tree_shardings

V = 11
EOS = 2


def _model(seed, d=32, layers=2, heads=4, kv=2, std=0.3, family="llama", vocab=V):
  cfg = ModelConfig(family=family, vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                    n_kv_heads=kv if family == "llama" else 0, max_len=64, init_std=std)
  return Transformer(cfg, nnx.Rngs(params=seed))


PROMPT = jnp.array([[1, 5, 6, 7, 0, 0], [1, 8, 0, 0, 0, 0], [1, 4, 4, 9, 4, 9], [1, 3, 0, 0, 0, 0]])
PLEN = jnp.array([4, 2, 6, 2])


def _check_layout(out, n, eos=EOS):
  toks, mask = np.asarray(out.tokens), np.asarray(out.loss_mask)
  for b in range(PROMPT.shape[0]):
    pl = int(PLEN[b])
    np.testing.assert_array_equal(toks[b, :pl], np.asarray(PROMPT[b, :pl]))   # prompt kept, right-padded
    assert mask[b, :pl].sum() == 0
    L = int(out.lengths[b])
    assert mask[b, pl:pl + L].all() and mask[b].sum() == L and L <= n
    resp = toks[b, pl:pl + L]
    assert (resp[:-1] != eos).all()                     # stops at the first EOS
    assert L == n or resp[-1] == eos


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sampler_logprobs_equal_teacher_forced_forward(family):
  m = _model(0, family=family)
  cfg = SamplingConfig(max_new_tokens=9, eos_id=EOS, temperature=0.7, top_k=6)
  out = jax.jit(lambda r: sample(m, PROMPT, PLEN, r, cfg))(jax.random.key(3))
  _check_layout(out, 9)
  logits = m(out.tokens).logits                        # right-padded: causal attention suffices
  mask = np.asarray(out.loss_mask[:, 1:])
  model_lp = np.asarray(token_logprobs(logits, out.tokens)) * mask
  np.testing.assert_allclose(np.asarray(out.model_logprobs[:, 1:]), model_lp, atol=2e-5)
  samp_lp = np.take_along_axis(np.asarray(process_logits(logits[:, :-1], cfg)),
                               np.asarray(out.tokens[:, 1:, None]), -1)[..., 0] * mask
  np.testing.assert_allclose(np.asarray(out.logprobs[:, 1:]), samp_lp, atol=2e-5)
  assert np.all(np.isfinite(samp_lp))                   # sampled tokens are inside the top-k set


def test_greedy_equals_stepwise_argmax_of_full_forward():
  m = _model(1)
  n = 8
  out = jax.jit(lambda r: sample(m, PROMPT, PLEN, r, SamplingConfig(max_new_tokens=n, eos_id=EOS, greedy=True)))(
      jax.random.key(0))
  _check_layout(out, n)
  width = PROMPT.shape[1] + n
  full = jax.jit(lambda t: m(t).logits[0])   # one compiled full forward; causal, so right padding is inert
  for b in range(PROMPT.shape[0]):
    seq = list(np.asarray(PROMPT[b, :int(PLEN[b])]))
    for _ in range(n):
      nxt = int(jnp.argmax(full(jnp.asarray([seq + [0] * (width - len(seq))]))[len(seq) - 1]))
      seq.append(nxt)
      if nxt == EOS:
        break
    got = np.asarray(out.tokens[b, :int(PLEN[b]) + int(out.lengths[b])])
    np.testing.assert_array_equal(got, np.asarray(seq))


def test_top_p_keeps_the_smallest_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  lp = process_logits(logits, SamplingConfig(max_new_tokens=1, eos_id=0, top_p=0.8))
  np.testing.assert_allclose(np.exp(np.asarray(lp[0])), [0.625, 0.375, 0, 0], atol=1e-6)
  lp = process_logits(logits, SamplingConfig(max_new_tokens=1, eos_id=0, top_p=0.81))
  np.testing.assert_allclose(np.exp(np.asarray(lp[0])), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-6)


def test_same_key_same_samples_on_1_and_8_devices():
  m = _model(2)
  gd, state = nnx.split(m)
  cfg = SamplingConfig(max_new_tokens=10, eos_id=EOS)
  prompt = jnp.tile(PROMPT, (2, 1))
  plen = jnp.tile(PLEN, 2)
  fn = lambda st, pr, pl, r: sample(nnx.merge(gd, st), pr, pl, r, cfg).tokens
  one = jax.jit(fn)(state, prompt, plen, jax.random.key(7))
  mesh = mesh_lib.make_mesh((2, 2, 2))
  rules = mesh_lib.DEFAULT_RULES
  st_sh = tree_shardings(state, mesh, rules)
  b_sh = mesh_lib.sharding_for(mesh, ("batch", None), rules)
  with jax.set_mesh(mesh), mesh_lib.use_rules(rules):
    eight = jax.jit(fn, in_shardings=(st_sh, b_sh, mesh_lib.sharding_for(mesh, ("batch",), rules), None))(
        jax.device_put(state, st_sh), prompt, plen, jax.random.key(7))
  assert len(eight.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(eight), np.asarray(one))


def test_greedy_speculative_decoding_equals_target_greedy():
  t, d = _model(3), _model(4, d=16, layers=1, heads=2, kv=1)
  cfg = SamplingConfig(max_new_tokens=12, eos_id=EOS, greedy=True)
  ref = jax.jit(lambda r: sample(t, PROMPT, PLEN, r, cfg))(jax.random.key(0))
  for gamma in (1, 3, 5):
    sd = jax.jit(lambda r: speculative_sample(t, d, PROMPT, PLEN, r, cfg, gamma=gamma))(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(sd.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(sd.loss_mask), np.asarray(ref.loss_mask))
  assert 0 < float(sd.acceptance_rate) < 1         # a different draft: some, not all, accepted


def test_draft_equal_to_target_accepts_every_token():
  t = _model(5)
  gamma = 4
  cfg = SamplingConfig(max_new_tokens=12, eos_id=99)      # no EOS: every row runs the full budget
  sd = jax.jit(lambda r: speculative_sample(t, t, PROMPT, PLEN, r, cfg, gamma=gamma))(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(sd.accepted), np.asarray(sd.proposed))
  alpha = float(sd.acceptance_rate)
  assert alpha == 1.0
  # tau = (1 - alpha^(gamma+1)) / (1 - alpha) -> gamma + 1 as alpha -> 1.
  assert float(sd.block_efficiency) == gamma + 1
  assert (np.asarray(sd.blocks) == int(np.ceil(12 / (gamma + 1)))).all()


def test_speculative_rows_stop_at_their_own_eos_at_different_rounds():
  """Rows of different prompt lengths hit EOS inside an accepted block at different rounds;
  each stops there (counts frozen) while the others run on."""
  t, d = _model(3), _model(4, d=16, layers=1, heads=2, kv=1)
  cfg = SamplingConfig(max_new_tokens=12, eos_id=0, pad_id=10, greedy=True)
  ref = jax.jit(lambda r: sample(t, PROMPT, PLEN, r, cfg))(jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(ref.lengths), [2, 12, 3, 7])
  for draft, gamma in ((d, 2), (t, 3)):
    sd = jax.jit(lambda r: speculative_sample(t, draft, PROMPT, PLEN, r, cfg, gamma=gamma))(jax.random.key(0))
    _check_layout(sd, 12, eos=0)
    for f in ("loss_mask", "lengths"):
      np.testing.assert_array_equal(np.asarray(getattr(sd, f)), np.asarray(getattr(ref, f)))
    # (sample's tail after the response holds the prompt's own pads, not cfg.pad_id)
    used = np.arange(PROMPT.shape[1] + 12)[None, :] < np.asarray(PLEN + ref.lengths)[:, None]
    np.testing.assert_array_equal(np.where(used, sd.tokens, -1), np.where(used, ref.tokens, -1))
  # draft == target (the last): all accepted; EOS at block positions 2, 3, 3 (of 4) ends rows 0, 2 in
  # round 1, row 3 in round 2.
  np.testing.assert_array_equal(np.asarray(sd.blocks), [1, 3, 1, 2])
  np.testing.assert_array_equal(np.asarray(sd.accepted), 3 * np.asarray(sd.blocks))
  # Sampling: the same layout with rows of different lengths and rounds.
  cfg = SamplingConfig(max_new_tokens=12, eos_id=EOS, temperature=0.8)
  prompt, plen = jnp.tile(PROMPT, (4, 1)), jnp.tile(PLEN, 4)
  sd = jax.jit(lambda r: speculative_sample(t, d, prompt, plen, r, cfg, gamma=3))(jax.random.key(2))
  for i in range(4):
    _check_layout(jax.tree.map(lambda x: x[4 * i:4 * i + 4], sd), 12)
  assert len(set(np.asarray(sd.lengths).tolist())) > 2 and len(set(np.asarray(sd.blocks).tolist())) > 2


def test_speculative_same_key_same_samples_on_1_and_8_devices():
  t, d = _model(3), _model(4, d=16, layers=1, heads=2, kv=1)
  (gt, st), (gd, sd) = nnx.split(t), nnx.split(d)
  cfg = SamplingConfig(max_new_tokens=10, eos_id=EOS)
  prompt, plen = jnp.tile(PROMPT, (2, 1)), jnp.tile(PLEN, 2)
  fn = lambda a, b, pr, pl, r: speculative_sample(nnx.merge(gt, a), nnx.merge(gd, b), pr, pl, r, cfg, gamma=3).tokens
  one = jax.jit(fn)(st, sd, prompt, plen, jax.random.key(7))
  mesh = mesh_lib.make_mesh((2, 2, 2))
  rules = mesh_lib.DEFAULT_RULES
  t_sh, d_sh = tree_shardings(st, mesh, rules), tree_shardings(sd, mesh, rules)
  b_sh = mesh_lib.sharding_for(mesh, ("batch", None), rules)
  with jax.set_mesh(mesh), mesh_lib.use_rules(rules):
    eight = jax.jit(fn, in_shardings=(t_sh, d_sh, b_sh, mesh_lib.sharding_for(mesh, ("batch",), rules), None))(
        jax.device_put(st, t_sh), jax.device_put(sd, d_sh), prompt, plen, jax.random.key(7))
  assert len(eight.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(eight), np.asarray(one))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_speculative_sampling_is_lossless(temperature):
  """Empirical distribution of 3-token SD outputs vs the target's exact one
  (enumerated over a 4-token vocabulary): chi-square below its 99.9% quantile,
  while the draft's own samples are far from it (the test has power)."""
  vocab, n, num = 4, 3, 6000
  t = _model(6, vocab=vocab, std=0.6)
  d = _model(7, vocab=vocab, d=16, layers=1, heads=2, kv=1, std=0.6)
  cfg = SamplingConfig(max_new_tokens=n, eos_id=99, temperature=temperature)
  prompt = jnp.tile(jnp.array([[1, 3]]), (num, 1))
  plen = jnp.full((num,), 2)
  sd = jax.jit(lambda r: speculative_sample(t, d, prompt, plen, r, cfg, gamma=2))(jax.random.key(11))
  own = jax.jit(lambda r: sample(d, prompt, plen, r, cfg))(jax.random.key(12))
  conts = np.array(list(itertools.product(range(vocab), repeat=n)))
  seqs = jnp.asarray(np.concatenate([np.tile([[1, 3]], (len(conts), 1)), conts], 1))
  lp = process_logits(t(seqs).logits[:, :-1], cfg)
  exact = np.exp(np.asarray(jnp.sum(jnp.take_along_axis(lp, seqs[:, 1:, None], -1)[:, 1:, 0], 1)))
  assert abs(exact.sum() - 1) < 1e-4

  def chi2(tokens):
    codes = np.asarray(tokens[:, 2:2 + n]) @ (vocab ** np.arange(n)[::-1])
    counts = np.bincount(codes, minlength=len(conts))
    expected = exact * len(codes)
    return float(((counts - expected) ** 2 / expected).sum())

  # chi-square, 63 degrees of freedom: 99.9% quantile is 103.4.
  assert chi2(sd.tokens) < 103.4
  assert chi2(own.tokens) > 500
  assert 0.2 < float(sd.acceptance_rate) < 0.95


def test_lossy_speculative_sampling_has_the_analytic_distribution():
  """Lossy SD (lenience eps = 0.5: accept a draft token x with min(1, p(x) / (eps q(x))), else draw from
  the residual norm(max(p - q, 0))): each drafted slot emits M(x) = q(x) a(x) + (1 - sum_y q(y) a(y)) r(x),
  and the bonus slot after gamma accepted drafts emits p. Over 3 tokens with gamma = 2 (enumerated on a
  4-token vocabulary) that is P = qa1 qa2 p3 + (M1 M2 - qa1 qa2) M3 (conditionals given the prefix); the
  empirical distribution of 6000 samples matches it (chi-square below its 99.9% quantile) and not the
  target's (the lossy output is measurably not the target's)."""
  vocab, n, num, eps = 4, 3, 6000, 0.5
  t = _model(6, vocab=vocab, std=0.6)
  d = _model(7, vocab=vocab, d=16, layers=1, heads=2, kv=1, std=0.6)
  cfg = SamplingConfig(max_new_tokens=n, eos_id=99)
  prompt = jnp.tile(jnp.array([[1, 3]]), (num, 1))
  plen = jnp.full((num,), 2)
  sd = jax.jit(lambda r: speculative_sample(t, d, prompt, plen, r, cfg, gamma=2, lenience=eps))(jax.random.key(13))
  conts = np.array(list(itertools.product(range(vocab), repeat=n)))
  seqs = jnp.asarray(np.concatenate([np.tile([[1, 3]], (len(conts), 1)), conts], 1))
  # Conditionals at the three generated positions, float64: [64 sequences, 3 positions, V].
  p = np.exp(np.asarray(process_logits(t(seqs).logits[:, 1:-1], cfg), np.float64))
  q = np.exp(np.asarray(process_logits(d(seqs).logits[:, 1:-1], cfg), np.float64))
  a = np.minimum(1.0, p / (eps * q))
  beta = np.sum(q * a, -1, keepdims=True)
  resid = np.maximum(p - q, 0.0)
  r = np.where(resid.sum(-1, keepdims=True) > 0, resid / np.maximum(resid.sum(-1, keepdims=True), 1e-300), p)
  mix = q * a + (1.0 - beta) * r
  at = lambda x, i: x[np.arange(len(conts)), i, conts[:, i]]
  qa = [at(q * a, i) for i in range(n)]
  m = [at(mix, i) for i in range(n)]
  analytic = qa[0] * qa[1] * at(p, 2) + (m[0] * m[1] - qa[0] * qa[1]) * m[2]
  target = at(p, 0) * at(p, 1) * at(p, 2)
  assert abs(analytic.sum() - 1) < 1e-6 and abs(target.sum() - 1) < 1e-6
  codes = np.asarray(sd.tokens[:, 2:2 + n]) @ (vocab ** np.arange(n)[::-1])
  counts = np.bincount(codes, minlength=len(conts))
  chi2 = lambda probs: float(((counts - probs * num) ** 2 / (probs * num)).sum())
  assert chi2(analytic) < 103.4          # 63 degrees of freedom, 99.9% quantile
  assert chi2(target) > 200


def test_lossy_lenience_accepts_more():
  t, d = _model(8), _model(9, d=16, layers=1, heads=2, kv=1)
  cfg = SamplingConfig(max_new_tokens=12, eos_id=99)
  prompt, plen = jnp.tile(PROMPT, (16, 1)), jnp.tile(PLEN, 16)
  rate = lambda eps: float(jax.jit(lambda r: speculative_sample(t, d, prompt, plen, r, cfg, gamma=3,
                                                               lenience=eps))(jax.random.key(0)).acceptance_rate)
  assert rate(0.3) > rate(1.0) + 0.05
  with pytest.raises(ValueError, match="lenience=0"):
    speculative_sample(t, d, prompt, plen, jax.random.key(0), cfg, gamma=3, lenience=0.0)


def test_acceptance_formulas_and_draft_prefix_estimate():
  from jaxopd.evaluation import acceptance_on_draft_prefixes, block_efficiency, speedup
  assert float(block_efficiency(0.0, 4)) == pytest.approx(1.0)
  assert float(block_efficiency(0.5, 3)) == pytest.approx((1 - 0.5 ** 4) / 0.5)
  assert float(block_efficiency(1.0, 3)) == pytest.approx(4.0)
  assert float(speedup(0.5, 3, 0.1)) == pytest.approx((1 - 0.5 ** 4) / 0.5 / 1.3)
  t, d = _model(3), _model(4, d=16, layers=1, heads=2, kv=1)
  cfg = SamplingConfig(max_new_tokens=12, eos_id=99)
  prompt, plen = jnp.tile(PROMPT, (64, 1)), jnp.tile(PLEN, 64)
  same = jax.jit(lambda r: acceptance_on_draft_prefixes(t, t, prompt, plen, r, cfg))(jax.random.key(0))
  assert float(same.sampling) == pytest.approx(1.0, abs=1e-5) and float(same.greedy) == 1.0
  est = jax.jit(lambda r: acceptance_on_draft_prefixes(t, d, prompt, plen, r, cfg))(jax.random.key(0))
  # The per-position expected acceptance agrees with the empirical SD rate (gamma=1: blocks are i.i.d. draws).
  sd = jax.jit(lambda r: speculative_sample(t, d, prompt, plen, r, cfg, gamma=1))(jax.random.key(5))
  assert float(sd.acceptance_rate) == pytest.approx(float(est.sampling), abs=0.05)


def test_diversity_and_kl_helpers():
  from jaxopd.evaluation import distinct_n, self_bleu, sequence_kl, token_entropy
  assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == 4 / 6
  assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 3 / 4
  assert self_bleu([[1, 2, 3, 4, 5]] * 3) == pytest.approx(1.0)
  assert self_bleu([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]) == 0.0
  logits = jnp.zeros((1, 3, 8))
  assert float(token_entropy(logits, jnp.ones((1, 3)))) == pytest.approx(np.log(8), rel=1e-6)
  lp, lr = jnp.array([[-1.0, -2.0, -3.0]]), jnp.array([[-1.5, -2.0, -1.0]])
  assert float(sequence_kl(lp, lr, jnp.array([[1.0, 1.0, 0.0]]))[0]) == pytest.approx(0.5)
