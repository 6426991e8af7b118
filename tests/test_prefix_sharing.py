"""Shared-prefix pair rows ``[prompt | chosen | rejected]``: the layout, the model's branch
mask (each response sees what it sees in its own row), and DPO/TDPO/REDI losses and gradients
equal to the row-per-response layout on padded pairs of unequal lengths. Grouped rows
``[prompt | response 1 | ... | response G]`` of sampled responses (GRPO's ``share_prompt``): the
layout and the response terms equal to a row per sample, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_models
from jaxopd.data.pipeline import share_prompt
from jaxopd.methods import redi, tdpo
from jaxopd.models import ModelConfig, Transformer, heads
from jaxopd.sampling import SamplingConfig, sample

CFG = ModelConfig(family="llama", vocab_size=19, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32,
                  init_std=0.2)


def _record(prompt, responses, t):
  tokens = np.zeros((len(responses), t), np.int32)
  mask = np.zeros((len(responses), t), np.int32)
  for j, r in enumerate(responses):
    tokens[j, :len(prompt)] = prompt
    tokens[j, len(prompt):len(prompt) + len(r)] = r
    mask[j, len(prompt):len(prompt) + len(r)] = 1
  return {"tokens": tokens, "loss_mask": mask}


def test_layout_of_a_shared_row():
  recs = [_record([5, 6, 7], [[8, 9], [10, 11, 12]], 8), _record([], [[3, 4], [5]], 8)]
  (rows,), st = share_prompt([recs], pad_id=0, multiple=4)
  # [5, 6 | 7, 8, 9 | 7, 10, 11, 12] is 9 tokens: rows of 12; a row per response would hold 5 + 6 + 2 + 1
  assert st == {"pairs": 2, "row_len": 12, "tokens": 9 + 3, "unshared_tokens": 14}
  r = rows[0]
  assert r["tokens"].shape == (12,) and not r["tokens"][9:].any() and not r["loss_mask"][9:].any()
  np.testing.assert_array_equal(r["tokens"][:9], [5, 6, 7, 8, 9, 7, 10, 11, 12])
  np.testing.assert_array_equal(r["positions"][:9], [0, 1, 2, 3, 4, 2, 3, 4, 5])
  np.testing.assert_array_equal(r["branch_ids"][:9], [0, 0, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(r["loss_mask"][:9], [0, 0, 0, 1, 1, 0, 1, 1, 1])
  r = rows[1]   # no prompt: the responses one after another
  np.testing.assert_array_equal(r["tokens"][:3], [3, 4, 5])
  np.testing.assert_array_equal(r["positions"][:3], [0, 1, 0])
  np.testing.assert_array_equal(r["branch_ids"][:3], [1, 1, 2])
  np.testing.assert_array_equal(r["loss_mask"][:3], [1, 1, 1])
  assert not r["loss_mask"][3:].any() and not r["branch_ids"][3:].any()


def test_row_length_is_the_longest_row_of_every_split_rounded_up():
  a = [_record([1, 2], [[3], [4]], 6)]                 # 1 + 2 + 2 = 5 tokens
  b = [_record([1, 2, 3, 4], [[5, 6], [7]], 8)]        # 3 + 3 + 2 = 8 tokens
  (ra, rb), st = share_prompt([a, b], multiple=16)
  assert st["row_len"] == 16 and ra[0]["tokens"].shape == rb[0]["tokens"].shape == (16,)
  (ra, rb), st = share_prompt([a, b], multiple=1)
  assert st["row_len"] == 8


def test_records_whose_sides_differ_in_prompt_are_refused():
  r = _record([1, 2], [[3], [4]], 6)
  r["tokens"][1, 0] = 9
  with pytest.raises(ValueError, match="record 0: response 1 follows another prompt"):
    share_prompt([[r]])


def _pairs(b=5, t=14, seed=0, vocab=CFG.vocab_size, no_prompt_row=True):
  """Padded pairs of unequal prompt and response lengths (one without a prompt)."""
  rng = np.random.default_rng(seed)
  recs = []
  for i in range(b):
    p = 0 if (no_prompt_row and i == 1) else int(rng.integers(1, 6))
    prompt = rng.integers(1, vocab, p).tolist()
    resp = [rng.integers(1, vocab, int(rng.integers(2, t - p + 1))).tolist() for _ in range(2)]
    recs.append(_record(prompt, resp, t))
  return recs


def _batches(recs):
  unshared = {k: jnp.asarray(np.stack([r[k] for r in recs])) for k in ("tokens", "loss_mask")}
  (rows,), _ = share_prompt([recs], multiple=8)
  shared = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  return unshared, shared


@pytest.mark.parametrize("kw", [dict(), dict(attention="dot_product"), dict(attention="chunked", attention_chunk=4),
                                dict(scan_layers=True, remat="full"), dict(family="gpt2", n_kv_heads=0)])
def test_each_branch_sees_what_its_own_row_sees(kw):
  """Hidden states of the prefix and of each branch (the prompt's last-token copy and the
  response) equal those of the response's own row (float32, 1e-5)."""
  cfg = ModelConfig(**{**CFG.__dict__, **kw})
  model = Transformer(cfg, nnx.Rngs(params=3))
  recs = _pairs(seed=1)
  unshared, shared = _batches(recs)
  hidden = nnx.jit(lambda m, *a, **k: m.final_hidden(*a, **k))
  h_rows = hidden(model, unshared["tokens"].reshape(-1, unshared["tokens"].shape[-1]))
  h_shared = hidden(model, shared["tokens"], shared["positions"], branch_ids=shared["branch_ids"])
  for i, r in enumerate(recs):
    m = r["loss_mask"]
    p = int(np.argmax(m[0]))                       # prompt length (both sides)
    head, at = max(p - 1, 0), max(p - 1, 0)
    np.testing.assert_allclose(h_shared[i, :head], h_rows[2 * i, :head], atol=1e-5)
    for j in range(2):
      n = int(m[j].sum()) + (p > 0)                # the copy of the prompt's last token, then the response
      np.testing.assert_allclose(h_shared[i, at:at + n], h_rows[2 * i + j, head:head + n], atol=1e-5,
                                 err_msg=f"pair {i} response {j}")
      at += n


