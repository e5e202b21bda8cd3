"""What a compiled XLA:CPU program does, for bench/phases.py: the optimized HLO summarised
per loop, and one run's per-op time from the profiler, grouped by kind of op.

  hlo_loops(text, ...)      per computation the program runs (entry, each loop body with
                            its trips): dots, transposes, copies, fusions, MB moved
                            (`dtm.aot.hlo_bytes`), attention-score buffers written
  op_seconds(fn, text)      one call of fn under `jax.profiler.trace`: the seconds of every
                            thunk (an HLO instruction of `text`) from the trace's
                            trace.json.gz, summed per kind (dot, zero-init broadcast,
                            stacked-residual write, copy/transpose, reduce, elementwise)
                            and per instruction
An instruction's seconds run from its thunk's start to its "end: " event (Eigen dots run
asynchronously: their start event is only the launch). XLA runs independent thunks side
by side on its two threads, so the seconds of all instructions add up to more than the
wall time when they overlap, and to less where the executor waits.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import tempfile

import jax

from bench import common
from dtm.aot import hlo_bytes, hlo_text, hlo_trips


def _instructions(text: str) -> dict[str, tuple[str, str, list[str], str]]:
  """{name: (op, type text, ops inside its fusion, attrs)} of every instruction."""
  comps, _ = hlo_text.parse(text)
  out = {}
  for instrs in comps.values():
    for ins in instrs:
      inner = [x.op for c in hlo_text.called(ins) if ins.op == "fusion" for x in comps[c]]
      out[ins.name] = (ins.op, ins.type_text.split("{")[0], inner, ins.attrs)
  return out


def hlo_loops(text: str, scores_shape: tuple[int, int, int, int]) -> list[dict]:
  """Per computation the program runs (entry, loop bodies with their trip counts, nested
  trips multiplied): dots, transposes and copies (materialised or inside fusions),
  fusions, MB moved per run, and writes of float32 attention scores (B, Hq, T, S
  elements, [.., T, S] last; plain or into a stacked [L, ...] residual)."""
  comps, entry = hlo_text.parse(text)
  table = {i.name: i for c in comps.values() for i in c}
  b, h, t, s = scores_shape
  out = []

  def is_scores(ins, inner) -> bool:
    if not ins.shape or not ins.type_text.startswith("f32") or ins.shape[-1] != s:
      return False
    n = math.prod(ins.shape)
    if "dynamic-update-slice" in inner or ins.op == "dynamic-update-slice":
      n //= ins.shape[0]
    return n == b * h * t * s

  def visit(name: str, trips: float, label: str) -> None:
    types = {i.name: i.type_text for i in comps[name]}
    row = {"where": label, "trips": trips, "dots": 0, "transposes": 0, "copies": 0,
           "fusions": 0, "MB": 0.0, "scores": 0}
    for ins in comps[name]:
      inner = [x.op for c in hlo_text.called(ins) if ins.op == "fusion" for x in comps[c]]
      ops = [ins.op] + inner
      row["dots"] += ops.count("dot")
      row["transposes"] += ops.count("transpose")
      row["copies"] += ops.count("copy")
      row["fusions"] += ins.op == "fusion"
      row["MB"] += hlo_bytes.instr_bytes(ins, types, comps) / 1e6
      row["scores"] += ins.op != "while" and is_scores(ins, inner)
      if ins.op == "while":
        n, _ = hlo_trips.while_trips(comps, table, ins)
        for c in hlo_text.called(ins):
          visit(c, trips * n, f"loop {ins.name} (x{n:g})")
      elif ins.op in ("call", "conditional"):
        for c in hlo_text.called(ins):
          visit(c, trips, f"{ins.op} {ins.name} in {label}")
    out.append(row)

  visit(entry, 1.0, "entry (outside loops)")
  return out


def print_hlo(title: str, text: str, scores_shape: tuple[int, int, int, int]) -> None:
  rows = [(r["where"], f"{r['trips']:g}", r["dots"], r["transposes"], r["copies"], r["fusions"],
           f"{r['MB']:.0f}", r["scores"]) for r in hlo_loops(text, scores_shape)]
  b, h, t, s = scores_shape
  print(f"\nHLO of {title} ({len(text) // 1000} kB of text), per run of each computation:")
  print(common.table(rows, ("computation", "runs", "dots", "transposes", "copies", "fusions",
                            "MB moved", f"f32 [{b},{h},{t},{s}] score writes")))


def _kind(op: str, inner: list[str]) -> str:
  ops = set(inner) | {op}
  if "dot" in ops:
    return "dot (matmul)"
  if ops <= {"broadcast", "constant", "parameter", "bitcast", "fusion"} and "broadcast" in ops:
    return "broadcast (zero-init of scan stacks)"
  if "dynamic-update-slice" in ops:
    return "dynamic-update-slice (stacked residuals)"
  if ops & {"copy", "transpose"}:
    return "copy / transpose"
  if "reduce" in ops:
    return "reduce fusion"
  return "elementwise / other"


def _dot_form(attrs: str) -> str:
  """'NN' when the lhs contracts its last dim and the rhs its first (row-major GEMM);
  'NT' / 'TN' / 'TT' otherwise (the operand that contracts the other dim)."""
  lhs = "N" if "lhs_contracting_dims={1}" in attrs or "lhs_contracting_dims={3}" in attrs else "T"
  rhs = "N" if "rhs_contracting_dims={0}" in attrs else "T"
  return lhs + rhs


def op_seconds(fn, text: str, top: int = 12) -> tuple[dict[str, float], list[tuple]]:
  """Profile one call of fn (a blocking callable running the program of `text`) ->
  ({kind: thunk seconds}, [(instruction, calls, seconds, shape, kind or dot form)] of
  the `top` slowest instructions)."""
  info = _instructions(text)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      fn()
    files = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(files[0]))["traceEvents"] if files else []
  starts, ends = collections.defaultdict(list), collections.defaultdict(list)
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X":
      continue
    if name in info and info[name][0] != "while":
      starts[name].append(e["ts"])
    elif name.startswith("end: ") and name[5:] in info:
      ends[name[5:]].append(e["ts"])
  per, calls = collections.defaultdict(float), collections.Counter()
  for name, ts in starts.items():  # an instruction's runs do not overlap: pair in order
    for t0, t1 in zip(sorted(ts), sorted(ends.get(name, []))):
      per[name] += (t1 - t0) / 1e6
      calls[name] += 1
  kinds = collections.defaultdict(float)
  for name, sec in per.items():
    kinds[_kind(info[name][0], info[name][2])] += sec
  rows = []
  for name, sec in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
    op, shape, inner, attrs = info[name]
    kind = _kind(op, inner)
    if kind.startswith("dot"):
      dot_attrs = attrs if op == "dot" else _fused_dot_attrs(text, name)
      kind = f"dot {_dot_form(dot_attrs)}"
    rows.append((name, calls[name], sec, shape, kind))
  return dict(sorted(kinds.items(), key=lambda kv: -kv[1])), rows


def _fused_dot_attrs(text: str, fusion: str) -> str:
  comps, _ = hlo_text.parse(text)
  for instrs in comps.values():
    for ins in instrs:
      if ins.name == fusion:
        for c in hlo_text.called(ins):
          for x in comps[c]:
            if x.op == "dot":
              return x.attrs
  return ""


def print_op_seconds(title: str, fn, text: str, wall_hint: float | None = None) -> None:
  kinds, rows = op_seconds(fn, text)
  total = sum(kinds.values())
  print(f"\nprofile of one call of {title}: {total:.2f} s summed over instructions"
        + (f" (wall of a plain call: {wall_hint:.2f} s)" if wall_hint else ""))
  print(common.table([(k, f"{v:.3f}", f"{100 * v / total:.0f} %") for k, v in kinds.items()],
                     ("kind of op", "seconds", "share")))
  print(common.table([(n, c, f"{s:.3f}", f"{1e3 * s / c:.1f}", shape, kind)
                      for n, c, s, shape, kind in rows],
                     ("slowest instructions", "calls", "seconds", "ms/call", "shape", "kind")))
