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
  gptq(b, group_size, act_order,    pack-quantized  as rtn, also for b = 8        int b, actorder
       sym)                                                                       'weight' if act_order

Dequantization in the format is w = (q - zero_point) * scale, q signed in
[-2^(b-1), 2^(b-1) - 1]. dtm's grids map onto it exactly: AbsMax q = round(w / s) with
s = max|w| / (2^(b-1) - 1) (q in +-(2^(b-1) - 1), zero point 0; the scale convention
of the format's own calibration, absmax / 127.5, does not matter: the scale is stored);
GPTQ's min-max grid (`dtm.compress.gptq`, codes c in 0..2^b - 1, w' = s (c - z)) as
q = c - 2^(b-1), zero_point = z - 2^(b-1) (0 for sym, whose z = 2^(b-1)). Scales are
stored in float32, so every dequantized weight equals dtm's fake-quantized weight bit
for bit (checked here before writing). rtn and absmax codes are recomputed from the
original weights; gptq's come from the `gptq.Grid` that `apply_spec(..., grids=...)`
kept, and must reproduce the compressed weights exactly.

Act-order: compressed-tensors 0.20 keeps one activation ordering, actorder='weight'
(quantization/quant_args.py: GPTQ processes columns in activation order, but groups stay
runs of group_size consecutive input columns, so the tensors are those of plain group
quantization and no g_idx is stored); that is dtm's gptq(act_order=True) with static
groups (its default). The g_idx ordering (actorder='group', a `weight_g_idx` tensor) was
removed from the format: gptq(act_order=True, static_groups=False) with groups is refused. Packing (`pack_to_int32`): q + 2^(b-1) as
unsigned b-bit fields, element i of a row at bit i*b of the row's little-endian stream
of int32 words; the zero point is packed the same way along the output axis.

W8A8 activations are dynamic per-token symmetric int8 in the format; its runtimes
choose their own scale (vLLM absmax / 127 like dtm, compressed-tensors' reference
forward absmax / 127.5), so W8A8 logits agree only up to activation rounding.

Components with pruning methods (magnitude, nm, wanda, sparsegpt) or identity are
written dense (their compressed weights). Methods the format cannot express raise
DtmError naming them: llm_int8 (no outlier decomposition in the format), gptq with
dynamic groups under act_order (above), absmax with granularity=tensor, 8-bit asymmetric
rtn.
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
    if a["act_order"] and not a["static_groups"] and a.get("group_size"):
      raise DtmError(f"compressed-tensors export: {method.to_string()} ({what}) has groups in "
                     f"activation order (a g_idx), which compressed-tensors 0.20 no longer "
                     f"expresses (actorder='group' was removed); use static_groups=True (the "
                     f"default with act_order: actorder='weight' in the format)")
    return _scheme(a["bits"], a["sym"], a.get("group_size"), None, fmt="pack-quantized",
                   actorder="weight" if a["act_order"] else None)
  raise DtmError(f"compressed-tensors export: method {method.to_string()} ({what}) has no "
                 f"compressed-tensors form in this exporter")


def _scheme(bits: int, sym: bool, group_size: int | None, act: dict | None,
            fmt: str | None = None, actorder: str | None = None) -> dict[str, Any]:
  weights = {"num_bits": bits, "type": "int", "symmetric": bool(sym), "group_size": group_size,
             "strategy": "group" if group_size else "channel", "dynamic": False}
  if actorder is not None:
    weights["actorder"] = actorder
  fmt = fmt or ("int-quantized" if bits == 8 else "pack-quantized")
  return {"weights": weights, "input_activations": act, "output_activations": None,
          "format": fmt}


# ------------------------------------------------------------------------ quantization


def quantized_tensors(w_OI: np.ndarray, method: compress.Method, what: str,
                      grid: gptq_lib.Grid | None = None) -> dict[str, np.ndarray]:
  """The format's tensors of one module (suffixes 'weight', 'weight_packed', 'weight_scale',
  'weight_zero_point', 'weight_shape') for an HF weight [out, in]; checks that the
  format's dequantization (q - zp) * scale equals dtm's fake-quantized weight exactly.

  w_OI is the original weight, except for gptq: the compressed weight (`apply_spec`'s),
  with `grid` the component's `gptq.Grid` (kept by `apply_spec(..., grids=...)`).
  """
  sch = scheme(method, what)
  bits = sch["weights"]["num_bits"]
  if method.name == "w8a8":
    q, scale_OG, zp_OG, expect = _w8a8_codes(w_OI)
  elif method.name == "absmax":
    q, scale_OG, zp_OG, expect = _absmax_codes(w_OI, method)
  elif method.name == "gptq":
    q, scale_OG, zp_OG, expect = _gptq_codes(w_OI, method, what, grid)
  else:  # rtn on GPTQ's min-max grid
    q, scale_OG, zp_OG, expect = _rtn_codes(w_OI, method, what)
  _check_exact(q, scale_OG, zp_OG, expect, bits, f"{what} ({method.to_string()})")
  out_dim, in_dim = w_OI.shape
  out = {"weight_scale": scale_OG}
  if sch["format"] == "int-quantized":
    out["weight"] = q.astype(np.int8)
  else:
    out["weight_packed"] = pack_int32(q, bits)
    out["weight_shape"] = np.asarray([out_dim, in_dim], np.int64)
    if zp_OG is not None:
      out["weight_zero_point"] = pack_int32(zp_OG.T, bits).T.copy()
  return out


