"""The estimate a real run prints before its first long phase (`dtm.cli.run_job`).

The job's own functions (`dry_run.job_plan`: the same jitted functions with the same
shardings) are compiled for the devices this process has (`dry_run.local_target`), and one
line gives the matmul FLOPs, the largest per-device memory, and the estimated time
(`compile.estimate_seconds` per call x calls, plus the compile time just measured, which
the run pays again only where the persistent compilation cache misses). A function that
does not fit the device refuses the run here, before the weights are loaded. The rows go
to <workdir>/estimate.json (the dry run's payload, for `bench/estimate.py`).

  estimate: probe on cpu:2 (...): 2.6e+13 FLOPs in 3 functions, peak 0.69 GiB per
  device (probe chunk magnitude); ~3.1 min (compute 2.6 min, compile 31 s)
"""
from __future__ import annotations

import os
import re
import time

from dtm.aot import compile as aot_compile
from dtm.aot import dry_run
from dtm.errors import DtmError

NO_PLAN = "has no plan yet"


def estimate(config, workdir: str, mfu: float = 0.4, out=print) -> dict | None:
  """Compile the job's functions here, print the estimate line, write estimate.json, and
  raise DtmError if a function does not fit. Returns the payload (None: no plan for the
  job, said in one line)."""
  start = time.perf_counter()
  target = dry_run.local_target()
  missing = _unavailable(config.get("model"))
  if missing:  # the job names the missing model itself, in its own words
    out(f"estimate: none (the model is not here: {_short(missing)})")
    return None
  try:
    fns = dry_run.job_plan(config, target)  # validates the config first (DtmError)
  except DtmError as e:  # a config the job refuses: the job's own check says why
    out(f"estimate: none ({_short(e)})" if NO_PLAN in str(e)
        else f"estimate: none (the plan refused the config: {_short(e)})")
    return None
  except Exception as e:  # a plan that does not know this config: the job itself decides
    out(f"estimate: none (the plan failed: {type(e).__name__}: {_short(e)})")
    return None
  rows = aot_compile.compile_all(fns, target, mfu, progress=False)
  payload = aot_compile.summary(rows, target, mfu, config.job)
  compile_s = sum(r.compile_seconds for r in rows)
  payload.update(model=config.model, compile_seconds=compile_s,
                 preflight_seconds=time.perf_counter() - start)
  os.makedirs(workdir, exist_ok=True)
  aot_compile.write_json(os.path.join(workdir, "estimate.json"), payload)
  out(line(payload, rows))
  for r in rows:
    if r.error and not _exhausted(r.error):  # not a memory refusal: the job decides
      out(f"estimate: {r.name} did not compile here ({r.error[:160]})")
  aot_compile.check_fit([r for r in rows if not r.error or _exhausted(r.error)])
  return payload


def _unavailable(model: str | None) -> DtmError | None:
  """Why `model` cannot be loaded here (None: it can, or the job downloads it). Local
  names are resolved as the job resolves them; a hub id only when the hub is off (then
  resolving reads the local cache and downloads nothing)."""
  if not model:
    return None
  from dtm import loading
  hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not os.path.exists(model)
  if hub_id and os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
    return None
  try:
    loading.resolve_source(model)
  except DtmError as e:
    return e
  return None


def _exhausted(error: str) -> bool:
  return "RESOURCE_EXHAUSTED" in error or "exceeds" in error


def _short(e: BaseException) -> str:
  return " ".join(str(e).split())[:200]


def line(payload: dict, rows: list[aot_compile.Row]) -> str:
  ok = [r for r in rows if not r.error]
  big = max(ok, key=lambda r: r.peak_bytes, default=None)
  peak = f"{payload['peak_bytes_per_device'] / aot_compile.GIB:.2f} GiB per device" + (
      f" ({big.name})" if big else "")
  compute, compile_s = payload["estimated_seconds"], payload["compile_seconds"]
  return (f"estimate: {payload['job']} on {payload['target']}: {payload['total_flops']:.3g} "
          f"FLOPs in {len(rows)} functions, peak {peak}; ~{_time(compute + compile_s)} "
          f"(compute {_time(compute)}, compile {_time(compile_s)}; {payload['time_model']}) "
          f"[preflight {_time(payload['preflight_seconds'])}]")


def _time(s: float) -> str:
  if s >= 5400:
    return f"{s / 3600:.1f} h"
  if s >= 90:
    return f"{s / 60:.1f} min"
  return f"{s:.0f} s" if s >= 10 else f"{s:.2g} s"
