"""Export a compressed Llama as a compressed-tensors checkpoint (what vLLM and transformers load).

Written with safetensors and json only (no torch). The directory holds config.json with
`quantization_config` (quant_method 'compressed-tensors', quantization_status
'compressed', one config group per distinct method, targeting the exact HF module names
of its components, e.g. 'model.layers.3.mlp.down_proj'; the top-level format is the
groups' format, or 'mixed-precision' when they differ), the safetensors files and the
tokenizer. Per quantized module, in the format's tensors (compressed-tensors 0.20 source:
compressors/naive_quantized, compressors/pack_quantized, quantization/lifecycle/forward):

  method (dtm spec)                 format          tensors                       weights
  absmax(8, channel)                int-quantized   weight int8 [out, in],        int8 sym channel
                                                    weight_scale f32 [out, 1]
  w8a8                              int-quantized   same (int8.quantize_weight)   + input_activations
                                                                                  int8 sym dynamic token
  absmax(b<8, channel|group)        pack-quantized  weight_packed int32 [out, ceil(in*b/32)],
                                                    weight_scale f32 [out, G],    int b sym
                                                    weight_shape int64 [2]
  rtn(b<8, group_size, sym)         pack-quantized  + weight_zero_point int32     int b asym
                                                    [ceil(out*b/32), G] (unless sym)

Dequantization in the format is w = (q - zero_point) * scale, q signed in
[-2^(b-1), 2^(b-1) - 1]. dtm's grids map onto it exactly: AbsMax q = round(w / s) with
s = max|w| / (2^(b-1) - 1) (q in +-(2^(b-1) - 1), zero point 0; the scale convention
of the format's own calibration, absmax / 127.5, does not matter: the scale is stored);
GPTQ's min-max grid (`dtm.compress.gptq`, codes c in 0..2^b - 1, w' = s (c - z)) as
q = c - 2^(b-1), zero_point = z - 2^(b-1) (0 for sym, whose z = 2^(b-1)). Scales are
stored in float32, so every dequantized weight equals dtm's fake-quantized weight bit
for bit (checked here before writing). Packing (`pack_to_int32`): q + 2^(b-1) as
unsigned b-bit fields, element i of a row at bit i*b of the row's little-endian stream
of int32 words; the zero point is packed the same way along the output axis.

W8A8 activations are dynamic per-token symmetric int8 in the format; its runtimes
choose their own scale (vLLM absmax / 127 like dtm, compressed-tensors' reference
forward absmax / 127.5), so W8A8 logits agree only up to activation rounding.

Components with pruning methods (magnitude, nm, wanda, sparsegpt) or identity are
written dense (their compressed weights). Methods the format cannot express raise
DtmError naming them: llm_int8 (no outlier decomposition in the format), gptq (its grid
is not kept by apply_spec), absmax with granularity=tensor.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dtm import compress, components, safetensors_io
from dtm.compress import gptq as gptq_lib
from dtm.compress import int8
from dtm.components import Component, get_path
from dtm.convert import hf_shape
from dtm.errors import DtmError
from dtm.model_config import ModelConfig, write_hf_config

PRUNING_METHODS = frozenset({"identity", "magnitude", "nm", "wanda", "sparsegpt"})
_FLOAT = np.dtype(np.float32)


# ------------------------------------------------------------------------------ schemes


def scheme(method: compress.Method, what: str) -> dict[str, Any] | None:
  """The compressed-tensors scheme (weights, input_activations, format) of a method, None
  for a dense one; DtmError for a method the format cannot express."""
  a = method.kwargs
  if method.name in PRUNING_METHODS:
    return None
  if method.name == "absmax":
    if a["granularity"] == "tensor":
      raise DtmError(f"compressed-tensors export: absmax granularity=tensor ({what}) is not "
                     f"supported by this exporter; use granularity=channel or group")
    return _scheme(a["bits"], True, a.get("group_size"), None)
  if method.name == "rtn":
    if a["bits"] == 8 and not a["sym"]:
      raise DtmError(f"compressed-tensors export: rtn(bits=8, sym=False) ({what}) is not "
                     f"supported by this exporter (asymmetric int8 would need the int-quantized "
                     f"zero-point layout); use sym=True or bits < 8")
    return _scheme(a["bits"], a["sym"], a.get("group_size"), None)
  if method.name == "w8a8":
    act = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
           "strategy": "token", "dynamic": True}
    return _scheme(8, True, None, act)
  if method.name == "llm_int8":
    raise DtmError(f"compressed-tensors export: {method.to_string()} ({what}) cannot be "
                   f"expressed in the format (it has no mixed-precision outlier decomposition); "
                   f"use w8a8, or export_format=safetensors with a weight-only method")
  if method.name == "gptq":
    raise DtmError(f"compressed-tensors export: gptq ({what}) is not supported yet: its grid "
                   f"(scale, zero per group) is not kept by apply_spec, and the exporter cannot "
                   f"recover it from the dequantized weights; export rtn, or evaluate gptq in dtm")
  raise DtmError(f"compressed-tensors export: method {method.to_string()} ({what}) has no "
                 f"compressed-tensors form in this exporter")


def _scheme(bits: int, sym: bool, group_size: int | None, act: dict | None) -> dict[str, Any]:
  weights = {"num_bits": bits, "type": "int", "symmetric": bool(sym), "group_size": group_size,
             "strategy": "group" if group_size else "channel", "dynamic": False}
  fmt = "int-quantized" if bits == 8 else "pack-quantized"
  return {"weights": weights, "input_activations": act, "output_activations": None,
          "format": fmt}


# ------------------------------------------------------------------------ quantization


def quantized_tensors(w_OI: np.ndarray, method: compress.Method, what: str) -> dict[str, np.ndarray]:
  """The format's tensors of one module (suffixes 'weight', 'weight_packed', 'weight_scale',
  'weight_zero_point', 'weight_shape') for an HF weight [out, in]; checks that the
  format's dequantization (q - zp) * scale equals dtm's fake-quantized weight exactly."""
  sch = scheme(method, what)
  bits, sym = sch["weights"]["num_bits"], sch["weights"]["symmetric"]
  w = jnp.asarray(w_OI, jnp.float32)
  out_dim, in_dim = w_OI.shape
  if method.name == "w8a8":
    q, absmax = jax.device_get(int8.quantize_weight(w))
    scale_OG = (absmax / np.float32(127)).astype(np.float32)[:, None]
    q = q.astype(np.int32)
    zp_OG, expect = None, None  # dtm rescales the integer product: no dequantized weight
  elif method.name == "absmax":
    a = method.kwargs
    scale = np.asarray(compress.absmax_scale(w, bits, a["granularity"], a.get("group_size")))
    expect = np.asarray(compress.absmax(w, **a)[0], np.float32)
    g = in_dim // scale.shape[1]
    scale_OG = scale.reshape(out_dim, -1)
    safe = np.where(scale_OG == 0, np.float32(1), scale_OG)
    q = np.round(expect.reshape(out_dim, -1, g) / safe[..., None]).astype(np.int32).reshape(
        out_dim, in_dim)
    zp_OG = None
  else:  # rtn on GPTQ's min-max grid
    a = method.kwargs
    res = jax.device_get(gptq_lib.rtn(w, a["bits"], a.get("group_size"), a["sym"], name=what))
    offset = 1 << (bits - 1)
    q = res.codes.astype(np.int32) - offset
    scale_OG = np.asarray(res.scale, np.float32)
    zp_OG = None if sym else (res.zero.astype(np.int32) - offset)
    expect = np.asarray(res.w, np.float32)
  g_idx = np.arange(in_dim) // (in_dim // scale_OG.shape[1])
  zp_full = 0 if zp_OG is None else zp_OG[:, g_idx]
  deq = ((q - zp_full).astype(np.float32) * scale_OG[:, g_idx]).astype(np.float32)
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  if q.min() < lo or q.max() > hi or (expect is not None and not np.array_equal(deq, expect)):
    raise DtmError(f"compressed-tensors export of {what} ({method.to_string()}): the codes do "
                   f"not reproduce dtm's quantized weights exactly (internal error)")
  out = {"weight_scale": scale_OG}
  if bits == 8:
    out["weight"] = q.astype(np.int8)
  else:
    out["weight_packed"] = pack_int32(q, bits)
    out["weight_shape"] = np.asarray([out_dim, in_dim], np.int64)
    if zp_OG is not None:
      out["weight_zero_point"] = pack_int32(zp_OG.T, bits).T.copy()
  return out


def pack_int32(q: np.ndarray, bits: int) -> np.ndarray:
  """compressed-tensors' `pack_to_int32` along the last axis: signed b-bit values
  [rows, cols] -> int32 [rows, ceil(cols * b / 32)] (module docstring)."""
  rows, cols = q.shape
  u = (q.astype(np.int64) + (1 << (bits - 1))).astype(np.uint32)
  padded = math.ceil(cols / 32) * 32
  u = np.pad(u, ((0, 0), (0, padded - cols)))
  bit_RCb = ((u[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
  stream = bit_RCb.reshape(rows, padded * bits)  # bit i*b + j of the row = bit j of element i
  words = np.packbits(stream.reshape(rows, -1, 8), axis=-1, bitorder="little").reshape(rows, -1)
  words = words.view("<u4").astype(np.uint32).view(np.int32)
  return np.ascontiguousarray(words[:, :math.ceil(cols * bits / 32)])


# ------------------------------------------------------------------------------ export


def quantization_config(methods: dict[Component, compress.Method]) -> dict[str, Any]:
  """config.json's quantization_config for the quantized components."""
  groups: dict[str, dict[str, Any]] = {}
  by_method: dict[compress.Method, list[str]] = {}
  for comp, method in sorted(methods.items()):
    if scheme(method, comp.name) is not None:
      by_method.setdefault(method, []).append(comp.hf_name[:-len(".weight")])
  for i, (method, targets) in enumerate(by_method.items()):
    groups[f"group_{i}"] = {"targets": targets, **scheme(method, targets[0])}
  formats = sorted({g["format"] for g in groups.values()})
  return {"quant_method": "compressed-tensors", "config_groups": groups,
          "format": formats[0] if len(formats) == 1 else "mixed-precision",
          "quantization_status": "compressed", "ignore": ["lm_head"],
          "kv_cache_scheme": None, "global_compression_ratio": None}