# Each *_codes gives (q int32 [out, in] signed codes, scale f32 [out, G], zero point int32
# [out, G] or None (symmetric), the dequantized weight the codes must reproduce or None).


def _w8a8_codes(w_OI):
  q, absmax = jax.device_get(int8.quantize_weight(jnp.asarray(w_OI, jnp.float32)))
  scale_OG = (absmax / np.float32(127)).astype(np.float32)[:, None]
  return q.astype(np.int32), scale_OG, None, None  # dtm rescales the integer product


def _absmax_codes(w_OI, method: compress.Method):
  a = method.kwargs
  w = jnp.asarray(w_OI, jnp.float32)
  out_dim, in_dim = w_OI.shape
  scale = np.asarray(compress.absmax_scale(w, a["bits"], a["granularity"], a.get("group_size")))
  expect = np.asarray(compress.absmax(w, **a)[0], np.float32)
  g = in_dim // scale.shape[1]
  scale_OG = scale.reshape(out_dim, -1)
  safe = np.where(scale_OG == 0, np.float32(1), scale_OG)
  q = np.round(expect.reshape(out_dim, -1, g) / safe[..., None]).astype(np.int32).reshape(
      out_dim, in_dim)
  return q, scale_OG, None, expect


def _rtn_codes(w_OI, method: compress.Method, what: str):
  a = method.kwargs
  res = jax.device_get(gptq_lib.rtn(jnp.asarray(w_OI, jnp.float32), a["bits"], a.get("group_size"),
                                    a["sym"], name=what))
  return _minmax_codes(res.codes, res.scale, res.zero, a["bits"], a["sym"]) + (
      np.asarray(res.w, np.float32),)


def _gptq_codes(w_OI, method: compress.Method, what: str, grid: gptq_lib.Grid | None):
  if grid is None:
    raise DtmError(f"compressed-tensors export of {what} ({method.to_string()}): no GPTQ grid "
                   f"was kept for it (compress with apply_spec(..., grids=...))")
  in_dim = w_OI.shape[1]
  if not np.array_equal(grid.g_idx, np.arange(in_dim) // (in_dim // grid.scale.shape[1])):
    raise DtmError(f"compressed-tensors export of {what} ({method.to_string()}): its groups "
                   f"are not runs of consecutive input columns (a g_idx), which the format "
                   f"cannot express")
  a = method.kwargs
  return _minmax_codes(grid.codes, grid.scale, grid.zero, a["bits"], a["sym"]) + (
      np.asarray(w_OI),)


def _minmax_codes(codes, scale, zero, bits: int, sym: bool):
  """GPTQ's min-max grid (codes 0..2^b - 1, zero) -> the format's signed (q, scale, zp)."""
  offset = 1 << (bits - 1)
  zp_OG = None if sym else np.asarray(zero, np.int32) - offset
  return np.asarray(codes, np.int32) - offset, np.asarray(scale, np.float32), zp_OG


def _check_exact(q, scale_OG, zp_OG, expect, bits: int, what: str) -> None:
  """DtmError unless q is in range and (q - zp) * scale (float32, cast to expect's dtype)
  equals `expect` bit for bit (None: range only)."""
  g_idx = np.arange(q.shape[1]) // (q.shape[1] // scale_OG.shape[1])
  zp_full = 0 if zp_OG is None else zp_OG[:, g_idx]
  deq = ((q - zp_full).astype(np.float32) * scale_OG[:, g_idx]).astype(np.float32)
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  if q.min() < lo or q.max() > hi or (
      expect is not None and not np.array_equal(deq.astype(expect.dtype), expect)):
    raise DtmError(f"compressed-tensors export of {what}: the codes do not reproduce dtm's "
                   f"quantized weights exactly (internal error)")


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
           compressed_params=None, tokenizer=None, max_shard_bytes: int = 5 * 2**30,
           grids: dict[Component, gptq_lib.Grid] | None = None) -> dict:
  """Write `spec` applied to `params` (the uncompressed model) as a compressed-tensors
  checkpoint directory; returns the quantization_config.

  absmax / rtn / w8a8 components are encoded from `params` with the spec's method (the
  same grid dtm's fake quantization uses); gptq components from their `gptq.Grid` in
  `grids` (kept by `apply_spec(..., grids=...)`) and their weights in `compressed_params`;
  dense components (pruned, identity, unnamed) come from `compressed_params`
  (`apply_spec`'s result; required when the spec prunes or has gptq). DtmError for a
  method the format cannot express (module docstring) or a missing input, before
  anything is written.
  """
  num_layers, shapes = compress.kernel_shapes(params)
  spec = compress.validate(spec, num_layers, shapes)
  methods = spec.resolve(num_layers)
  qconfig = quantization_config(methods)  # raises for unsupported methods first
  _check_inputs(methods, shapes, compressed_params, grids)
  dense_src = params if compressed_params is None else compressed_params
  np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  quantized = {c.hf_name: (c, m) for c, m in methods.items() if m.name not in PRUNING_METHODS}
  cache: dict[str, dict[str, np.ndarray]] = {}

  def get(name: str) -> np.ndarray:
    module, _, suffix = name.rpartition(".")
    if module + ".weight" in quantized:
      if module not in cache:
        cache.clear()  # one module's tensors at a time
        comp, method = quantized[module + ".weight"]
        src = dense_src if method.name == "gptq" else params
        w_OI = np.asarray(jax.device_get(get_path(src, comp.param_path)[comp.layer])).T
        cache[module] = quantized_tensors(w_OI, method, comp.name, (grids or {}).get(comp))
      return cache[module][suffix]
    slot = components.hf_to_slot(name)
    leaf = get_path(dense_src, slot.path)
    arr = np.asarray(leaf[slot.layer] if slot.layer is not None else leaf)
    return (arr.T if slot.transpose else arr).astype(np_dtype)

  os.makedirs(directory, exist_ok=True)
  safetensors_io.write_sharded(directory, _entries(cfg, params, quantized, np_dtype), get,
                               max_shard_bytes)
  _write_config(directory, cfg, qconfig)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
  return qconfig


