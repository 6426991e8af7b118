"""Tests run on 8 simulated CPU devices (set before jax is imported)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


# The slowest tests (about 30-120 s each on 2 cores) run first, so that pytest-xdist's two workers
# do not end the session with one of them alone on a long test (longest-first scheduling).
SLOW_FIRST = ("test_distillspec.py::test_smoke_pipeline_and_report", "test_fdpg.py::test_fdpg_smoke_pipeline",
              "test_sparsepo.py::test_sparsepo_smoke_pipeline", "test_multihost.py", "test_resume.py",
              "test_real_models.py", "test_tdpo_pipeline.py", "test_sweep.py", "test_faults.py",
              "test_distillspec.py::test_on_policy")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    ids = [i for i, name in enumerate(SLOW_FIRST) if name in item.nodeid]
    return ids[0] if ids else len(SLOW_FIRST)
  items.sort(key=rank)   # stable: the order within each group is kept
