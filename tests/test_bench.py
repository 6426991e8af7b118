"""Every benchmark script runs (in its tiny mode, ``JAXOPD_BENCH=tiny``: tiny shapes, one timed
step, the peer included) and ends with one JSON object holding its figures."""

import glob
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO
from jaxopd.models import gguf

SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "bench", "*.py")) if not p.endswith("common.py"))
# The figure each script exists for (a key of its last line).
KEYS = {"aligndistil_step.py": "aligndistil_off_ms", "grpo_step.py": "ratio_vs_trl", "lora_step.py": "trained_bytes_ratio",
        "packing.py": "speedup", "preference_step.py": "dpo_ratio_vs_trl", "prefix_share.py": "peers_dpo_speedup",
        "real_model.py": "grpo", "sampling.py": "ratio_vs_hf_generate", "sparsepo_step.py": "mapo_step_ms",
        "train_step.py": "fraction_of_peak"}


def test_every_script_is_listed():
  assert SCRIPTS == sorted(KEYS)


@pytest.mark.pipeline
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_runs(script, tmp_path):
  if script == "real_model.py":      # the real model's tokenizer on a tiny random model
    try:
      gguf.smollm2()
    except gguf.MissingError as e:
      pytest.skip(f"no real model: {e}")
  env = {**os.environ, "JAXOPD_BENCH": "tiny", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  r = subprocess.run([sys.executable, os.path.join(REPO, "bench", script)], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert KEYS[script] in out, sorted(out)
