"""The files in `conftest.ISOLATED`, each run by pytest in a fresh interpreter (see there
why): one test per file here, its failures printed from the subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ISOLATED

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("name", ISOLATED)
def test_in_a_fresh_interpreter(name):
  env = {**os.environ, "DTM_TEST_ISOLATED": "1"}
  for key in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS"):
    env.pop(key, None)
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         str(HERE / name)], cwd=HERE.parent, env=env, capture_output=True,
                        text=True, timeout=2400)
  print(proc.stdout[-3000:])
  assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout
