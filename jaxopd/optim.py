"""optax optimizer from config: AdamW or RMSprop, warm-up + constant/cosine,
global-norm clipping, and one parameter group per trainable model.

Parameters are a dict ``{model_name: state}``; each model is a group that can
override ``lr`` and ``weight_decay`` via ``config.optim.groups.<name>``.
Weight decay applies to matrices only (ndim >= 2), not to biases and norm scales.
``config.optim.mu_dtype`` stores the first moment (AdamW's ``mu``, RMSprop's momentum) in
bfloat16 to save a quarter of AdamW's state; the second moment stays float32 (its
updates are squares of small gradients, which bf16's 8-bit mantissa rounds away).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

MU_DTYPES = ("float32", "bfloat16")


def make_schedule(o: Any, lr: float, total_steps: int) -> Callable:
  warm = int(o.warmup_steps)
  if o.schedule == "constant":
    after = optax.constant_schedule(lr)
  else:
    after = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1), alpha=o.min_lr_ratio)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def group_settings(o: Any, name: str) -> dict:
  g = o.groups.get(name, None) if hasattr(o.groups, "get") else None
  g = {} if g is None else dict(g)
  return dict(lr=g.get("lr", o.lr), weight_decay=g.get("weight_decay", o.weight_decay))


def make_optimizer(o: Any, total_steps: int, groups: Sequence[str]):
  """Returns ``(tx, schedules)``: the transformation and ``{group: step -> lr}``."""
  unknown = set(o.groups.keys()) - set(groups)
  if unknown:
    raise ValueError(f"config.optim.groups: {sorted(unknown)} are not trainable models "
                     f"(trainable: {sorted(groups)})")
  schedules, txs = {}, {}
  mu_dtype = jnp.dtype(o.get("mu_dtype", "float32"))
  for name in groups:
    s = group_settings(o, name)
    sched = make_schedule(o, s["lr"], total_steps)
    schedules[name] = sched
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    if o.name == "adamw":
      txs[name] = optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=mu_dtype,
                              weight_decay=s["weight_decay"], mask=decay_mask)
    else:
      # Decoupled decay, as in AdamW: added after preconditioning, scaled by lr.
      parts = [optax.scale_by_rms(decay=o.b2, eps=o.eps)]
      if o.b1:
        parts.append(optax.trace(decay=o.b1, accumulator_dtype=mu_dtype))
      if s["weight_decay"]:
        parts.append(optax.add_decayed_weights(s["weight_decay"], mask=decay_mask))
      parts.append(optax.scale_by_learning_rate(sched))
      txs[name] = optax.chain(*parts)
  # Labels: the top-level key of the params dict names the group.
  labels = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: path[0].key, params)
  tx = optax.multi_transform(txs, labels)
  if o.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  return tx, schedules
