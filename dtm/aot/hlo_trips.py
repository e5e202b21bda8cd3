"""Trip counts of the optimized module's while loops.

XLA:CPU annotates `known_trip_count`; the TPU compiler's optimized module does not, so the
count is read from the loop itself: init `i = a` (the while operand's tuple), condition
`i < b` (or <=, >, >=, either side), step `i + s` (the body's root tuple), all constants.
A loop whose bound is only known at run time (a `fori_loop` over a traced layer) takes the
caller's `unknown_trips`.
"""
from __future__ import annotations

import re

from dtm.aot.hlo_text import Instr, by_name, called, ref, trace

_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_INDEX = re.compile(r"index=(\d+)")
_DIRECTION = re.compile(r"direction=(\w+)")


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
    return ins, lambda text: trace(table, ref(text))
  callees = called(ins)
  inner = comps.get(callees[0], []) if callees else []
  root = next((i for i in inner if i.root), None)
  inner_table = by_name(inner)

  def resolve(text):
    p = trace(inner_table, ref(text))
    if p is not None and p.op == "parameter":
      k = int(p.operands[0])
      return trace(table, ref(ins.operands[k])) if k < len(ins.operands) else None
    return p
  return root, resolve


def _infer_trips(comps: dict, caller: dict[str, Instr], loop: Instr) -> int | None:
  cond_m = re.search(r"condition=%([\w.\-]+)", loop.attrs)
  body_m = re.search(r"body=%([\w.\-]+)", loop.attrs)
  if not cond_m or not body_m or not loop.operands:
    return None
  cond = comps.get(cond_m.group(1), [])
  ctable = by_name(cond)
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
  init_tuple = trace(caller, ref(loop.operands[0]))
  if k is None or bound is None or init_tuple is None or init_tuple.op != "tuple":
    return None
  init = _const(trace(caller, ref(init_tuple.operands[k]))) if k < len(init_tuple.operands) else None
  body = comps.get(body_m.group(1), [])
  btable = by_name(body)
  out = next((i for i in body if i.root), None)
  if init is None or out is None or out.op != "tuple" or k >= len(out.operands):
    return None
  add, resolve = _unfuse(comps, btable, trace(btable, ref(out.operands[k])))
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


def while_trips(comps: dict, table: dict[str, Instr], loop: Instr,
                unknown_trips: float | None = None) -> tuple[float, bool]:
  """(trips, known) of a while instruction: XLA's annotation, else inferred from the
  loop (`_infer_trips`), else `unknown_trips` (1 if None) and known=False."""
  m = _TRIPS.search(loop.attrs)
  inferred = None if m else _infer_trips(comps, table, loop)
  if m or inferred is not None:
    return float(m.group(1) if m else inferred), True
  return (1.0 if unknown_trips is None else float(unknown_trips)), False


