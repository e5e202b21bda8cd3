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
import math
import os
import time
from typing import Any, Callable

from dtm.aot import hlo_flops
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
  loop_trips: float | None = None  # trips of loops whose count is known only at run time


@dataclasses.dataclass
class Row:
  name: str
  calls: int
  argument_bytes: int = 0
  temp_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  hbm_bytes: int = 0
  flops: float = 0.0           # per call, per device (XLA's cost_analysis: loop bodies once)
  matmul_flops: float = 0.0    # per call, per device: matmuls through loops (`hlo_flops`)
  bytes_accessed: float = 0.0  # per call, per device, loops through (`hlo_bytes`)
  unknown_loops: int = 0       # loops counted at Fn.loop_trips (or once, if not given)
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
    """Compiled / useful matmul FLOPs (all devices, loops counted through: `hlo_flops`):
    > 1 is matmul work the algorithm does not need (replicated or recomputed work)."""
    if not self.useful_flops or not self.matmul_flops:
      return None
    return self.matmul_flops * self.num_devices / self.useful_flops

  @property
  def total_matmul_flops(self) -> float:
    """Compiled matmul FLOPs of one call, all devices together."""
    return self.matmul_flops * self.num_devices

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(peak_bytes=self.peak_bytes, fits=self.fits, compiled_over_useful=self.waste)
    return d


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def _devices_used(compiled, default: int) -> int:
  """Devices the compiled program spans (its argument and result shardings)."""
  import jax
  leaves = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
  return max((len(s.device_set) for s in leaves if hasattr(s, "device_set")), default=default)


def compile_one(f: Fn, hbm_bytes: int, peak_flops: float, mfu: float, num_devices: int,
                bandwidth: float = 0.0) -> Row:
  """Compile `f`; `peak_flops` per device of `num_devices`. `bandwidth` > 0 (bytes/s of
  the host): the devices are one host's CPU cores, and the time is the CPU model of
  `estimate_seconds` (a program on k of the devices gets num_devices / k of the per-device
  peak and 1 / k of the bandwidth each)."""
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
  count = hlo_flops.compiled_matmul_flops(compiled, f.loop_trips)
  row.matmul_flops, row.unknown_loops = count.flops, count.unknown_loops
  row.num_devices = k = _devices_used(compiled, num_devices)
  row.bytes_accessed = count.bytes
  if peak_flops > 0 and mfu > 0:
    if bandwidth > 0:
      one = estimate_seconds(row.matmul_flops, peak_flops * num_devices / k, 1.0,
                             row.bytes_accessed, bandwidth / k)
    else:
      one = estimate_seconds(row.matmul_flops, peak_flops, mfu)
    row.seconds = f.calls * one
  return row


def estimate_seconds(matmul_flops: float, peak: float, mfu: float, bytes_accessed: float = 0.0,
                     bandwidth: float = 0.0) -> float:
  """Seconds of one call on one device: its compiled matmul FLOPs (`hlo_flops`: loops
  counted through, replicated and padded work included, as the device runs it) over its
  peak x MFU (a TPU / GPU: the data sheet's peak). On a CPU the peak is the same-run
  2048^3 matmul, a rate XLA reaches, not a data sheet's, so MFU is 1 and the other time
  is memory: plus the bytes moved (`hlo_bytes`, loops counted through) over the
  same-run streaming bandwidth. (Useful FLOPs / (devices x peak) would miss a program
  that runs on fewer devices than the target has, or repeats work on each.)"""
  seconds = matmul_flops / (peak * mfu)
  if bandwidth > 0:
    seconds += bytes_accessed / bandwidth
  return seconds


def compile_all(fns: list[Fn], target, mfu: float, progress: bool = True,
                workers: int | None = None) -> list[Row]:
  """`compile_one` of each Fn, `workers` at a time (default: the host's cores). XLA
  compiles one program on one thread and a job's programs are independent, so a 2-core
  host compiles the 13B probe's chunk, base pass and generation in the time of the chunk
  alone; rows keep the order of `fns`."""
  from concurrent.futures import ThreadPoolExecutor

  def one(f: Fn) -> Row:
    if progress:
      print(f"  compiling {f.name} for {target.name} ...", flush=True)
    row = compile_one(f, target.hbm_bytes, target.peak_flops, mfu, target.num_devices,
                      target.mem_bandwidth if target.platform == "cpu" else 0.0)
    if progress:
      print(f"  compiled {f.name} in {row.compile_seconds:.0f} s", flush=True)
    return row

  workers = max(1, min(len(fns), workers or os.cpu_count() or 1))
  with ThreadPoolExecutor(workers) as pool:
    return list(pool.map(one, fns))


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
    waste += "*" if r.unknown_loops and r.waste is not None else ""
    lines.append(f"{r.name:<34} {_gib(r.argument_bytes):>8} {_gib(r.temp_bytes):>8} "
                 f"{_gib(r.output_bytes):>8} {_gib(r.peak_bytes):>8} {_gib(r.hbm_bytes):>8} "
                 f"{'yes' if r.fits else 'NO':>4} {_flops(r.total_matmul_flops):>10} {waste:>8} "
                 f"{r.calls:>8} {_hours(r.seconds):>10}")
  total_flops = sum(r.total_matmul_flops * r.calls for r in rows)
  total_s = sum(r.seconds for r in rows)
  peak = max((r.peak_bytes for r in rows if not r.error), default=0)
  proxy = " (compiled for CPU devices as a proxy)" if target.proxy else ""
  lines.append(f"target {target.name}{proxy}: {target.num_devices} devices, peak "
               f"{target.peak_flops:.3g} FLOP/s per device ({target.peak_source}), HBM "
               f"{_gib(target.hbm_bytes)} GiB; {time_model(target, mfu)}")
  lines.append(f"total: {total_flops:.3g} FLOPs, peak {_gib(peak)} GiB per device, "
               f"estimated {_hours(total_s)}")
  lines.append("FLOPs/call: compiled matmul FLOPs, all devices, loops counted through; comp/use: "
               "over the useful FLOPs (> 1: replicated or recomputed work; * a loop of run-time "
               "length at its mean trips)")
  return "\n".join(lines)


def time_model(target, mfu: float) -> str:
  """How the estimated time was made (`estimate_seconds`)."""
  if target.platform == "cpu" and target.mem_bandwidth > 0:
    return (f"time: matmuls at the same-run peak (MFU 1) + bytes accessed at the same-run "
            f"{target.mem_bandwidth / 1e9:.1f} GB/s")
  return f"time at MFU {mfu:g}"


def summary(rows: list[Row], target, mfu: float, job: str) -> dict[str, Any]:
  return {
      "job": job, "target": target.name, "platform": target.platform,
      "num_devices": target.num_devices, "proxy": target.proxy,
      "peak_flops_per_device": target.peak_flops, "peak_source": target.peak_source,
      "hbm_bytes_per_device": target.hbm_bytes, "mfu": mfu,
      "mem_bandwidth": target.mem_bandwidth, "time_model": time_model(target, mfu),
      "total_flops": sum(r.total_matmul_flops * r.calls for r in rows),
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
