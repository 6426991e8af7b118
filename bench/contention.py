"""Contention check shared by the benchmarks: how many CPUs *other* processes
used while a benchmark ran (the machine is shared; timings taken under load
are flagged, not trusted)."""

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