def export(directory: str, cfg: ModelConfig, params, spec: str | compress.Spec,
           compressed_params=None, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> dict:
  """Write `spec` applied to `params` (the uncompressed model) as a compressed-tensors
  checkpoint directory; returns the quantization_config.

  Quantized components are encoded from `params` with the spec's method (the same
  grid dtm's fake quantization uses); dense components (pruned, identity, unnamed)
  come from `compressed_params` (`apply_spec`'s result; required when the spec prunes).
  DtmError for a method the format cannot express (module docstring), before anything
  is written.
  """
  num_layers, shapes = compress.kernel_shapes(params)
  spec = compress.validate(spec, num_layers, shapes)
  methods = spec.resolve(num_layers)
  qconfig = quantization_config(methods)  # raises for unsupported methods first
  pruned = [c for c, m in methods.items() if m.name in PRUNING_METHODS]
  if pruned and compressed_params is None:
    raise DtmError(f"compressed-tensors export: {pruned[0].name} is pruned "
                   f"({methods[pruned[0]].to_string()}); pass the compressed params")
  dense_src = params if compressed_params is None else compressed_params
  np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  quantized = {c.hf_name: (c, m) for c, m in methods.items() if m.name not in PRUNING_METHODS}

  entries: list[tuple[str, tuple[int, ...], np.dtype]] = []
  for name, slot in components.iter_flax_to_hf(cfg.num_layers, cfg.tie_word_embeddings):
    shape = hf_shape(slot, tuple(get_path(params, slot.path).shape))
    if name not in quantized:
      entries.append((name, shape, np_dtype))
      continue
    comp, method = quantized[name]
    base = name[:-len("weight")]
    for suffix, (s, dt) in _tensor_shapes(shape, method).items():
      entries.append((base + suffix, s, dt))

  cache: dict[str, dict[str, np.ndarray]] = {}

  def get(name: str) -> np.ndarray:
    module, _, suffix = name.rpartition(".")
    if module + ".weight" in quantized:
      if module not in cache:
        cache.clear()  # one module's tensors at a time
        comp, method = quantized[module + ".weight"]
        w_OI = np.asarray(jax.device_get(get_path(params, comp.param_path)[comp.layer])).T
        cache[module] = quantized_tensors(w_OI, method, comp.name)
      return cache[module][suffix]
    slot = components.hf_to_slot(name)
    leaf = get_path(dense_src, slot.path)
    arr = np.asarray(leaf[slot.layer] if slot.layer is not None else leaf)
    return (arr.T if slot.transpose else arr).astype(np_dtype)

  os.makedirs(directory, exist_ok=True)
  safetensors_io.write_sharded(directory, entries, get, max_shard_bytes)
  write_hf_config(cfg, directory)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    hf_config = json.load(f)
  hf_config["quantization_config"] = qconfig
  with open(path + ".tmp", "w") as f:
    json.dump(hf_config, f, indent=2)
  os.replace(path + ".tmp", path)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
  return qconfig


def _tensor_shapes(shape_OI: tuple[int, int], method: compress.Method):
  """{suffix: (shape, dtype)} of a quantized module's tensors (without computing them)."""
  out_dim, in_dim = shape_OI
  w = scheme(method, "")["weights"]
  groups = in_dim // w["group_size"] if w["group_size"] else 1
  shapes = {"weight_scale": ((out_dim, groups), _FLOAT)}
  if w["num_bits"] == 8:
    shapes["weight"] = ((out_dim, in_dim), np.dtype(np.int8))
  else:
    b = w["num_bits"]
    shapes["weight_packed"] = ((out_dim, math.ceil(in_dim * b / 32)), np.dtype(np.int32))
    shapes["weight_shape"] = ((2,), np.dtype(np.int64))
    if not w["symmetric"]:
      shapes["weight_zero_point"] = ((math.ceil(out_dim * b / 32), groups), np.dtype(np.int32))
  return shapes


