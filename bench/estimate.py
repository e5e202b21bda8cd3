"""The launch estimate against measured wall time, on this CPU: the quick-start probe,
10 train steps and one prune round (SmolLM2), one run each.

  .venv/bin/python bench/estimate.py [--only probe,train,prune] [--keep DIR]

Each job runs as a user runs it (`main.py`, a fresh workdir and a fresh persistent
compilation cache, so this is a first launch: every compile is paid once, in the
preflight, and hit by the job). The preflight (`dtm.aot.preflight`) prints the estimate
and writes <workdir>/estimate.json; the estimate is its compile time (measured while it
compiles the job's functions) plus calls x compiled matmul FLOPs per device over the
same-run peak (`targets.measure_cpu_peak`, a 2048^3 float32 matmul, divided among the
devices a function spans) x the MFU. Prints the CPU, the peak, per job the estimated
compute / compile / total seconds, the measured wall time of the whole command and the
ratio measured / estimated, then the estimate per function. Timings are only
meaningful on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
from bench import common  # noqa: E402

JOBS = {
    "probe": ("quick-start probe (configs/probe.py:quick)", ["--config=configs/probe.py:quick"]),
    "train": ("10 train steps (configs/train.py)", ["--config=configs/train.py",
                                                    "--config.train.steps=10"]),
    "prune": ("one prune round (configs/prune.py)", ["--config=configs/prune.py",
                                                     "--config.prune.max_rounds=1"]),
}


def run_job(name: str, root: str, mfu: float) -> dict:
  """Run one job in a fresh workdir and cache; its estimate.json plus the wall time."""
  _, args = JOBS[name]
  workdir = os.path.join(root, name)
  env = {**os.environ, "DTM_JAX_CACHE": os.path.join(root, f"jax-cache-{name}"),
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
  cmd = [sys.executable, "main.py", *args, f"--workdir={workdir}", f"--mfu={mfu}"]
  print("+", " ".join(cmd), flush=True)
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, "job.log"), "w") as f:
    f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
  if proc.returncode:
    sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  line = next((l for l in proc.stdout.splitlines() if l.startswith("estimate:")), "")
  print(f"  {line}", flush=True)
  with open(os.path.join(workdir, "estimate.json")) as f:
    est = json.load(f)
  peak, bandwidth = _calibrate()
  return {"name": name, "wall": wall, "estimate": est, "after": recompute(est, peak, bandwidth),
          "peak_after": peak, "bandwidth_after": bandwidth}


def _calibrate() -> tuple[float, float]:
  """The CPU model's two rates (`targets.measure_cpu_peak` / `measure_cpu_bandwidth`),
  measured again right after the job: under a load that changes during the run, the
  preflight's calibration is the term that moves."""
  from dtm import cli
  from dtm.aot import targets
  cli._quiet_libtpu()  # the CPU backend, without libtpu's start-up noise (as main.py)
  return targets.measure_cpu_peak(), targets.measure_cpu_bandwidth()


def recompute(est: dict, peak: float, bandwidth: float) -> float:
  """The estimate's compute seconds with other rates: per function calls x (matmul FLOPs
  / (peak / k) + bytes / (bandwidth / k)), k devices it spans (`compile.estimate_seconds`)."""
  total = 0.0
  for f in est["functions"]:
    k = max(1, int(f["num_devices"]))
    total += f["calls"] * (f["matmul_flops"] * k / peak + f["bytes_accessed"] * k / bandwidth)
  return total


def report(results: list[dict]) -> str:
  rows = []
  for r in results:
    e = r["estimate"]
    total = e["estimated_seconds"] + e["compile_seconds"]
    again = r["after"] + e["compile_seconds"]
    rows.append((JOBS[r["name"]][0], f"{e['estimated_seconds']:.1f}", f"{e['compile_seconds']:.1f}",
                 f"{total:.1f}", f"{r['wall']:.1f}", f"{r['wall'] / total:.2f}",
                 f"{again:.1f}", f"{r['wall'] / again:.2f}"))
  text = common.table(rows, ("job", "est. compute s", "est. compile s", "estimate s",
                             "measured s", "measured/est.", "est. (rates after)",
                             "measured/est. (after)"))
  text += "\n\nrates: " + "; ".join(
      f"{r['name']}: preflight {r['estimate']['peak_flops_per_device'] * r['estimate']['num_devices'] / 1e9:.0f} "
      f"GFLOP/s, {r['estimate']['mem_bandwidth'] / 1e9:.1f} GB/s; after {r['peak_after'] / 1e9:.0f} "
      f"GFLOP/s, {r['bandwidth_after'] / 1e9:.1f} GB/s" for r in results)
  lines = [text, "", "per function (estimate.json):"]
  for r in results:
    for f in r["estimate"]["functions"]:
      lines.append(f"  {r['name']:<6} {f['name']:<34} calls {f['calls']:>5}  devices "
                   f"{f['num_devices']}  {f['matmul_flops'] * f['num_devices']:.3g} FLOPs/call  "
                   f"comp/use {f['compiled_over_useful'] or 0:.2f}  est {f['seconds']:.1f} s  "
                   f"compile {f['compile_seconds']:.1f} s")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default="probe,train,prune", help="comma list of probe,train,prune")
  p.add_argument("--keep", default="", help="directory for the workdirs (default: temporary)")
  p.add_argument("--mfu", type=float, default=0.4, help="MFU the estimate assumes (main.py --mfu)")
  args = p.parse_args(argv)
  names = [n.strip() for n in args.only.split(",") if n.strip()]
  unknown = [n for n in names if n not in JOBS]
  if unknown:
    sys.exit(f"unknown job(s) {unknown}: choose from {', '.join(JOBS)}")
  root = args.keep or tempfile.mkdtemp(prefix="bench-estimate-")
  print(f"CPU: {common.cpu_model()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}")
  results = [run_job(n, root, args.mfu) for n in names]
  peak = results[0]["estimate"]["peak_flops_per_device"] * results[0]["estimate"]["num_devices"]
  print(f"same-run peak (2048^3 f32 matmul, first job's preflight): {peak / 1e9:.1f} GFLOP/s; "
        f"MFU {args.mfu:g}; load avg after: {os.getloadavg()[0]:.2f}")
  print(report(results))


if __name__ == "__main__":
  main()
