"""The TPU compile-and-fit report on a CPU machine: libtpu's abstract devices of a topology, the
real train step compiled by the TPU compiler (launch/aot_memory.py, launch/fit_table.py), and the
model presets' shapes."""

import json
import os
import sys

import jax
import pytest
from flax import nnx

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "launch"))
import aot_memory  # noqa: E402
import fit_table  # noqa: E402

from jaxopd.models import Transformer, presets, table  # noqa: E402



def _needs_libtpu():
  pytest.importorskip("libtpu", reason="the TPU compiler: pip install -e '.[aot]' (the test extra has it)")


def test_presets_have_the_published_parameter_counts():
  """Counts of the Hugging Face models (GPT-2 124,439,808; Qwen2-0.5B 494,032,768; Qwen2-1.5B
  1,543,714,304; Llama-3(.1)-8B 8,030,261,248; SmolLM2-135M 134,515,008; Qwen3-8B 8,190,735,360;
  Gemma-3-4B's text model 3,880,263,168), from the Transformer's own parameters (eval_shape)
  and from num_params."""
  published = {"gpt2-124m": 124_439_808, "qwen2-0.5b": 494_032_768, "qwen2-1.5b": 1_543_714_304,
               "llama3-8b": 8_030_261_248, "llama3.1-8b": 8_030_261_248, "smollm2-135m": 134_515_008,
               "qwen3-8b": 8_190_735_360, "gemma3-4b": 3_880_263_168}
  for name, n in published.items():
    cfg = presets.get(name)
    m = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))) == n, name
    assert presets.num_params(cfg) == n, name


def _tiny_cell(tmp_path, method, spec, chunk=64, remat="none", share=False, seq=64, **model):
  """The fit table's settings for ``method`` on a small model, unrolled, no remat, one position
  chunk: a step without loops, so XLA's cost analysis counts all of it; prompts of 32 tokens."""
  data = fit_table.write_data(str(tmp_path), 32, seq - 32, n=16)
  arch = {**TINY, "method.chunk": chunk, **model}
  return fit_table.cell_config(method, data, seq, 8, arch, remat=remat, scan=False, share=share, prompt=32,
                               spec=spec)


TINY = {"model.d_model": 256, "model.n_layers": 2, "model.n_heads": 4, "model.vocab_size": 512}


@pytest.mark.parametrize("method,spec,remat,share", [("tdpo", "tdpo.py:smoke", "none", False),
                                                     ("sft", "sft.py:smoke", "none", False),
                                                     ("tdpo", "tdpo.py:smoke", "full", False),
                                                     ("tdpo", "tdpo.py:smoke", "none", True)])
def test_step_compiles_for_a_v5e_2x2_and_the_flop_count_matches_xla(tmp_path, method, spec, remat, share):
  """A small model's TDPO / SFT step (synthetic TRL-format data, 64 tokens per sequence) compiled
  for the 4 abstract chips of a v5e:2x2 with FSDP: per-chip parameter and optimizer bytes are a
  quarter of the model's float32 parameters (x1, and x2 for AdamW's two moments), the bf16 frozen
  reference a quarter of its bf16 bytes; with no loop in the step (unrolled, one chunk), fit_table's
  FLOP count is XLA's within 5%, with and without remat (measured: 0.97-1.04; XLA also counts the
  elementwise work; with scan_layers XLA counts the scanned blocks once: 0.57 here); the same with
  the prompt shared by each pair's two responses (rows of 112 tokens instead of 2 x 64)."""
  _needs_libtpu()
  from jaxopd import methods
  config = _tiny_cell(tmp_path, method, spec, remat=remat, share=share)
  r = aot_memory.report(config, methods.get(config.method.name).build(config), aot_memory.topology_devices("v5e:2x2"))
  assert r["devices"] == 4 and r["device_kind"] == "TPU v5 lite" and r["platform"] == "tpu"
  assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  cfg = table.arch(config, "policy")
  n = presets.num_params(cfg)
  assert r["params"] == pytest.approx(4 * n / 4, rel=0.02)
  assert r["opt_state"] == pytest.approx(2 * 4 * n / 4, rel=0.02)
  assert r["frozen"] == pytest.approx((2 * n / 4) if method == "tdpo" else 0, rel=0.02)
  counted = fit_table.step_flops(method, cfg, 8, 64, remat, 32, share)
  assert r["xla_flops"] * 4 == pytest.approx(counted, rel=0.05)
  text = aot_memory.format_report(r, 16 * 2**30)
  assert "TPU v5 lite" in text and "XLA cost analysis" in text and "fits in 16.0 GiB" in text
  json.dumps(r)                              # the --json line is one JSON object


