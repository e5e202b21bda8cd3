"""The estimate a real run prints before its first long phase (`dtm.aot.preflight`).

A tiny probe job through `main.py` on 2 CPU devices: the estimate line comes before the
job's own first line, estimate.json holds every function the job runs with its compiled
(loop-aware) and useful FLOPs, and the job then reuses the preflight's compiles.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  model = tiny_model.write_tiny_model(str(root / "model"))
  prompts = tiny_model.write_prompts(root / "prompts.jsonl", num=4, length=12)
  return model, prompts


def test_estimate_line_at_the_start_of_a_job(tmp_path, tiny):
  model, prompts = tiny
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "DTM_JAX_CACHE": str(tmp_path / "cache"),
         "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
  env.pop("DTM_ESTIMATE", None)
  cmd = [sys.executable, "main.py", "--config=configs/probe.py:runlocal",
         f"--workdir={tmp_path / 'run'}", f"--config.model={model}",
         f"--config.prompts.jsonl={prompts}", "--config.probe.layers=*",
         "--config.cpu_devices=2"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  first = next(i for i, l in enumerate(lines) if l.startswith("estimate: probe on cpu:2:"))
  assert first < next(i for i, l in enumerate(lines) if l.startswith("probe sweep:"))
  assert "FLOPs in 3 functions" in lines[first] and "GiB per device" in lines[first]
  with open(tmp_path / "run" / "estimate.json") as f:
    got = json.load(f)
  assert [f["name"] for f in got["functions"]] == [
      "reference generation", "probe base pass", "probe chunk magnitude"]
  assert got["estimated_seconds"] > 0 and got["compile_seconds"] > 0 and got["fits"]
  for f in got["functions"]:
    # loop-aware compiled matmuls against the useful count: not the loop-body-once
    # under-count that cost_analysis gives for the layer scan and decode loop (the chunk's
    # run-time layer loop is counted at its mean trips, as its useful FLOPs are)
    assert f["compiled_over_useful"] >= 0.95, f
  # the job's compiles of the planned functions hit what the preflight compiled
  # (in memory, or in the persistent cache for compiles over 2 s): no second compile
  for name in ("jit_greedy_generate", "jit__base_pass", "jit_local"):
    compiles = [l for l in proc.stderr.splitlines()  # jax._src.compiler logs each compile
                if f"'{name}'" in l and ("Not writing" in l or "took at least" in l)]
    assert len(compiles) == 1, compiles