def test_layout_of_grouped_rows():
  """Sampled rows (prompt, response, padding) -> ``[prompt right-padded to P | each response's N
  slots]`` per group, the prompt's padding masked, each response's positions continuing its prompt."""
  tokens = jnp.asarray([[5, 6, 7, 8, 1, 0, 0], [5, 6, 9, 1, 0, 0, 0], [4, 3, 3, 1, 0, 0, 0], [4, 2, 1, 0, 0, 0, 0]])
  plen = jnp.asarray([2, 2, 1, 1])
  rows = heads.grouped_rows(tokens, plen, prompt_width=3, group=2)   # P 3, N 4
  np.testing.assert_array_equal(rows["tokens"], [[5, 6, 7, 7, 8, 1, 0, 9, 1, 0, 0],
                                                 [4, 3, 3, 3, 3, 1, 0, 2, 1, 0, 0]])
  np.testing.assert_array_equal(rows["attention_mask"][:, :3], [[1, 1, 0], [1, 0, 0]])
  assert rows["attention_mask"][:, 3:].all()
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 2, 3, 4, 5, 2, 3, 4, 5],
                                                    [0, 1, 2, 1, 2, 3, 4, 1, 2, 3, 4]])
  np.testing.assert_array_equal(heads.response_slots(tokens, plen, 4), [[7, 8, 1, 0], [9, 1, 0, 0], [3, 3, 1, 0],
                                                                        [2, 1, 0, 0]])


def _sampled(model, group, n=6):
  prompt = jnp.asarray([[3, 4, 5, 0, 0], [6, 0, 0, 0, 0], [7, 8, 9, 10, 11]], jnp.int32)
  plen = jnp.asarray([3, 1, 5], jnp.int32)
  out = sample(model, prompt, plen, jax.random.PRNGKey(0), SamplingConfig(n, 1, 0), repeats=group)
  return out, jnp.repeat(plen, group)


@pytest.mark.parametrize("kw", [dict(), dict(attention="chunked", attention_chunk=4),
                                dict(family="gpt2", n_kv_heads=0, attention="dot_product", scan_layers=True,
                                     remat="full")])
def test_grouped_rows_give_each_sample_what_its_own_row_gives(kw):
  """``response_terms`` with the prompt encoded once per group of 4 (and per 2: a group split over
  two loss calls, as GRPO's minibatches split it) equals a row per sample: the label log-probs of
  every response token (1e-5) and their gradient (1e-5 of its scale); both equal the full forward's
  ``token_logprobs`` at the response positions."""
  cfg = ModelConfig(**{**CFG.__dict__, **kw})
  model = Transformer(cfg, nnx.Rngs(params=3))
  out, plen = _sampled(model, 4)
  mask = heads.response_slots(out.loss_mask, plen, 6)
  assert float(mask.sum()) > 12

  gd, params = nnx.split(model)

  def lp(p, group):
    return heads.response_terms({"m": nnx.merge(gd, p)}, out.tokens, plen, 5,
                                lambda z, t: {"lp": heads.label_logprob(z["m"], t)}, 4, group)["lp"]
  full = heads.response_slots(jnp.pad(heads.token_logprobs(model, out.tokens, 8), ((0, 0), (1, 0))), plen, 6)
  for group in (1, 2, 4):
    np.testing.assert_allclose(np.asarray(jax.jit(lp, static_argnums=1)(params, group) * mask),
                               np.asarray(full * mask), atol=1e-5, err_msg=f"group {group}")
  grad = jax.jit(jax.grad(lambda p, group: jnp.sum(lp(p, group) * mask)), static_argnums=1)
  ga, gb = grad(params, 1), grad(params, 4)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ga))
  assert scale > 0
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5 * scale)


