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
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DIMS = lambda key: re.compile(key + r"=\{([\d,]*)\}")
_LHS_CONTRACT, _LHS_BATCH = _DIMS("lhs_contracting_dims"), _DIMS("lhs_batch_dims")
_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_CALLED = re.compile(r"(calls|to_apply|body|condition|true_computation|false_computation)"
                     r"=%([\w.\-]+)")
_CALLED_LISTS = re.compile(r"(branch_computations|called_computations)=\{([^}]*)\}")


@dataclasses.dataclass
class Instr:
  name: str
  shape: tuple[int, ...] | None   # None for tuples and tokens
  op: str
  operands: list[str]
  attrs: str
  root: bool = False


@dataclasses.dataclass
class Count:
  """Matmul FLOPs of one program (per device) and the loops whose trips were assumed."""
  flops: float
  unknown_loops: int = 0        # while loops without a known trip count
  loops: int = 0                # while loops with a known trip count


def _split_top(text: str) -> list[str]:
  """Split on commas outside (), [], {}."""
  out, depth, cur = [], 0, []
  for ch in text:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  if cur:
    out.append("".join(cur))
  return [s.strip() for s in out if s.strip()]


def _close(text: str, start: int) -> int:
  """Index just past the bracket that closes text[start] (an opening bracket)."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _dims(shape_text: str) -> tuple[int, ...] | None:
  m = _SHAPE.match(shape_text.strip())
  if not m:
    return None
  return tuple(int(d) for d in m.group(1).split(",") if d)


def _parse_instr(line: str) -> Instr | None:
  """'[ROOT] %name = TYPE op(OPERANDS), attrs' -> Instr (None for other lines)."""
  line = line.strip()
  root = line.startswith("ROOT ")
  if root:
    line = line[5:]
  head, eq, rest = line.partition(" = ")
  if not eq or not head.startswith("%"):
    return None
  if rest.startswith("("):  # a tuple type
    end = _close(rest, 0)
    type_text, rest = rest[:end], rest[end:].lstrip()
  else:
    type_text, _, rest = rest.partition(" ")
  paren = rest.find("(")
  if paren < 0:
    return None
  op = rest[:paren]
  end = _close(rest, paren)
  return Instr(head[1:], None if type_text.startswith("(") else _dims(type_text), op,
               _split_top(rest[paren + 1:end - 1]), rest[end:], root)


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
  """{computation name: instructions} and the entry computation's name."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    stripped = line.strip()
    if current is None:
      m = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->.*\{$", stripped)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if stripped == "}":
      current = None
      continue
    instr = _parse_instr(stripped)
    if instr is not None:
      comps[current].append(instr)
  return comps, entry


def _operand(text: str, shapes: dict) -> tuple[int, ...] | None:
  """An operand's dims: its inline shape if printed ('f32[8,32]{1,0} %x'), else by name."""
  inline = _dims(text)
  if inline is not None:
    return inline
  names = _NAME.findall(text)
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


def _called(ins: Instr) -> list[str]:
  names = [m.group(2) for m in _CALLED.finditer(ins.attrs)
           if m.group(1) not in ("condition",)]
  for m in _CALLED_LISTS.finditer(ins.attrs):
    names += _NAME.findall(m.group(2))
  return names


# ------------------------------------------------------------ trip counts without annotation
# XLA:CPU annotates `known_trip_count`; the TPU compiler's optimized module does not, so the
# count is read from the loop itself: init `i = a` (the while operand's tuple), condition
# `i < b` (or <=, >, >=, either side), step `i + s` (the body's root tuple), all constants.

_PASS = ("copy", "bitcast", "convert", "copy-done")
_INDEX = re.compile(r"index=(\d+)")
_DIRECTION = re.compile(r"direction=(\w+)")


def _by_name(instrs: list[Instr]) -> dict[str, Instr]:
  return {i.name: i for i in instrs}


def _ref(text: str) -> str | None:
  names = _NAME.findall(text)
  return names[-1] if names else None


def _trace(table: dict[str, Instr], name: str | None) -> Instr | None:
  """The instruction behind `name`, through copies, bitcasts and converts."""
  for _ in range(32):
    ins = table.get(name) if name else None
    if ins is None or ins.op not in _PASS or not ins.operands:
      return ins
    name = _ref(ins.operands[0])
  return None


def _const(ins: Instr | None) -> int | None:
  if ins is None or ins.op != "constant" or not ins.operands:
    return None
  try:
    return int(ins.operands[0])
  except ValueError:
    return None


def _tuple_index(ins: Instr | None) -> int | None:
  """k if `ins` is get-tuple-element(parameter(0), index=k)."""
  if ins is None or ins.op != "get-tuple-element":
    return None
  m = _INDEX.search(ins.attrs)
  return int(m.group(1)) if m else None


