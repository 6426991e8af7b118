"""launch/sweep.py: the grid, the commands, and results gathered from real runs."""

import json
import os
import sys

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "launch"))
import sweep  # noqa: E402


def test_grid_and_commands():
  grid = sweep.parse_grid(["optim.lr=1e-3,3e-3", "model.n_layers=1"])
  todo = list(sweep.runs(grid, [0, 1]))
  assert len(todo) == 4
  cmd = sweep.command("experiments/sft.py:smoke", "/tmp/x", *todo[0], ["total_steps=3"])
  assert "--config.optim.lr=1e-3" in cmd and "--config.seed=0" in cmd and "--config.total_steps=3" in cmd
  assert cmd[cmd.index("--workdir") + 1] == "/tmp/x/lr=1e-3_n_layers=1_seed=0"


def test_sweep_runs_and_gathers_results(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  rc = sweep.main(["--config", "experiments/sft.py:smoke,sort", "--out", str(tmp_path), "--grid",
                   "optim.lr=1e-3,1e-2", "--set", "total_steps=6", "--set", "eval_every=3"])
  assert rc == 0
  res = [json.loads(l) for l in open(tmp_path / "results.jsonl")]
  assert [r["optim.lr"] for r in res] == ["1e-3", "1e-2"]
  assert all(r["exit"] == 0 and r["step"] == 6 and "loss" in r for r in res)
