"""The one place that decides how training state and batches are laid out on devices.

Mesh axes: ('data', 'fsdp'). Rules:
  * a parameter (and its optimizer moments and mask) is sharded over 'fsdp' along its
    largest dimension that the fsdp size divides (ties: the later dimension, so stacked
    kernels [L, in, out] split a feature axis, not the layer axis); if no dimension
    divides, or the leaf is a scalar, it is replicated;
  * a batch [B, ...] is sharded over ('data', 'fsdp') along B (every device sees
    B / (data·fsdp) rows), so FSDP devices also split the batch as in ZeRO-3;
  * everything is replicated over 'data'.

XLA inserts the all-gathers (parameters before use) and reduce-scatters (gradients)
that these layouts imply; nothing here is hand-written collective code. Multi-host pods
work unchanged: `jax.devices()` spans all hosts after `jax.distributed.initialize()`, and
batches are built with `jax.make_array_from_callback`, each host filling its own shards.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from dtm.errors import DtmError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all); one of the sizes may be -1
  (= all remaining devices). Raises DtmError if the sizes do not multiply to the count."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise DtmError("mesh.data and mesh.fsdp cannot both be -1")
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise DtmError(f"mesh data={data} x fsdp={fsdp} does not match the {n} available devices "
                   f"(set mesh.data and mesh.fsdp so that data * fsdp = {n}; -1 = the rest)")
  return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def param_pspec(shape: tuple[int, ...], fsdp: int) -> PS:
  """PartitionSpec of one parameter-shaped leaf under the FSDP rule (module docstring)."""
  if fsdp <= 1 or not shape:
    return PS()
  best = None
  for axis, size in enumerate(shape):
    if size % fsdp == 0 and (best is None or size >= shape[best]):
      best = axis
  if best is None:
    return PS()
  return PS(*[("fsdp" if a == best else None) for a in range(len(shape))])


VOCAB_LEAVES = ("embed", "lm_head")


def leaf_pspec(names: tuple[str, ...], shape: tuple[int, ...], fsdp: int) -> PS:
  """PartitionSpec of the leaf at path `names`: `param_pspec`, except that the embedding
  [V, D] and LM head [D, V] (and their moments) split the hidden axis D, not V. The loss
  scans the head in vocabulary chunks (`objective.chunked_loss`): a chunk of a V-split
  head needs the whole head gathered first (one [V, D] copy per model, student and
  teacher), a D-split one only its own chunk."""
  if len(shape) == 2 and fsdp > 1 and set(names) & set(VOCAB_LEAVES):
    hidden = int(shape[0] >= shape[1])  # the smaller axis of [V, D] / [D, V]
    if shape[hidden] % fsdp == 0:
      return PS(*[("fsdp" if a == hidden else None) for a in range(2)])
  return param_pspec(shape, fsdp)


def tree_shardings(mesh: Mesh, abstract_tree):
  """NamedSharding per leaf of a tree of arrays / ShapeDtypeStructs (params, optimizer
  state, masks), by `leaf_pspec`."""
  fsdp = mesh.shape["fsdp"]
  names = lambda path: tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: NamedSharding(mesh, leaf_pspec(names(path), tuple(a.shape), fsdp)),
      abstract_tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch [B, ...] sharded along B over data x fsdp."""
  return NamedSharding(mesh, PS(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PS())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def put_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global batch (the same numpy array on every host: batches are a pure function of
  seed and step) as a sharded jax.Array; each host copies only its addressable shards."""
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def place(tree, shardings):
  """device_put a host or device tree onto `shardings` leaf by leaf."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)
