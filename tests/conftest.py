"""Tests run on 8 simulated CPU devices (set before jax is imported).

One JAX persistent compilation cache serves the whole run (every xdist worker
and every CLI subprocess a test starts inherit its directory): the suite
compiles the same small programs many times over (a run and its resumed
copy, each smoke pipeline's stages), and the cache turns the repeats into
loads. It lives in a fresh temporary directory removed at the end, so each
run starts cold, as CI does; a JAX_COMPILATION_CACHE_DIR already set is used
as it is.
"""
import os
import shutil
import sys
import tempfile

# The suite compiles thousands of tiny programs (about 7,000; XLA's compiler took 590 of its 1,470
# worker-seconds) and runs each briefly: LLVM's expensive optimisation passes cost more compile time
# than they save at run time (measured: tests/test_grpo.py + test_sampling.py 401 -> 298 s,
# test_redi.py + test_preference_step.py 102 -> 83 s on 2 cores), and XLA:CPU's older elemental
# emitters compile in half the time of its fusion emitters (25 -> 12 ms an eager op, 0.65 -> 0.30 s a
# tiny model's jitted gradient; the whole suite 16:20 -> 12:17 on 2 cores, every test passing).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

_OWN_CACHE = None


def pytest_configure(config):
  # Runs in the xdist controller before it starts the workers (they inherit the
  # environment), and before any test module imports jax.
  global _OWN_CACHE
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="jaxopd-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # No size limit: with one, every write rescans the whole directory (thousands of entries).
    # Without its file lock, a process may read an entry another is still writing; jax then
    # fails to decompress it, warns and compiles instead. The warning is silenced (in the
    # CLI subprocesses too) so that such a race leaves no line in a test's stderr.
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (os.environ.get("PYTHONWARNINGS"), "ignore::UserWarning:jax._src.compiler") if w)


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_addoption(parser):
  parser.addoption("--order", default="", help="reverse, or random:SEED: run the collected tests in another "
                                               "order (the tests must not depend on the order they run in)")


def pytest_collection_modifyitems(config, items):
  order = config.getoption("--order")
  if order == "reverse":
    items.reverse()
  elif order.startswith("random:"):
    import random
    random.Random(int(order.split(":", 1)[1])).shuffle(items)
  elif order:
    raise ValueError(f"--order={order!r}: must be reverse or random:SEED")
