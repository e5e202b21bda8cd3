"""Checkpoint conversion: HF-named tensor streams <-> Flax params, HF directory export.

Every source (HF safetensors, GGUF) is turned into a stream of
(HF tensor name, HF-layout array); `params_from_hf_tensors` places each tensor
into a preallocated host tree following the table in `dtm.components`, casting to
the configured param dtype, so host memory holds one model plus one tensor. The
host tree is then moved to devices leaf by leaf (`to_device`).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dtm import components
from dtm import safetensors_io
from dtm.errors import DtmError
from dtm.model import abstract_params
from dtm.model_config import ModelConfig, write_hf_config


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _flat_paths(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], object]]:
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat_paths(v, prefix + (k,))
  else:
    yield prefix, tree


def hf_shape(slot: components.TensorSlot, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the HF tensor that fills `slot` of a Flax leaf of `leaf_shape`."""
  shape = leaf_shape[1:] if slot.layer is not None else leaf_shape
  return tuple(reversed(shape)) if slot.transpose else tuple(shape)


def params_from_hf_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
                           source: str = "checkpoint") -> dict:
  """Host (numpy) params tree from a stream of (HF name, HF-layout array).

  Raises DtmError on a shape mismatch with `cfg`, and on missing tensors.
  Unknown tensor names (e.g. rotary inv_freq buffers) are ignored.
  """
  abstract = abstract_params(cfg)
  dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  host = jax.tree.map(lambda a: np.empty(a.shape, dtype), abstract)
  expected = set(components.hf_tensor_names(cfg.num_layers, cfg.tie_word_embeddings))
  seen = set()
  for name, arr in tensors:
    slot = components.hf_to_slot(name)
    if slot is None or name not in expected:
      if name == "lm_head.weight" and cfg.tie_word_embeddings:
        continue  # some tied checkpoints still store a copy of the embedding
      continue
    leaf = components.get_path(host, slot.path)
    want = hf_shape(slot, leaf.shape)
    if tuple(arr.shape) != want:
      raise DtmError(f"shape mismatch in {source}: tensor {name!r} has shape {tuple(arr.shape)} "
                     f"but the model config implies {want}")
    value = arr.T if slot.transpose else arr
    if slot.layer is None:
      leaf[...] = value
    else:
      leaf[slot.layer] = value
    seen.add(name)
    del arr, value
  missing = sorted(expected - seen)
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise DtmError(f"{source} is missing {len(missing)} tensor(s): {', '.join(missing[:3])}{more}")
  return host


def to_device(host_params: dict, shardings=None) -> dict:
  """Move a host tree to devices leaf by leaf, releasing each host leaf after its
  transfer (peak = model + one leaf). `shardings`: matching tree of Shardings or None."""
  # Paths only: a list of (path, leaf) would keep every host leaf alive until the end.
  paths = [path for path, _ in _flat_paths(host_params)]
  out: dict = {}
  for path in paths:
    leaf = components.get_path(host_params, path)
    sharding = components.get_path(shardings, path) if shardings is not None else None
    if sharding is None:
      arr = jax.device_put(leaf)
    else:
      arr = jax.make_array_from_callback(leaf.shape, sharding, lambda idx, x=leaf: x[idx])
    arr.block_until_ready()
    _set_path(out, path, arr)
    _set_path(host_params, path, None)
    del leaf
  return out


# ----------------------------------------------------------------------------- HF directory

def safetensors_files(directory: str) -> list[str]:
  """The safetensors files of an HF checkpoint directory (index file or single file)."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise DtmError(f"corrupt safetensors index {index}: {e}") from None
    files = sorted(set(weight_map.values()))
    paths = [os.path.join(directory, f) for f in files]
    for p in paths:
      if not os.path.exists(p):
        raise DtmError(f"checkpoint shard listed in {index} is missing: {p}")
    return paths
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if found:
    return [os.path.join(directory, f) for f in found]
  if any(f.endswith((".bin", ".pth", ".pt")) for f in os.listdir(directory)):
    raise DtmError(f"{directory} holds only PyTorch .bin/.pth weights; dtm reads safetensors "
                   "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
  raise DtmError(f"no model.safetensors or *.safetensors files in {directory}")


def load_hf_directory(directory: str, **cfg_overrides) -> tuple[ModelConfig, dict]:
  """(config, host params) from a local HF Llama checkpoint directory."""
  cfg = ModelConfig.from_json_file(os.path.join(directory, "config.json"), **cfg_overrides)
  files = safetensors_files(directory)
  for path in files:  # validate every header before reading any tensor
    safetensors_io.read_header(path)
  params = params_from_hf_tensors(cfg, safetensors_io.iter_tensors(files), source=directory)
  return cfg, params


# ----------------------------------------------------------------------------- export

def export_hf(params, cfg: ModelConfig, directory: str, tokenizer=None,
              dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Write an HF checkpoint directory (config.json, safetensors, tokenizer files)
  that `transformers.LlamaForCausalLM.from_pretrained` loads. Streams one tensor at
  a time from (possibly device-resident) params; shards above `max_shard_bytes`."""
  os.makedirs(directory, exist_ok=True)
  np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  entries = []
  for name, slot in components.iter_flax_to_hf(cfg.num_layers, cfg.tie_word_embeddings):
    leaf = components.get_path(params, slot.path)
    entries.append((name, hf_shape(slot, tuple(leaf.shape)), np_dtype, slot))

  slots = {e[0]: e[3] for e in entries}

  def get(name):
    slot = slots[name]
    leaf = components.get_path(params, slot.path)
    arr = np.asarray(leaf[slot.layer] if slot.layer is not None else leaf)
    return (arr.T if slot.transpose else arr).astype(np_dtype)

  safetensors_io.write_sharded(directory, [(*e[:2], np_dtype) for e in entries], get,
                               max_shard_bytes)
  write_hf_config(cfg.replace(param_dtype=str(np_dtype)), directory)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
