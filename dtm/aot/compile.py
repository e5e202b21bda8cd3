"""Compile a job's functions ahead of time and report what they cost per device.

A `Fn` is one jitted function the job runs, with abstract arguments (ShapeDtypeStructs
carrying the job's real shardings), how often the job calls it and its useful FLOPs per
call (MaxText's counting: the matmuls the algorithm needs). `compile_all` lowers and
compiles each against the target's devices and returns one `Row` each: bytes per device
(`memory_analysis`), FLOPs per device (`cost_analysis`), fit against the chip's HBM, and
the estimated wall time calls x useful FLOPs / (devices x peak x MFU).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable

from dtm.errors import DtmError

GIB = 1024 ** 3


@dataclasses.dataclass
class Fn:
  """One jitted function of a job: `fn.lower(*args)` must work (static args bound)."""
  name: str
  fn: Callable
  args: tuple
  calls: int
  useful_flops: float = 0.0    # per call, all devices together (0 = not counted)
  note: str = ""


@dataclasses.dataclass
class Row:
  name: str
  calls: int
  argument_bytes: int = 0
  temp_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  hbm_bytes: int = 0
  flops: float = 0.0           # per call, per device (the compiler's count)
  useful_flops: float = 0.0    # per call, all devices
  num_devices: int = 1
  seconds: float = 0.0         # estimated, all calls
  compile_seconds: float = 0.0
  error: str = ""
  note: str = ""

  @property
  def peak_bytes(self) -> int:
    """Bytes live on one device while the function runs (donated inputs counted once)."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  @property
  def fits(self) -> bool:
    return not self.error and self.peak_bytes <= self.hbm_bytes

  @property
  def waste(self) -> float | None:
    """Compiled / useful FLOPs (all devices): > 1 is work the algorithm does not need."""
    if not self.useful_flops or not self.flops:
      return None
    return self.flops * self.num_devices / self.useful_flops

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(peak_bytes=self.peak_bytes, fits=self.fits, compiled_over_useful=self.waste)
    return d


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def compile_one(f: Fn, hbm_bytes: int, peak_flops: float, mfu: float, num_devices: int) -> Row:
  row = Row(f.name, f.calls, hbm_bytes=hbm_bytes, useful_flops=f.useful_flops,
            num_devices=num_devices, note=f.note)
  t = time.perf_counter()
  try:
    compiled = f.fn.lower(*f.args).compile()
  except Exception as e:  # XLA's RESOURCE_EXHAUSTED etc.: reported, not raised
    text = " ".join(str(e).split())
    row.error = text[:400]
    row.compile_seconds = time.perf_counter() - t
    return row
  row.compile_seconds = time.perf_counter() - t
  mem = compiled.memory_analysis()
  if mem is not None:
    row.argument_bytes = int(mem.argument_size_in_bytes)
    row.temp_bytes = int(mem.temp_size_in_bytes)
    row.output_bytes = int(mem.output_size_in_bytes)
    row.alias_bytes = int(mem.alias_size_in_bytes)
  row.flops = _cost_flops(compiled)
  if peak_flops > 0 and mfu > 0:
    row.seconds = f.calls * estimate_seconds(row.useful_flops, row.flops, num_devices,
                                             peak_flops, mfu)
  return row


def estimate_seconds(useful: float, compiled: float, num_devices: int, peak: float,
                     mfu: float) -> float:
  """Seconds of one call: useful FLOPs over (devices x peak x MFU), MFU's own definition.
  XLA's cost analysis counts a while-loop body once (the layer scan, the decode loop, the
  probe's layer loop), so compiled FLOPs under-count looped work and only stand in when
  no useful count is known."""
  if useful:
    return useful / (num_devices * peak * mfu)
  return compiled / (peak * mfu)


def compile_all(fns: list[Fn], target, mfu: float, progress: bool = True) -> list[Row]:
  rows = []
  for f in fns:
    if progress:
      print(f"  compiling {f.name} for {target.name} ...", flush=True)
    rows.append(compile_one(f, target.hbm_bytes, target.peak_flops, mfu, target.num_devices))
  return rows