def _unfuse(comps: dict, table: dict[str, Instr], ins: Instr | None):
  """A fusion wrapping one scalar op -> (the op, a resolver of its operands to the
  fusion's operands in the caller); anything else -> (ins, identity)."""
  if ins is None or ins.op != "fusion":
    return ins, lambda text: _trace(table, _ref(text))
  called = _called(ins)
  inner = comps.get(called[0], []) if called else []
  root = next((i for i in inner if i.root), None)
  inner_table = _by_name(inner)

  def resolve(text):
    p = _trace(inner_table, _ref(text))
    if p is not None and p.op == "parameter":
      k = int(p.operands[0])
      return _trace(table, _ref(ins.operands[k])) if k < len(ins.operands) else None
    return p
  return root, resolve


def _infer_trips(comps: dict, caller: dict[str, Instr], loop: Instr) -> int | None:
  cond_m = re.search(r"condition=%([\w.\-]+)", loop.attrs)
  body_m = re.search(r"body=%([\w.\-]+)", loop.attrs)
  if not cond_m or not body_m or not loop.operands:
    return None
  cond = comps.get(cond_m.group(1), [])
  ctable = _by_name(cond)
  cmp, resolve = _unfuse(comps, ctable, next((i for i in cond if i.root), None))
  if cmp is None or cmp.op != "compare" or len(cmp.operands) != 2:
    return None
  lhs, rhs = (resolve(o) for o in cmp.operands)
  direction = _DIRECTION.search(cmp.attrs)
  direction = direction.group(1) if direction else ""
  k, bound = _tuple_index(lhs), _const(rhs)
  if k is None:  # bound < i  ==  i > bound
    k, bound = _tuple_index(rhs), _const(lhs)
    direction = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}.get(direction, "")
  init_tuple = _trace(caller, _ref(loop.operands[0]))
  if k is None or bound is None or init_tuple is None or init_tuple.op != "tuple":
    return None
  init = _const(_trace(caller, _ref(init_tuple.operands[k]))) if k < len(init_tuple.operands) else None
  body = comps.get(body_m.group(1), [])
  btable = _by_name(body)
  out = next((i for i in body if i.root), None)
  if init is None or out is None or out.op != "tuple" or k >= len(out.operands):
    return None
  add, resolve = _unfuse(comps, btable, _trace(btable, _ref(out.operands[k])))
  if add is None or add.op != "add" or len(add.operands) != 2:
    return None
  a, b = (resolve(o) for o in add.operands)
  step = _const(b) if _tuple_index(a) == k else _const(a) if _tuple_index(b) == k else None
  if not step:
    return None
  span = {"LT": bound - init, "LE": bound - init + 1,
          "GT": init - bound, "GE": init - bound + 1}.get(direction)
  if span is None or (step > 0) != (direction in ("LT", "LE")):
    return None
  return max(0, -(-span // abs(step)))


def matmul_flops(text: str, unknown_trips: float | None = None) -> Count:
  """Matmul FLOPs of the HLO module `text` (module docstring); a while loop without a
  known trip count runs `unknown_trips` times (once if None)."""
  comps, entry = parse(text)
  memo: dict[str, tuple[float, int, int]] = {}

  def visit(name: str) -> tuple[float, int, int]:
    if name in memo:
      return memo[name]
    memo[name] = (0.0, 0, 0)  # recursion guard (HLO has none, but be safe)
    instrs = comps.get(name, [])
    shapes = {i.name: i.shape for i in instrs if i.shape is not None}
    table = _by_name(instrs)
    flops, unknown, known = 0.0, 0, 0
    for ins in instrs:
      flops += _instr_flops(ins, shapes)
      if ins.op == "while":
        body = re.search(r"body=%([\w.\-]+)", ins.attrs)
        trips_m = _TRIPS.search(ins.attrs)
        inferred = None if trips_m else _infer_trips(comps, table, ins)
        if trips_m or inferred is not None:
          trips = float(trips_m.group(1) if trips_m else inferred)
          known += 1
        else:
          trips, unknown = (1.0 if unknown_trips is None else float(unknown_trips)), unknown + 1
        if body:
          f, u, k = visit(body.group(1))
          flops, unknown, known = flops + trips * f, unknown + u, known + k
      elif ins.op == "conditional":
        branches = [visit(c) for c in _called(ins)]
        if branches:
          f, u, k = max(branches)
          flops, unknown, known = flops + f, unknown + u, known + k
      else:
        for c in _called(ins):
          f, u, k = visit(c)
          flops, unknown, known = flops + f, unknown + u, known + k
    memo[name] = (flops, unknown, known)
    return memo[name]

  flops, unknown, known = visit(entry)
  return Count(flops, unknown, known)


def compiled_matmul_flops(compiled, unknown_trips: float | None = None) -> Count:
  """`matmul_flops` of a `jax.stages.Compiled` (per device: the partitioned module)."""
  return matmul_flops(compiled.as_text(), unknown_trips)
