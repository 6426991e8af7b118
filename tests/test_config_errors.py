"""Bad configs stop before any compile, with one line naming the field."""

import os
import subprocess
import sys

import pytest

from helpers import REPO, SFT, tiny_config
from jaxopd import config as config_lib
from jaxopd import train
from jaxopd.experiment import load_config
from jaxopd.errors import ConfigError

BAD = [
    ({"mesh.shape": (3, 1, 1)}, r"config.mesh.shape=\(3, 1, 1\): product 3 does not match the 8 devices"),
    ({"mesh.shape": (2, 2)}, r"config.mesh.shape=\(2, 2\): needs 3 entries"),
    ({"mesh.num_devices": 16}, r"config.mesh.num_devices=16"),
    ({"batch_size": 6}, r"config.batch_size=6: the microbatch .* not divisible by the data-parallel size 8"),
    ({"batch_size": 16, "grad_accum": 4}, r"config.batch_size=16: the microbatch batch_size/grad_accum=4"),
    ({"grad_accum": 3}, r"config.grad_accum=3: must divide batch_size=8"),
    ({"optim.lr": -1.0}, r"config.optim.lr=-1.0: must be positive"),
    ({"optim.name": "sgd"}, r"config.optim.name='sgd'"),
    ({"optim.schedule": "linear"}, r"config.optim.schedule='linear'"),
    ({"optim.warmup_steps": 10}, r"config.optim.warmup_steps=10: must be in \[0, total_steps=4\]"),
    ({"optim.b2": 1.0}, r"config.optim.b2=1.0"),
    ({"optim.mu_dtype": "float16"}, r"config.optim.mu_dtype='float16': must be one of \('float32', 'bfloat16'\)"),
    ({"optim.clip_norm": -0.5}, r"config.optim.clip_norm=-0.5"),
    ({"optim.weight_decay": -0.1}, r"config.optim.weight_decay=-0.1"),
    ({"total_steps": 0}, r"config.total_steps=0"),
    ({"seq_len": 64}, r"config.seq_len=64: exceeds the max_len=16 of config.models.policy \(random\)"),
    ({"models.policy.init": "hf:/nonexistent"}, r"config.models.policy.init='hf:/nonexistent': /nonexistent: no such "
                                                 r"directory"),
    ({"models.policy.init": "checkpoint.pt"}, r"config.models.policy.init='checkpoint.pt': must be random, hf:DIR"),
    ({"models.policy.trainable": False}, r"config.models.policy.trainable=False: this experiment's policy is trained"),
    ({"model.dtype": "bfloat16"}, r"config.model.dtype='bfloat16': per role: config.models.<role>.dtype"),
    ({"models.policy.attention": "flash"}, r"config.models.policy.attention='flash': must be one of "
                                           r"\('einsum', 'dot_product', 'chunked', 'splash'\)"),
    ({"models.policy.remat": "some"}, r"config.models.policy.remat='some': must be one of "
                                      r"\('none', 'full', 'dots'\)"),
    ({"model.n_heads": 5}, r"config.model.n_heads=5: must divide d_model=32"),
    ({"model.family": "t5"}, r"config.model.family='t5'"),
    ({"mesh.rules": [["batch", "pipeline"]]}, r"config.mesh.rules\[0\]: unknown mesh axis 'pipeline'"),
    ({"checkpoint.every": -1}, r"config.checkpoint.every=-1"),
    ({"log_every": 0}, r"config.log_every=0"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD)])
def test_bad_config_names_the_field(overrides, message, tmp_path):
  cfg = tiny_config()
  with cfg.unlocked():
    for k, v in overrides.items():
      node = cfg
      *parents, leaf = k.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = v
  with pytest.raises(ConfigError, match=message):
    train.run(cfg, str(tmp_path / "w"), SFT.build(tiny_config()))
  assert not (tmp_path / "w").exists()      # stopped before building anything


def test_hf_directory_without_weights_names_what_is_missing(tmp_path):
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text("{}")
  cfg = tiny_config(**{"models.policy.init": f"hf:{d}"})
  with pytest.raises(ConfigError, match=rf"{d} is not a Hugging Face model directory: no \*.safetensors in it$"):
    train.run(cfg, str(tmp_path / "w"), SFT.build(tiny_config()))
  (d / "model.safetensors").write_bytes(b"")
  (d / "checkpoints").mkdir()
  with pytest.raises(ConfigError, match=rf"{d} is a jaxopd run \(it has checkpoints/\): use run:{d}$"):
    train.run(cfg, str(tmp_path / "w"), SFT.build(tiny_config()))