def _gib(b: float) -> str:
  return f"{b / GIB:.2f}"


def _flops(x: float) -> str:
  return "-" if not x else f"{x:.3g}"


def _hours(s: float) -> str:
  return f"{s / 3600:.3g} h" if s >= 360 else f"{s:.3g} s"


def table(rows: list[Row], target, mfu: float) -> str:
  head = (f"{'function':<34} {'arg GiB':>8} {'temp GiB':>8} {'out GiB':>8} {'peak GiB':>8} "
          f"{'HBM GiB':>8} {'fits':>4} {'FLOPs/call':>10} {'comp/use':>8} {'calls':>8} "
          f"{'est. time':>10}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if r.error:
      lines.append(f"{r.name:<34} does not compile: {r.error[:160]}")
      continue
    waste = "-" if r.waste is None else f"{r.waste:.2f}"
    lines.append(f"{r.name:<34} {_gib(r.argument_bytes):>8} {_gib(r.temp_bytes):>8} "
                 f"{_gib(r.output_bytes):>8} {_gib(r.peak_bytes):>8} {_gib(r.hbm_bytes):>8} "
                 f"{'yes' if r.fits else 'NO':>4} {_flops(r.flops):>10} {waste:>8} "
                 f"{r.calls:>8} {_hours(r.seconds):>10}")
  total_flops = sum(r.flops * r.calls * r.num_devices for r in rows)
  total_s = sum(r.seconds for r in rows)
  peak = max((r.peak_bytes for r in rows if not r.error), default=0)
  proxy = " (compiled for CPU devices as a proxy)" if target.proxy else ""
  lines.append(f"target {target.name}{proxy}: {target.num_devices} devices, peak "
               f"{target.peak_flops:.3g} FLOP/s per device ({target.peak_source}), HBM "
               f"{_gib(target.hbm_bytes)} GiB; MFU {mfu:g}")
  lines.append(f"total: {total_flops:.3g} FLOPs, peak {_gib(peak)} GiB per device, "
               f"estimated {_hours(total_s)}")
  return "\n".join(lines)


def summary(rows: list[Row], target, mfu: float, job: str) -> dict[str, Any]:
  return {
      "job": job, "target": target.name, "platform": target.platform,
      "num_devices": target.num_devices, "proxy": target.proxy,
      "peak_flops_per_device": target.peak_flops, "peak_source": target.peak_source,
      "hbm_bytes_per_device": target.hbm_bytes, "mfu": mfu,
      "total_flops": sum(r.flops * r.calls * r.num_devices for r in rows),
      "estimated_seconds": sum(r.seconds for r in rows),
      "peak_bytes_per_device": max((r.peak_bytes for r in rows if not r.error), default=0),
      "fits": all(r.fits for r in rows),
      "functions": [r.to_json() for r in rows],
  }


def check_fit(rows: list[Row]) -> None:
  """DtmError naming the first function that does not compile or does not fit."""
  for r in rows:
    if r.error:
      short = r.error
      if "RESOURCE_EXHAUSTED" in short or "exceeds" in short:
        raise DtmError(f"{r.name} does not fit: {short[:300]}")
      raise DtmError(f"{r.name} does not compile: {short[:300]}")
    if not r.fits:
      raise DtmError(f"{r.name} does not fit: needs {_gib(r.peak_bytes)} GiB per device, HBM "
                     f"{_gib(r.hbm_bytes)} GiB (short by {_gib(r.peak_bytes - r.hbm_bytes)} "
                     "GiB)")


def write_json(path: str, payload: dict) -> None:
  from dtm import io_utils
  io_utils.atomic_write_json(path, payload)


def ceil_div(a: int, b: int) -> int:
  return -(-int(a) // max(1, int(b)))


def log2(x: float) -> float:
  return math.log2(x) if x > 0 else 0.0
