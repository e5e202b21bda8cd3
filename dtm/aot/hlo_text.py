"""The optimized HLO module's text (`compiled.as_text()`), parsed into computations of
instructions: enough structure for counting work through loops (`hlo_flops`) and reading
loop trip counts (`hlo_trips`)."""
from __future__ import annotations

import dataclasses
import re

SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
NAME = re.compile(r"%([\w.\-]+)")
_CALLED = re.compile(r"(calls|to_apply|body|condition|true_computation|false_computation)"
                     r"=%([\w.\-]+)")
_CALLED_LISTS = re.compile(r"(branch_computations|called_computations)=\{([^}]*)\}")
_PASS = ("copy", "bitcast", "convert", "copy-done")  # `trace` looks through these


@dataclasses.dataclass
class Instr:
  name: str
  shape: tuple[int, ...] | None   # None for tuples and tokens
  op: str
  operands: list[str]
  attrs: str
  root: bool = False
  type_text: str = ""            # the result type as printed ('f32[8,32]{1,0}', tuples too)



def split_top(text: str) -> list[str]:
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


def close(text: str, start: int) -> int:
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


def dims(shape_text: str) -> tuple[int, ...] | None:
  m = SHAPE.match(shape_text.strip())
  if not m:
    return None
  return tuple(int(d) for d in m.group(1).split(",") if d)


def parse_instr(line: str) -> Instr | None:
  """'[ROOT] %name = TYPE op(OPERANDS), attrs' -> Instr (None for other lines)."""
  line = line.strip()
  root = line.startswith("ROOT ")
  if root:
    line = line[5:]
  head, eq, rest = line.partition(" = ")
  if not eq or not head.startswith("%"):
    return None
  if rest.startswith("("):  # a tuple type
    end = close(rest, 0)
    type_text, rest = rest[:end], rest[end:].lstrip()
  else:
    type_text, _, rest = rest.partition(" ")
  paren = rest.find("(")
  if paren < 0:
    return None
  op = rest[:paren]
  end = close(rest, paren)
  return Instr(head[1:], None if type_text.startswith("(") else dims(type_text), op,
               split_top(rest[paren + 1:end - 1]), rest[end:], root, type_text)


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
    instr = parse_instr(stripped)
    if instr is not None:
      comps[current].append(instr)
  return comps, entry

def called(ins: Instr) -> list[str]:
  names = [m.group(2) for m in _CALLED.finditer(ins.attrs)
           if m.group(1) not in ("condition",)]
  for m in _CALLED_LISTS.finditer(ins.attrs):
    names += NAME.findall(m.group(2))
  return names


def by_name(instrs: list[Instr]) -> dict[str, Instr]:
  return {i.name: i for i in instrs}


def ref(text: str) -> str | None:
  names = NAME.findall(text)
  return names[-1] if names else None


def trace(table: dict[str, Instr], name: str | None) -> Instr | None:
  """The instruction behind `name`, through copies, bitcasts and converts."""
  for _ in range(32):
    ins = table.get(name) if name else None
    if ins is None or ins.op not in _PASS or not ins.operands:
      return ins
    name = ref(ins.operands[0])
  return None


