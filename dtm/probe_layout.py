"""Where probes run: the ('probe', 'model') mesh (`probe_mesh`), the tensor-parallel
layout of the params over 'model' (`param_pspec`, `param_shardings`), and the grouping of
a method family's probes into calls of one `Slot` per probe group (`schedule`), and the
matmul FLOPs a probe must compute (`useful_flops`, the dry run's and bench's yardstick).
`dtm.probe.ProbeRunner` runs the calls; `dtm.aot` plans them with the same functions.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from dtm.components import Component
from dtm.errors import DtmError
from dtm.model_config import ModelConfig

PROBE_AXIS, MODEL_AXIS = "probe", "model"


def probe_mesh(devices=None, model: int = 1) -> Mesh:
  """('probe', 'model') mesh over all devices (all hosts after jax.distributed.initialize()):
  len(devices) / model probe groups of `model` devices each (tensor parallel within a
  group). Raises DtmError if `model` does not divide the device count."""
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise DtmError(f"probe.mesh_model={model} must be >= 1 and divide the {len(devices)} "
                   "devices")
  return Mesh(np.asarray(devices).reshape(len(devices) // model, model),
              (PROBE_AXIS, MODEL_AXIS))


def param_pspec(path: tuple[str, ...], shape: tuple[int, ...], model: int) -> PS:
  """Tensor-parallel layout of one param over 'model' (Megatron): the output features of
  q, k, v, gate, up [L, D, out] and the input features of o, down [L, in, D] are split, so
  attention runs head-parallel and the MLP hidden-parallel; embeddings, the LM head and
  norm scales stay replicated. A dimension the size does not divide stays whole."""
  if model <= 1 or len(shape) != 3 or path[-1] != "kernel":
    return PS()
  kind = path[-2]
  axis = 2 if kind in ("q", "k", "v", "gate", "up") else 1 if kind in ("o", "down") else None
  if axis is None or shape[axis] % model:
    return PS()
  return PS(*[MODEL_AXIS if a == axis else None for a in range(3)])


def param_shardings(mesh: Mesh, params):
  """NamedSharding per param leaf (arrays or ShapeDtypeStructs) by `param_pspec`."""
  model = mesh.shape[MODEL_AXIS]

  def one(path, leaf):
    keys = tuple(getattr(k, "key", str(k)) for k in path)
    return NamedSharding(mesh, param_pspec(keys, tuple(leaf.shape), model))
  return jax.tree_util.tree_map_with_path(one, params)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One device's share of a call: probes on one component, with their dynamic args and
  the caller's keys (same length)."""
  component: Component
  args: tuple[float, ...]
  keys: tuple


def schedule(work: dict[Component, list[tuple]], num_devices: int, max_per_device: int,
             uniform: bool = False) -> list[list[Slot]]:
  """Group the probes of one method family into calls of one `Slot` per device.

  work: component -> [(key, dynamic arg), ...]. A device runs one component per call (its
  own prefix start and compressed kind), so different components go to different
  devices; a component's probes are split into slots of at most k = min(max_per_device,
  ...) so that, when there are fewer components than devices, the levels spread over the
  idle devices. Slots are ordered by (layer, kind), so a call's devices carry similar work
  (the layers after their own). Returns calls of at most num_devices slots
  (`ProbeRunner.run_slots` pads the last one).

  uniform: every call holds slots of one component only (`ProbeRunner.uniform`: with a
  'model' axis the groups' collectives sit inside the layer loop and the kind switch, so
  all groups must take the same branches and trip counts).
  """
  work = {comp: items for comp, items in work.items() if items}
  if not work:
    return []
  most = max(len(items) for items in work.values())
  spread = num_devices if uniform else max(1, num_devices // len(work))  # devices per component
  if uniform:
    k = max(1, min(max_per_device, -(-most // spread)))
    calls = []
    for comp in sorted(work):
      items = work[comp]
      slots = [Slot(comp, tuple(a for _, a in items[i:i + k]),
                    tuple(key for key, _ in items[i:i + k])) for i in range(0, len(items), k)]
      calls += [slots[i:i + num_devices] for i in range(0, len(slots), num_devices)]
    return calls
  k = max(1, min(max_per_device, -(-most // spread)))
  slots = []
  for comp in sorted(work):
    items = work[comp]
    for i in range(0, len(items), k):
      part = items[i:i + k]
      slots.append(Slot(comp, tuple(a for _, a in part), tuple(key for key, _ in part)))
  return [slots[i:i + num_devices] for i in range(0, len(slots), num_devices)]


def useful_flops(cfg: ModelConfig, layer: int, p: int, s: int, n: int) -> float:
  """Matmul FLOPs a probe on `layer` must compute: layers layer..L-2 on all P·S positions
  (projections + attention scores/values over the causal triangle), the last layer's
  keys/values at all S positions and the rest at the N continuation rows, and the LM
  head at P·N positions."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  hq, hkv, kd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  kv = 2 * 2 * d * hkv * kd
  rest = 2 * (d * hq * kd + hq * kd * d + 3 * d * f)
  full_layer = p * (s * (kv + rest) + 2 * 2 * hq * kd * (s * (s + 1) / 2))
  last_layer = p * (s * kv + n * rest  # query rows c-1..S-1 see c..S keys
                    + 2 * 2 * hq * kd * sum(s - n + 1 + j for j in range(n)))
  return (cfg.num_layers - 1 - layer) * full_layer + last_layer + p * n * 2 * d * cfg.vocab_size