def test_grouped_rows_are_refused_with_a_cache_and_splash_names_share_prompt():
  from jaxopd.errors import ConfigError
  from jaxopd.models import KVCache
  model = Transformer(CFG, nnx.Rngs(params=0))
  toks = jnp.ones((1, 7), jnp.int32)
  with pytest.raises(ValueError, match="groups"):
    model(toks, groups=(3, 2), cache=KVCache.zeros(CFG, 1, 8))
  splash = Transformer(ModelConfig(**{**CFG.__dict__, "attention": "splash"}), nnx.Rngs(params=0))
  with pytest.raises(ConfigError, match="share_prompt"):
    splash.final_hidden(toks, groups=(3, 2))


def _loss_and_grads(loss_fn, models, batch):
  gd, params = nnx.split(models["policy"])

  def f(p):
    out = loss_fn({**models, "policy": nnx.merge(gd, p)}, batch, None)
    return out.loss, out
  (_, out), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return out, g


def _assert_equal_outputs(a, b, ga, gb):
  np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-5)
  assert float(a.count) == float(b.count)
  assert a.metrics.keys() == b.metrics.keys()
  for k in a.metrics:
    np.testing.assert_allclose(np.asarray(a.metrics[k]), np.asarray(b.metrics[k]), rtol=1e-4, atol=1e-5, err_msg=k)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ga))
  assert scale > 0
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("loss", ["dpo", "tdpo1", "tdpo2"])
def test_preference_losses_and_gradients_equal_in_both_layouts(loss):
  unshared, shared = _batches(_pairs(seed=2))
  fn = tdpo.make_loss_fn(loss, beta=0.5, chunk=4)
  a, ga = _loss_and_grads(fn, tiny_models(CFG, ("policy", "reference")), unshared)
  b, gb = _loss_and_grads(fn, tiny_models(CFG, ("policy", "reference")), shared)
  assert float(a.loss) != pytest.approx(5 * np.log(2), rel=1e-3)   # policy != reference: a real comparison
  _assert_equal_outputs(a, b, ga, gb)


@pytest.mark.parametrize("loss", ["redi", "simpo", "dpo"])
def test_redi_losses_and_gradients_equal_in_both_layouts(loss):
  unshared, shared = _batches(_pairs(seed=3))
  fn = redi.make_loss_fn(0.8, True, loss, beta=2.0 if loss != "dpo" else 0.1, chunk=4)
  a, ga = _loss_and_grads(fn, tiny_models(CFG, ("policy", "reference")), unshared)
  b, gb = _loss_and_grads(fn, tiny_models(CFG, ("policy", "reference")), shared)
  _assert_equal_outputs(a, b, ga, gb)


@pytest.mark.pipeline
def test_tdpo_run_with_shared_prompts_equals_the_row_per_response_run(tmp_path, capsys):
  """The smoke pipeline on 8 simulated devices, both layouts: equal losses at every step
  (log 2 at the start, then lower by gradient), so equal updates."""
  from helpers import shared_smoke_stages
  from jaxopd import logs, train
  from jaxopd.experiment import load_config
  losses = {}
  for share in (False, True):
    c = load_config("tdpo.py:smoke")
    c.data.data_dir, c.sft.workdir = str(tmp_path / "data"), str(tmp_path / "sft_base")
    c.progress, c.total_steps, c.log_every, c.eval_every = False, 4, 1, 0
    c.method.share_prompt = share
    with shared_smoke_stages(c):
      c = tdpo.prepare(c, str(tmp_path / f"run{share}"))
    train.run(c, str(tmp_path / f"run{share}"), tdpo.build(c))
    losses[share] = [r["loss"] for r in logs.read_metrics(str(tmp_path / f"run{share}"), "train")]
  out = capsys.readouterr().out
  assert "shared-prompt rows:" in out
  assert len(losses[True]) == 4 and losses[True][0] == pytest.approx(np.log(2), rel=1e-5)
  assert losses[True][-1] < np.log(2) - 1e-3
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
