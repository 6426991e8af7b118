"""Benchmark: the AlignDistil train step (a trained policy and three frozen models: the SFT
reference, the DPO and the reverse-DPO model) against the TDPO2 step, on the peers' workload,
in one command.

  python bench/aligndistil_step.py   (about 2 minutes on 2 idle CPU cores; --warmup / --repeats / --rounds)

Model (every role, float32): bench/preference_step.py's Llama-style model -- vocab 1024,
d_model 256, 4 layers, 4 heads, SwiGLU d_ff 1024, untied embeddings, einsum attention; AdamW lr
3e-4; random weights (the roles differ); one synthetic batch reused every step. Workload: 8
prompts of 32 tokens, responses of 96 (sequences of 128):

* ``tdpo2``: 8 preference pairs (16 sequences) through the policy (forward + backward) and the
  reference (forward); the sequential KL over the vocabulary
  (:func:`jaxopd.methods.tdpo.make_loss_fn`).
* ``aligndistil_off``: the adaptive teacher, off-policy on the 8 chosen responses (8 sequences)
  through the policy and the three frozen models; the reverse KL to the teacher over the
  vocabulary (:func:`jaxopd.methods.aligndistil.make_loss_fn`, beta0 0.1, beta2 10, chunk 32).
* ``aligndistil_off16``: the same on 16 sequences: the TDPO step's tokens.
* ``aligndistil_on``: the paper's setting, on-policy: 96 new tokens sampled from the policy for
  each of the 8 prompts inside the step (:func:`jaxopd.methods.aligndistil.make_rollout`), then
  the loss on them (beta2 15).

Expected from the matmul FLOPs alone (a forward F per sequence, a backward 2F, the LM heads'
chunks recomputed): TDPO2 costs 16 x (3F + F) = 64F, AlignDistil off-policy 8 x (3F + 3F) = 48F
(0.75x TDPO2), on 16 sequences 96F (1.5x). The printed ratios against these say what bounds the
step: above them, the vocabulary-wide work (four softmaxes over 1024 entries per token, against
two for TDPO) and the elementwise work; the on-policy step adds the sampler (96 sequential decode
steps of the policy). Timed (:func:`common.time_interleaved`): ``warmup``
untimed calls of each, then ``rounds`` rounds, each timing every step for ``repeats`` calls; the
median over all timed calls.

Measured (2-core VM, idle: other load 0.03; 2 rounds x 5 steps): TDPO2 755 ms; AlignDistil
off-policy 549 ms (0.73x, FLOP-expected 0.75x), on TDPO's 16 sequences 1041 ms (1.38x, expected
1.5x: +38% over TDPO on equal tokens), on-policy 768 ms (1.02x: the off-policy step plus ~220 ms
of sampling). So the three frozen models cost what their forwards' matmuls predict and no more:
the step is bound by the models' matmuls (each frozen model's vocabulary terms run inside the same
chunk loop as the policy's, and the four softmaxes per token are not what bounds it); per prompt
(AlignDistil trains on one response, TDPO on two) AlignDistil's step is the cheaper.

The last line printed is one JSON object: each step's median ms, its ratio to TDPO2, the
FLOP-expected ratio, ``aligndistil_overhead_vs_tdpo`` (off-policy on TDPO's tokens: time ratio
- 1) and ``other_cpu_load`` (CPUs used by other processes meanwhile; above 0.25 the figures are
not to be trusted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jaxopd.experiment import Experiment  # noqa: E402
from jaxopd.methods import aligndistil, tdpo  # noqa: E402
from jaxopd.models import ModelConfig  # noqa: E402
from jaxopd.sampling import SamplingConfig  # noqa: E402

from common import compile_train_step, cpu_snapshot, other_load, single_device_config  # noqa: E402
from common import time_interleaved  # noqa: E402

from common import pick  # noqa: E402

PROMPTS, PROMPT, RESPONSE = pick((8, 32, 96), (2, 4, 4))
SEQ = PROMPT + RESPONSE
VOCAB, D, LAYERS, HEADS, FF, LR = pick((1024, 256, 4, 4, 1024, 3e-4), (1024, 32, 1, 2, 64, 3e-4))
EXPECTED = {"tdpo2": 1.0, "aligndistil_off": 0.75, "aligndistil_off16": 1.5, "aligndistil_on": None}


def pairs(n: int, seed: int = 0) -> dict:
  rs = np.random.RandomState(seed)
  tokens = rs.randint(3, VOCAB, size=(n, 2, SEQ)).astype(np.int32)
  tokens[:, 1, :PROMPT] = tokens[:, 0, :PROMPT]
  mask = np.zeros((n, 2, SEQ), np.int32)
  mask[:, :, PROMPT:] = 1
  return {"tokens": tokens, "loss_mask": mask}


def steps():
  """name -> (roles, loss_fn, rollout or None, local batch)."""
  ad_roles = aligndistil.roles("adaptive")
  prompts = {"prompt": pairs(PROMPTS)["tokens"][:, 0, :PROMPT], "prompt_len": np.full(PROMPTS, PROMPT, np.int32)}
  scfg = SamplingConfig(max_new_tokens=RESPONSE, eos_id=VOCAB + 1, pad_id=0)   # no EOS: every response 96 tokens
  return {
      "tdpo2": ({"policy": True, "reference": False}, tdpo.make_loss_fn("tdpo2", 0.1, 0.5), None, pairs(PROMPTS)),
      "aligndistil_off": (ad_roles, aligndistil.make_loss_fn("adaptive", 0.1, 10.0, chunk=32), None,
                          pairs(PROMPTS)),
      "aligndistil_off16": (ad_roles, aligndistil.make_loss_fn("adaptive", 0.1, 10.0, chunk=32), None,
                            pairs(2 * PROMPTS)),
      "aligndistil_on": (ad_roles, aligndistil.make_loss_fn("adaptive", 0.1, 15.0, chunk=32),
                         aligndistil.make_rollout(scfg), prompts),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--warmup", type=int, default=pick(2, 0))
  ap.add_argument("--repeats", type=int, default=pick(5, 1))
  ap.add_argument("--rounds", type=int, default=pick(2, 1))
  a = ap.parse_args(argv)
  t_start = time.perf_counter()
  snap = cpu_snapshot()
  cfg = ModelConfig(family="llama", vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, d_ff=FF,
                    max_len=SEQ, tie_embeddings=False)
  compiled = {}
  for name, (roles, loss_fn, rollout, local) in steps().items():
    rows = local["tokens"].shape[0] if "tokens" in local else local["prompt"].shape[0]
    c = single_device_config(cfg, rows, SEQ, LR, roles)
    exp = Experiment(roles=roles, loss_fn=loss_fn, rollout=rollout, train_data=lambda shard, b=local: iter([b]))
    fn, state, frozen, batch, compile_s, _ = compile_train_step(c, exp, local)
    compiled[name] = dict(fn=fn, state=state, frozen=frozen, batch=batch)
    print(f"compiled {name}: {compile_s:.1f} s", flush=True)
  timed = time_interleaved(compiled, a.rounds, a.warmup, a.repeats)
  med = {n: t["median"] for n, t in timed.items()}
  out = {}
  for n, t in med.items():
    ratio = t / med["tdpo2"]
    exp_r = EXPECTED[n]
    print(f"{n:18s}: {t * 1e3:8.1f} ms ({ratio:.2f}x TDPO2" + (f"; FLOP-expected {exp_r:.2f}x" if exp_r else "")
          + f"); first and last loss of the first round {timed[n]['losses'][0]:.4f}, {timed[n]['losses'][-1]:.4f}",
          flush=True)
    out[f"{n}_ms"] = round(t * 1e3, 1)
    out[f"{n}_vs_tdpo2"] = round(ratio, 3)
    if exp_r:
      out[f"{n}_expected_vs_tdpo2"] = exp_r
  out["aligndistil_overhead_vs_tdpo"] = round(med["aligndistil_off16"] / med["tdpo2"] - 1, 3)
  other = other_load(snap)
  print(f"total wall {time.perf_counter() - t_start:.1f} s; {a.rounds} rounds x {a.repeats} timed steps each"
        + ("" if other is None else f"; other processes used {other:.2f} of {os.cpu_count()} CPUs"
           + (" -- CONTENDED, numbers are not trustworthy" if other > 0.25 else "")))
  out["other_cpu_load"] = None if other is None else round(other, 2)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
