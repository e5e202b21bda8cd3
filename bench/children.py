"""Run one measurement of a bench in a fresh interpreter (no JAX imported here).

A bench that measures memory (peak RSS, page faults) runs each case as
`python <script> --child <kind> <args...>` so that no case inherits another's heap, and
reads the case's result from the last line of its stdout (one JSON object).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(script: str, kind: str, *args: str) -> dict:
  """`script --child kind args...` on the CPU backend, offline -> its last stdout line as JSON.

  Exits with the child's stderr tail when it fails.
  """
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
         "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
  proc = subprocess.run([sys.executable, os.path.abspath(script), "--child", kind, *args],
                        cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    sys.exit(f"child {kind} {args} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])