def test_valid_config_resolves_mesh_and_batch():
  facts = config_lib.validate(tiny_config(**{"mesh.shape": (2, -1, 2)}), 8)
  assert facts["mesh_shape"] == (2, 2, 2) and facts["dp"] == 4 and facts["local_batch"] == 8


def _cli(*args, workdir, config="experiments/sft.py:smoke,sort"):
  env = dict(os.environ)
  return subprocess.run([sys.executable, "-m", "jaxopd.main", "--config", config,
                         "--workdir", str(workdir), *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("arg,message", [
    ("--config.optim.lrr=1", 'unknown config field in --config.optim.lrr=1: lrr - did you mean "lr"'),
    ("--config.batch_size=abc", "--config.batch_size=abc: invalid literal for int()"),
    ("--config.mesh.shape=(3,1,1)", "config.mesh.shape=(3, 1, 1): product 3 does not match"),
    ("--config.model.n_kv_heads=3", "config.model.n_kv_heads=3: must divide n_heads=4"),
    ("--config.init_from.workdir=runs/x", "--config.init_from.workdir: config.init_from was replaced by the model "
                                          "table: start a role from a checkpoint with --config.models.<role>.init"),
    ("--config.models.policy.init=run:/nowhere", "config.models.policy.init='run:/nowhere': /nowhere has no "
                                                 "checkpoints/"),
    ("--config.method.name=ppo", "config.method.name='ppo': must be one of ('sft', 'tdpo', "),
    ("--config.data.task=reviews --config.data.over_length=trunc",
     "config.data.over_length='trunc': must be one of ('truncate', 'drop')"),
    ("--config.data.over_length=clip", "config.data.over_length='clip': must be one of ('truncate', 'drop')"),
    ("--config=experiments/spt.py", "--config: [Errno 2] No such file or directory: 'experiments/spt.py' (the "
                                    "config modules: aligndistil.py, "),
])
def test_cli_reports_one_line_and_exits_2(arg, message, tmp_path):
  config = arg.split("=", 1)[1] if arg.startswith("--config=") else "experiments/sft.py:smoke,sort"
  p = _cli(*([] if arg.startswith("--config=") else arg.split()), workdir=tmp_path / "w", config=config)
  assert p.returncode == 2, p.stderr[-2000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "w").exists()


def test_unknown_preset_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="config preset 'smok' is unknown - did you mean 'smoke'"):
    load_config("sft.py:smok")
  p = subprocess.run([sys.executable, "-m", "jaxopd.main", "--config", "experiments/sft.py:smok", "--workdir",
                      str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert p.stderr.strip().splitlines() == [   # the config module's error, not ml_collections' traceback of it
      "error: flag --config=experiments/sft.py:smok: config preset 'smok' is unknown - did you mean 'smoke'?; "
      "known presets: ['digits', 'smoke', 'sort']"]
  # key=value in the preset list is refused, not ignored (it once was: total_steps stayed 20).
  with pytest.raises(ValueError, match=r"config preset 'total_steps=3': presets are names only; set the field "
                                       r"with --config.total_steps=3"):
    load_config("sft.py:smoke,total_steps=3")


@pytest.mark.parametrize("spec", ["grpo.py", "fdpg.py:rlhf,fkl,conditional", "aligndistil.py"])
def test_prompt_files_refuse_another_prompt_length(spec):
  """Prompts for rollouts are encoded to ``config.rollout.prompt_len``: a different
  ``data.files.max_prompt_len`` is refused, not silently replaced (the files task's prompts)."""
  from jaxopd import tasks
  c = load_config(spec)
  c.data.task, c.data.files.max_prompt_len = "files", c.rollout.prompt_len + 1
  with pytest.raises(ConfigError, match=rf"^config\.data\.files\.max_prompt_len={c.rollout.prompt_len + 1}: prompts "
                                        rf"for rollouts are encoded to config\.rollout\.prompt_len="):
    tasks.get(c, "prompts")(c)
