"""Helpers shared by the benchmarks: the contention check (how many CPUs other
processes used while a benchmark ran: the machine is shared, so timings taken
under load are flagged, not trusted) and timing of a donated train step."""

import os
import time


def cpu_snapshot():
  """(busy CPU seconds of the whole machine, this process's CPU seconds, wall time), or None."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  tick = os.sysconf("SC_CLK_TCK")
  busy = (sum(v[:8]) - v[3] - v[4]) / tick    # all but idle and iowait
  t = os.times()
  return busy, t.user + t.system, time.perf_counter()


def other_load(start):
  """Average number of CPUs used by other processes since ``start`` (a :func:`cpu_snapshot`)."""
  end = cpu_snapshot()
  if start is None or end is None:
    return None
  return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


def time_donated_step(compiled, state, frozen, batch, warmup: int, repeats: int):
  """Runs a compiled train step (state donated, so it is threaded through) ``warmup``
  times, then times ``repeats`` calls with ``block_until_ready``.
  Returns (median seconds, all times, final state, last metrics)."""
  import statistics

  import jax
  for _ in range(warmup):
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts, state, metrics
