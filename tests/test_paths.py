"""Run directories through one path abstraction (jaxopd.paths, etils.epath): local paths as
before (the whole suite runs through it), and cloud URLs, here a ``gs://`` bucket faked in
memory (fsspec's memory file system behind epath, and a tensorboardX writer that re-uploads
its buffer on flush as tensorboardX's own GCS writer does): no append, no lock."""

import io
import time

import pytest

from jaxopd import logs, paths
from jaxopd.models import table


@pytest.fixture
def fake_gcs(monkeypatch):
  import fsspec
  from etils import epath
  from fsspec.implementations.memory import MemoryFileSystem
  from tensorboardX import record_writer

  class Memory(MemoryFileSystem):
    protocol = ("gcs", "gs")

    def __init__(self, *a, finalize_on_close=None, **kw):
      super().__init__(*a, **kw)

  class Upload:          # tensorboardX's GCSRecordWriter: the whole buffer written at each flush
    def __init__(self, path):
      self.path, self.buffer = path, io.BytesIO()

    def write(self, data):
      self.buffer.write(data)

    def flush(self):
      epath.Path(self.path).write_bytes(self.buffer.getvalue())

    def close(self):
      self.flush()

  class Factory:
    def open(self, path):
      return Upload(path)

    def directory_check(self, path):
      pass

  fsspec.register_implementation("gcs", Memory, clobber=True)
  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", Factory())
  Memory.store.clear()
  Memory.pseudo_dirs.clear()
  Memory.pseudo_dirs.append("")
  yield "gs://bucket/run"
  Memory.store.clear()


def test_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("gs://bucket/run/") == "gs://bucket/run"
  assert paths.resolve("runs/x") == str(tmp_path / "runs" / "x")
  assert paths.join("gs://bucket/run", "checkpoints", "3") == "gs://bucket/run/checkpoints/3"
  assert table.parse_init("policy", "run:gs://bucket/run") == table.Source("run", "gs://bucket/run", "policy", None)
  assert table.parse_init("policy", "run:gs://bucket/run:reference@40") == table.Source(
      "run", "gs://bucket/run", "reference", 40)
  assert table.parse_init("policy", "run:runs/x:reference") == table.Source(
      "run", str(tmp_path / "runs" / "x"), "reference", None)


def test_local_writes_are_whole_files(tmp_path):
  p = str(tmp_path / "a" / "b.json")
  paths.write_json(p, {"x": 1})
  assert paths.read_json(p) == {"x": 1} and paths.listdir(str(tmp_path / "a")) == ["b.json"]   # no .tmp left


def test_metrics_and_events_in_a_bucket_are_rewritten_whole_and_truncated_on_resume(fake_gcs):
  run = fake_gcs
  log = logs.MetricLogger(run, enabled=True)
  for step in (1, 2, 3, 4):
    log.write(step, "train", {"loss": 1.0 / step})
  assert not paths.exists(paths.join(run, "metrics.jsonl"))     # no append in a bucket: written at flush
  log.flush()
  assert [r["step"] for r in logs.read_metrics(run)] == [1, 2, 3, 4]
  log.close()
  events = [n for n in paths.listdir(paths.join(run, "tb")) if n.startswith("events.out.tfevents.")]
  assert len(events) == 1
  # Resume from step 2: the re-run steps leave both logs, and new records follow the kept ones.
  time.sleep(1.1)     # the new event file's name has the time in seconds: not the old file's name
  log = logs.MetricLogger(run, enabled=True, resume_step=2)
  assert log.dropped == 2 and log.dropped_tb == 2
  log.write(3, "train", {"loss": 0.3})
  log.close()
  assert [(r["step"], r["loss"]) for r in logs.read_metrics(run)] == [(1, 1.0), (2, 0.5), (3, 0.3)]
  from tensorboardX.proto import event_pb2
  steps = [[event_pb2.Event.FromString(r).step for r in logs._read_records(paths.join(run, "tb", name))]
           for name in paths.listdir(paths.join(run, "tb"))]
  assert [[s for s in f if s] for f in steps] == [[1, 2], [3]]   # each file starts with its version event (step 0)


def test_config_and_model_records_round_trip_in_a_bucket(fake_gcs):
  import ml_collections
  run = fake_gcs
  c = ml_collections.ConfigDict({"seed": 3, "total_steps": 10})
  logs.write_config(run, c, enabled=True)
  assert paths.read_json(paths.join(run, "config.json")) == {"seed": 3, "total_steps": 10}
  c.total_steps = 20                                           # resumable
  assert logs.check_resume_config(run, c) == ["total_steps"]
  table.write_record(run, {"policy": {"init": "random"}})
  assert table.run_record(run) == {"policy": {"init": "random"}}
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig = plt.figure()
  paths.savefig(fig, paths.join(run, "summary.png"))
  plt.close(fig)
  with paths.open(paths.join(run, "summary.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
