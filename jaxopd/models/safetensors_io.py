"""The safetensors format read and written with NumPy, bfloat16 and float16 included.

``safetensors``' own NumPy framework has no bfloat16, and nearly every current
checkpoint is bfloat16, so jaxopd reads the format itself: an 8-byte
little-endian header length, a JSON header ``name -> {dtype, shape,
data_offsets}``, then the raw little-endian bytes. :func:`open_tensors`
memory-maps the file, so slicing a tensor reads only the pages of that slice
(each device reads its own block); :func:`save` writes a file that
``safetensors`` and ``transformers`` load.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxopd.errors import WeightFileError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
  """``(header without __metadata__, byte offset of the data)``; ValueError naming the file
  when it is not a safetensors file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise WeightFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    n = struct.unpack("<Q", head)[0]
    if n > size - 8:
      raise WeightFileError(f"{path}: not a safetensors file (header length {n} exceeds the file, {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise WeightFileError(f"{path}: not a safetensors file (its header is not JSON)") from None
  header.pop("__metadata__", None)
  for name, t in header.items():
    b, e = t["data_offsets"]
    if e > size - 8 - n:
      raise WeightFileError(f"{path}: tensor {name!r} ends at byte {8 + n + e}, past the end of the file "
                       f"({size} bytes): the file is truncated")
  return header, 8 + n


class Tensors:
  """The tensors of one file, each a lazily read ``np.ndarray`` view (``tensors[name]``)."""

  def __init__(self, path: str):
    self.path = path
    self.header, self._start = read_header(path)
    self._map = np.memmap(path, dtype=np.uint8, mode="r") if self.header else None

  def keys(self):
    return self.header.keys()

  def dtype_name(self, name: str) -> str:
    return self.header[name]["dtype"]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def __getitem__(self, name: str) -> np.ndarray:
    t = self.header[name]
    if t["dtype"] not in DTYPES:
      raise WeightFileError(f"{self.path}: tensor {name!r} has dtype {t['dtype']}, which jaxopd does not read "
                       f"(supported: {', '.join(DTYPES)})")
    b, e = t["data_offsets"]
    raw = self._map[self._start + b:self._start + e]
    return raw.view(DTYPES[t["dtype"]]).reshape(t["shape"])


def open_tensors(path: str) -> Tensors:
  return Tensors(path)


def save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
  """Writes ``tensors`` (each in its own dtype: float32, bfloat16, float16, ...) to ``path``."""
  header, offset, order = {}, 0, sorted(tensors)
  for name in order:
    x = np.ascontiguousarray(tensors[name])
    if x.dtype not in NAMES:
      raise ValueError(f"safetensors save: tensor {name!r} has dtype {x.dtype}, which the format here does "
                       f"not write")
    header[name] = {"dtype": NAMES[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
    offset += x.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)          # the data starts 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in order:
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
  os.replace(tmp, path)