def test_grpo_step_compiles_and_its_flop_count_matches_xla(tmp_path):
  """GRPO's step (8 prompts x 8 samples: sampling, the host reward, the loss on grouped rows)
  compiled for a v5e:2x2 with FSDP: with one new token the sampler's loop runs once, which is
  what XLA's cost analysis counts, so fit_table's FLOP count (each prompt prefilled once, the
  grouped rows' attention split, the head at the response slots) is XLA's within 5% (measured
  1.02, and 1.02 for a row per sample, not compiled here to spare the suite)."""
  _needs_libtpu()
  from jaxopd import methods
  config = _tiny_cell(tmp_path, "grpo", "grpo.py:smoke", share=True, seq=33)
  assert config.method.share_prompt and config.rollout.max_new_tokens == 1
  r = aot_memory.report(config, methods.get("grpo").build(config), aot_memory.topology_devices("v5e:2x2"))
  counted = fit_table.step_flops("grpo", table.arch(config, "policy"), 8, 33, "none", 32, True)
  assert r["xla_flops"] * 4 == pytest.approx(counted, rel=0.05)
  assert counted < fit_table.step_flops("grpo", table.arch(config, "policy"), 8, 33, "none", 32, False)


def test_splash_attention_step_compiles_for_a_v5e_2x2_with_the_real_kernel(tmp_path):
  """model.attention=splash in the TDPO step for 4 abstract v5e chips under FSDP: the TPU compiler
  gets the Pallas kernel itself (not interpret mode: the target is read from the mesh's devices),
  one Mosaic call per layer in the policy's forward, two in its backward (dq, dkv) and one in the
  frozen reference's forward: 4 x 2 layers = 8; the einsum step has none."""
  _needs_libtpu()
  from jaxopd import methods
  counts = {}
  for att in ("einsum", "splash"):
    config = _tiny_cell(tmp_path, "tdpo", "tdpo.py:smoke",
                        **{"models.policy.attention": att, "models.reference.attention": att})
    r = aot_memory.report(config, methods.get("tdpo").build(config), aot_memory.topology_devices("v5e:2x2"))
    counts[att] = r["pallas_kernels"]
  assert counts == {"einsum": 0, "splash": 8}
  assert "Pallas kernels      8 custom calls" in aot_memory.format_report(r)


def test_unknown_topology_and_preset_are_one_line_errors(capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  assert aot_memory.main(["--config", "experiments/sft.py:smoke,sort", "--preset", "gpt5"]) == 2
  assert "error: model preset 'gpt5'" in capsys.readouterr().err
  _needs_libtpu()
  assert aot_memory.main(["--config", "experiments/sft.py:smoke,sort", "--topology", "v9x:1x1"]) == 2
  assert "error: --topology v9x:1x1" in capsys.readouterr().err


def test_lora_step_compiles_for_a_v5e_2x2_with_one_base_copy(tmp_path):
  """TDPO with a rank-16 LoRA policy and the reference declared base:policy (launch/fit_table.py
  --lora), compiled for a v5e:2x2 under FSDP: the trained parameters are the adapters alone (their
  float32 bytes over the 4 chips, the AdamW moments twice that) and the frozen bytes are one bf16
  copy of the base (the reference holds none of its own)."""
  _needs_libtpu()
  from jaxopd import methods
  from jaxopd.models import lora
  data = fit_table.write_data(str(tmp_path), 32, 32, n=16)
  config = fit_table.cell_config("tdpo", data, 64, 8, TINY, remat="none", scan=False, prompt=32, lora=16,
                                 spec="tdpo.py:smoke")
  assert config.models.reference.init == "base:policy"
  r = aot_memory.report(config, methods.get("tdpo").build(config), aot_memory.topology_devices("v5e:2x2"))
  cfg = table.arch(config, "policy")
  m = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))
  variables = jax.tree.leaves(nnx.state(m, lora.LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable))
  adapters = sum(v.size for v in variables)
  # Under FSDP only the embed axis is split: A of q/k/v/gate/up and B of o/down; the others are replicated.
  per_chip = sum(v.size / (4 if "embed" in v.get_metadata()["logical_axes"] else 1) for v in variables)
  base = presets.num_params(cfg.without_lora())
  print(f"adapters {adapters} ({adapters / base:.1%} of the base's {base}), {per_chip:.0f} per chip; per chip: "
        f"params {r['params']} B, opt {r['opt_state']} B, frozen {r['frozen']} B")
  assert r["params"] == pytest.approx(4 * per_chip, rel=0.02)
  assert r["opt_state"] == pytest.approx(2 * 4 * per_chip, rel=0.02)
  assert r["frozen"] == pytest.approx(2 * base / 4, rel=0.02)
