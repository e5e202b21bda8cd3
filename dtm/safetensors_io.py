"""Minimal streaming reader/writer for the safetensors format.

Format: 8-byte little-endian header length n, n bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes. Reading one tensor at a time with
`readinto` keeps host memory to one tensor (no mmap pages held), and a truncated
or corrupt file is detected from the header before any tensor is used.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from dtm.errors import DtmError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_header(path: str) -> dict:
  """The tensor table of one .safetensors file; DtmError if missing/truncated/corrupt."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise DtmError(f"corrupt safetensors file {path}: shorter than its 8-byte header")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8:
        raise DtmError(f"corrupt or truncated safetensors file {path}: header of {n} bytes "
                       f"but file has {size} bytes")
      header = json.loads(f.read(n))
  except FileNotFoundError:
    raise DtmError(f"safetensors file not found: {path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise DtmError(f"corrupt safetensors file {path}: header is not valid JSON") from None
  header.pop("__metadata__", None)
  data_len = size - 8 - n
  for name, info in header.items():
    end = info["data_offsets"][1]
    if end > data_len:
      raise DtmError(f"truncated safetensors file {path}: tensor {name!r} ends at byte {end} "
                     f"of the data section, which has only {data_len} bytes "
                     f"(was the download interrupted?)")
    if info["dtype"] not in _DTYPES:
      raise DtmError(f"unsupported dtype {info['dtype']} of tensor {name!r} in {path}")
  for info in header.values():
    info["_base"] = 8 + n
  return header


def read_tensor(path: str, info: dict) -> np.ndarray:
  """Read one tensor described by a `read_header` entry into a fresh array."""
  dtype = _DTYPES[info["dtype"]]
  begin, end = info["data_offsets"]
  out = np.empty(info["shape"], dtype)
  if out.nbytes != end - begin:
    raise DtmError(f"corrupt safetensors file {path}: tensor byte size does not match its shape")
  with open(path, "rb") as f:
    f.seek(info["_base"] + begin)
    got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
  if got != out.nbytes:
    raise DtmError(f"truncated safetensors file {path}")
  return out


def iter_tensors(paths: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for every tensor of every file, one at a time."""
  for path in paths:
    header = read_header(path)
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
      yield name, read_tensor(path, header[name])


def write_file(path: str, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
               get_tensor, metadata: dict | None = None) -> None:
  """Write tensors to `path` streaming: `get_tensor(name) -> np.ndarray` is called
  once per tensor, in order, so only one tensor needs to exist at a time.
  Writes `path + '.tmp'` then renames, so a crash never leaves a partial file."""
  header, offset = {}, 0
  for name, shape, dtype in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in tensors:
      arr = np.ascontiguousarray(get_tensor(name), dtype=dtype)
      if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {arr.shape} != declared {shape}")
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))
  os.replace(tmp, path)


def write_sharded(directory: str, entries, get, max_shard_bytes: int) -> None:
  """Write tensors `entries` ((name, shape, numpy dtype), ...) fetched by `get(name)` as
  HF safetensors shards of at most `max_shard_bytes` each (one file, or numbered files
  plus model.safetensors.index.json with the weight map and total size)."""
  def nbytes(e):
    return int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
  shards, cur, cur_bytes = [], [], 0
  for e in entries:
    if cur and cur_bytes + nbytes(e) > max_shard_bytes:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(e)
    cur_bytes += nbytes(e)
  shards.append(cur)
  meta = {"format": "pt"}
  if len(shards) == 1:
    write_file(os.path.join(directory, "model.safetensors"), shards[0], get, meta)
    return
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_file(os.path.join(directory, fname), shard, get, meta)
    for e in shard:
      weight_map[e[0]] = fname
      total += nbytes(e)
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
