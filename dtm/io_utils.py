"""Small file helpers: atomic writes, fingerprints."""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np


def atomic_write_text(path: str, text: str) -> None:
  """Write via a temporary file + os.replace: readers never see a partial file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@jax.jit
def _leaf_checksum(x):
  """Exact, order-independent uint32 checksum of the bit patterns of x (float32 view),
  position-weighted so permutations change it; identical under any sharding."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32).reshape(-1), jnp.uint32)
  pos = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.stack([jnp.sum(bits), jnp.sum(bits * pos)])


def params_fingerprint(params) -> str:
  """Short hex id of a params tree (paths, shapes, dtypes and exact values)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  sums = jax.device_get([_leaf_checksum(x) for _, x in leaves])
  h = hashlib.sha256()
  for (path, x), s in zip(leaves, sums):
    h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}:".encode())
    h.update(np.asarray(s, np.uint32).tobytes())
  return h.hexdigest()[:16]


def array_fingerprint(*arrays, extra: str = "") -> str:
  h = hashlib.sha256(extra.encode())
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]
