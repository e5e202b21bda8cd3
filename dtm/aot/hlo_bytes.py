"""Bytes one top-level instruction of the optimized HLO moves through memory.

The memory term of the CPU time model (`compile.estimate_seconds`); `hlo_flops` sums it
over every instruction outside fusion bodies, loops counted through. An instruction reads
its operands and writes its result, except where XLA works in place or reads a part:

  dynamic-slice, gather         the slice read and written (2 x result)
  dynamic-update-slice          the update read and written (the buffer stays in place)
  fusion                        per operand: the slices its dynamic-slices / gathers read
                                when that is all the fusion does with it (one layer of
                                stacked [L, ...] params in a layer loop), nothing for the
                                buffer of an in-place dynamic-update-slice (a KV cache);
                                the result: the update of such a slice, else the result
  parameter, tuple, while, ...  nothing (no data moves)

(XLA's own HloCostAnalysis counts a whole KV cache per in-place update: 4x the bytes of a
decode step, measured on SmolLM2's reference generation.)
"""
from __future__ import annotations

import math
import re

from dtm.aot.hlo_text import Instr, NAME, called

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_ELEM = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
         "u4": 0.5, "s2": 0.25, "u2": 0.25}
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
         "conditional", "call", "after-all", "copy-start", "copy-done", "partition-id",
         "replica-id", "add-dependency", "opt-barrier", "domain", "iota"}
_SLICERS = ("dynamic-slice", "gather")


def type_bytes(type_text: str) -> float:
  """Bytes of a printed type: one array or a tuple of them ('(f32[2,3]{1,0}, s32[])')."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(type_text):
    size = _ELEM.get(dtype, 1 if dtype.startswith("f8") else 4)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _ref(text: str) -> str | None:
  names = NAME.findall(text)
  return names[-1] if names else None


def _operand_bytes(text: str, types: dict[str, str]) -> float:
  if not text.startswith("%"):  # an inline type before the name
    return type_bytes(text)
  return type_bytes(types.get(_ref(text) or "", ""))


def instr_bytes(ins: Instr, types: dict[str, str], comps: dict) -> float:
  """Bytes `ins` moves (module docstring); `types`: name -> type text in its computation."""
  if ins.op in _FREE:
    return 0.0
  if ins.op in _SLICERS:
    return 2.0 * type_bytes(ins.type_text)
  if ins.op == "dynamic-update-slice" and len(ins.operands) > 1:
    return 2.0 * _operand_bytes(ins.operands[1], types)
  if ins.op == "fusion":
    callees = called(ins)
    if callees and callees[0] in comps:
      return _fusion_bytes(ins, comps[callees[0]], types)
  return type_bytes(ins.type_text) + sum(_operand_bytes(o, types) for o in ins.operands)


def _fusion_bytes(ins: Instr, body: list[Instr], types: dict[str, str]) -> float:
  inner = {i.name: i.type_text for i in body}
  users: dict[str, list[Instr]] = {}
  for i in body:
    for o in i.operands:
      name = _ref(o)
      if name:
        users.setdefault(name, []).append(i)

  def through_bitcasts(name: str) -> list[Instr]:
    out = []
    for u in users.get(name, []):
      out += through_bitcasts(u.name) if u.op == "bitcast" else [u]
    return out

  params = {int(i.operands[0]): i for i in body if i.op == "parameter" and i.operands}
  total = 0.0
  for k, operand in enumerate(ins.operands):
    p = params.get(k)
    uses = through_bitcasts(p.name) if p is not None else []
    if uses and all(u.op in _SLICERS and _ref(u.operands[0]) in _aliases(p, users) for u in uses):
      total += sum(type_bytes(u.type_text) for u in uses)
    elif uses and all(u.op == "dynamic-update-slice" and _ref(u.operands[0]) in _aliases(p, users)
                      for u in uses):
      pass  # the buffer of an in-place update: only the update moves (counted below)
    else:
      total += _operand_bytes(operand, types)
  root = next((i for i in body if i.root), None)
  parts = [root] if root is not None and root.op != "tuple" else [
      next((i for i in body if i.name == _ref(o)), None) for o in (root.operands if root else [])]
  for part in parts:
    if part is not None and part.op == "dynamic-update-slice" and len(part.operands) > 1:
      total += type_bytes(inner.get(_ref(part.operands[1]) or "", ""))  # written in place
    elif part is not None:
      total += type_bytes(part.type_text)
  return total


def _aliases(p: Instr, users: dict[str, list[Instr]]) -> set[str]:
  """A fusion parameter's name and the bitcasts of it."""
  names, todo = set(), [p.name]
  while todo:
    n = todo.pop()
    names.add(n)
    todo += [u.name for u in users.get(n, []) if u.op == "bitcast"]
  return names