def _check_inputs(methods: dict[Component, compress.Method], shapes: dict[str, tuple[int, int]],
                  compressed_params, grids) -> None:
  """DtmError if a pruned or gptq component lacks the compressed params, or a gptq one
  its grid or a grid of its shapes (shapes: {kind: (out, in)})."""
  needs = [c for c, m in methods.items() if m.name in PRUNING_METHODS or m.name == "gptq"]
  if needs and compressed_params is None:
    raise DtmError(f"compressed-tensors export: {needs[0].name} is compressed with "
                   f"{methods[needs[0]].to_string()}; pass the compressed params")
  missing = [c for c, m in methods.items() if m.name == "gptq" and c not in (grids or {})]
  if missing:
    raise DtmError(f"compressed-tensors export: no GPTQ grid for {missing[0].name}"
                   f"{' ...' if len(missing) > 1 else ''} ({methods[missing[0]].to_string()}); "
                   f"compress with apply_spec(..., grids=...) and pass the grids")
  for comp, method in methods.items():
    if method.name == "gptq":
      out_dim, in_dim = shapes[comp.kind]
      groups = in_dim // method.kwargs.get("group_size", in_dim)
      got = tuple(tuple(np.shape(a)) for a in grids[comp])
      if got != ((out_dim, in_dim), (out_dim, groups), (out_dim, groups), (in_dim,)):
        raise DtmError(f"compressed-tensors export: the GPTQ grid of {comp.name} has shapes "
                       f"{got} (codes, scale, zero, g_idx), expected those of "
                       f"{method.to_string()} on [{out_dim}, {in_dim}]")


def _entries(cfg: ModelConfig, params, quantized: dict, np_dtype
             ) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """(HF tensor name, shape, dtype) of every tensor of the export, in HF order."""
  entries = []
  for name, slot in components.iter_flax_to_hf(cfg.num_layers, cfg.tie_word_embeddings):
    shape = hf_shape(slot, tuple(get_path(params, slot.path).shape))
    if name not in quantized:
      entries.append((name, shape, np_dtype))
      continue
    base = name[:-len("weight")]
    for suffix, (s, dt) in _tensor_shapes(shape, quantized[name][1]).items():
      entries.append((base + suffix, s, dt))
  return entries


def _write_config(directory: str, cfg: ModelConfig, qconfig: dict) -> None:
  """config.json: the HF config of `cfg` with the quantization_config (atomic)."""
  write_hf_config(cfg, directory)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    hf_config = json.load(f)
  hf_config["quantization_config"] = qconfig
  with open(path + ".tmp", "w") as f:
    json.dump(hf_config, f, indent=2)
  os.replace(path + ".tmp", path)


def _tensor_shapes(shape_OI: tuple[int, int], method: compress.Method):
  """{suffix: (shape, dtype)} of a quantized module's tensors (without computing them)."""
  out_dim, in_dim = shape_OI
  sch = scheme(method, "")
  w = sch["weights"]
  groups = in_dim // w["group_size"] if w["group_size"] else 1
  shapes = {"weight_scale": ((out_dim, groups), _FLOAT)}
  if sch["format"] == "int-quantized":
    shapes["weight"] = ((out_dim, in_dim), np.dtype(np.int8))
  else:
    b = w["num_bits"]
    shapes["weight_packed"] = ((out_dim, math.ceil(in_dim * b / 32)), np.dtype(np.int32))
    shapes["weight_shape"] = ((2,), np.dtype(np.int64))
    if not w["symmetric"]:
      shapes["weight_zero_point"] = ((math.ceil(out_dim * b / 32), groups), np.dtype(np.int32))
  return shapes
