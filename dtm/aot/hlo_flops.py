"""Matmul FLOPs of a compiled program, counted through its loops (the optimized HLO text).

XLA's `cost_analysis()` visits a while loop's body once, so a layer `scan`, a decode loop
or a `fori_loop` over layers counts as one iteration and the compiled/useful ratio of a
looped function reads < 1. This module parses `compiled.as_text()` (the optimized,
per-device HLO module) and counts

  dot           2 x prod(result dims) x prod(lhs contracting dims)
  convolution   2 x output batch x output features x kernel input features x valid
                window taps of every spatial dim (the TPU compiler's form of a dot)

in every computation, multiplied along the call graph: a `while` body by its trip count
(XLA's `known_trip_count` backend config; a loop whose count is only known at run time,
e.g. `fori_loop(layer + 1, L - 1)` over a traced layer, takes `unknown_trips` and is
reported), a `conditional` by its most expensive branch (one branch runs), fusions and
other called computations once per call. Only matmuls are counted: the same quantity as
the useful FLOPs (MaxText's counting), so compiled / useful > 1 is matmul work the
algorithm does not need (replicated compute, recomputation, full-vocabulary heads).
Alongside, the bytes moved by the instructions outside fusion bodies (`hlo_bytes`), loops
counted through the same way: the memory term of the CPU time model.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from dtm.aot import hlo_bytes, hlo_trips
from dtm.aot.hlo_text import Instr, NAME, by_name, called, dims, parse

_DIMS = lambda key: re.compile(key + r"=\{([\d,]*)\}")
_LHS_CONTRACT = _DIMS("lhs_contracting_dims")
_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")


@dataclasses.dataclass
class Count:
  """Matmul FLOPs and bytes moved by one program (per device), and its loops."""
  flops: float
  unknown_loops: int = 0        # while loops without a known trip count
  loops: int = 0                # while loops with a known trip count
  bytes: float = 0.0            # moved by instructions outside fusion bodies (`hlo_bytes`)

  def add(self, other: "Count", times: float = 1.0) -> None:
    self.flops += times * other.flops
    self.bytes += times * other.bytes
    self.unknown_loops += other.unknown_loops
    self.loops += other.loops

def _operand(text: str, shapes: dict) -> tuple[int, ...] | None:
  """An operand's dims: its inline shape if printed ('f32[8,32]{1,0} %x'), else by name."""
  inline = dims(text)
  if inline is not None:
    return inline
  names = NAME.findall(text)
  return shapes.get(names[-1]) if names else None


def _instr_flops(ins: Instr, shapes: dict) -> float:
  if ins.shape is None or not ins.operands:
    return 0.0
  out = math.prod(ins.shape)
  if ins.op == "dot":
    lhs = _operand(ins.operands[0], shapes)
    m = _LHS_CONTRACT.search(ins.attrs)
    if lhs is None or m is None:
      return 0.0
    contract = [int(d) for d in m.group(1).split(",") if d]
    return 2.0 * out * math.prod(lhs[d] for d in contract)
  if ins.op == "convolution" and len(ins.operands) >= 2:
    return _conv_flops(ins, _operand(ins.operands[0], shapes), _operand(ins.operands[1], shapes))
  return 0.0


def _window(attrs: str) -> dict[str, list]:
  m = re.search(r"window=\{([^}]*)\}", attrs)
  out = {}
  for item in (m.group(1).split() if m else []):
    key, _, value = item.partition("=")
    out[key] = value.split("x")
  return out


def _valid_taps(n_in: int, n_out: int, size: int, stride: int, pad_lo: int, lhs_dil: int,
                rhs_dil: int) -> int:
  """(output position, window tap) pairs of one spatial dim that read a real input
  element (not padding, not a hole of the lhs dilation)."""
  o = np.arange(n_out)[:, None]
  k = np.arange(size)[None, :]
  p = o * stride + k * rhs_dil - pad_lo
  ok = (p >= 0) & (p <= (n_in - 1) * lhs_dil) & (p % lhs_dil == 0)
  return int(ok.sum())


def _conv_flops(ins: Instr, lhs, kernel) -> float:
  """2 x output batch x output features x kernel input features x the valid taps of
  every spatial dim. The TPU compiler writes a dot as a convolution and its batch dims
  as spatial dims with lhs dilation (`window={size=16x2 stride=15x1 lhs_dilate=16x2}`),
  so the taps are counted, not the window sizes (XLA's cost analysis does the same)."""
  labels = _LABELS.search(ins.attrs)
  if lhs is None or kernel is None or labels is None:
    return 0.0
  lhs_l, ker_l, out_l = labels.groups()
  out_dims = dict(zip(out_l, ins.shape))
  ker_dims = dict(zip(ker_l, kernel))
  lhs_dims = dict(zip(lhs_l, lhs))
  w = _window(ins.attrs)
  spatial = sorted(c for c in out_l if c.isdigit())
  taps = 1
  for i, c in enumerate(spatial):
    get = lambda key, default: int(w[key][i]) if key in w and i < len(w[key]) else default
    pad_lo = int(w["pad"][i].split("_")[0]) if "pad" in w and i < len(w["pad"]) else 0
    taps *= _valid_taps(lhs_dims[c], out_dims[c], get("size", 1), get("stride", 1), pad_lo,
                        get("lhs_dilate", 1), get("rhs_dilate", 1))
  return 2.0 * out_dims["b"] * out_dims["f"] * ker_dims["i"] * taps


def matmul_flops(text: str, unknown_trips: float | None = None) -> Count:
  """Matmul FLOPs and bytes moved (`hlo_bytes`, instructions outside fusion bodies) of the
  HLO module `text` (module docstring); a while loop without a known trip count runs
  `unknown_trips` times (once if None)."""
  comps, entry = parse(text)
  memo: dict[tuple[str, bool], Count] = {}

  def visit(name: str, top: bool) -> Count:
    if (name, top) in memo:
      return memo[(name, top)]
    memo[(name, top)] = Count(0.0)  # recursion guard (HLO has none, but be safe)
    instrs = comps.get(name, [])
    shapes = {i.name: i.shape for i in instrs if i.shape is not None}
    types = {i.name: i.type_text for i in instrs}
    table = by_name(instrs)
    total = Count(0.0)
    for ins in instrs:
      total.flops += _instr_flops(ins, shapes)
      if top:
        total.bytes += hlo_bytes.instr_bytes(ins, types, comps)
      if ins.op == "while":
        body = re.search(r"body=%([\w.\-]+)", ins.attrs)
        trips, is_known = hlo_trips.while_trips(comps, table, ins, unknown_trips)
        total.loops += is_known
        total.unknown_loops += not is_known
        if body:
          total.add(visit(body.group(1), top), trips)
      elif ins.op == "conditional":  # one branch runs: the most expensive
        branches = [visit(c, top) for c in called(ins)]
        if branches:
          total.add(max(branches, key=lambda c: (c.flops, c.bytes)))
      else:  # fusion bodies and scalar reducers: work, but their data moves with `ins`
        for c in called(ins):
          total.add(visit(c, top and ins.op in ("call", "async-start")))
    memo[(name, top)] = total
    return total

  return visit(entry, True)


def compiled_matmul_flops(compiled, unknown_trips: float | None = None) -> Count:
  """`matmul_flops` of a `jax.stages.Compiled` (per device: the partitioned module)."""
  return matmul_flops(compiled.as_text(), unknown_trips)
