"""Every config's documented variants build, and every `:runlocal` runs as shipped.

Construction: `get_config()` and each arg a config file's docstring lists. Runs: `main.py
--config=configs/<job>.py:runlocal` with no overrides but a fresh --workdir, on the
embedded SmolLM2 and the shared data, exit status 0 and the job's main output written.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from conftest import REPO

# config -> the variant args its docstring documents (besides the default, arg=None)
VARIANTS = {
    "probe": ("runlocal", "quick", "beyond90", "model=llama2-7b", "model=llama2-13b",
              "model=llama2-7b,runlocal"),
    "train": ("runlocal", "model=llama2-7b", "model=llama2-7b,runlocal"),
    "prune": ("runlocal", "tiny", "model=llama2-7b", "model=llama2-13b"),
    "prune_compare": ("runlocal", "tiny", "model=llama2-7b", "model=llama2-13b"),
    "quantize": ("runlocal", "mixed", "model=llama2-7b", "mixed,runlocal"),
    "compare": ("runlocal", "study=components", "study=methods", "model=llama2-7b"),
    "evaluate": ("runlocal", "model=llama2-7b", "model=llama2-7b,runlocal"),
    "convert": ("runlocal", "model=llama2-7b"),
    "lm_eval": ("runlocal", "model=llama2-7b"),
    "allocate": ("runlocal", "model=llama2-7b", "model=llama2-7b,runlocal"),
}
# The job's main output (besides results.json where it writes one).
OUTPUT = {"probe": "candidates.json", "convert": "config.json", "allocate": "recipe.txt"}
# The longest runlocal runs, left to `-m slow` (measured 2026-12-04 on 2 shared CPU cores:
# prune_compare 507 s, prune 127 s, compare 78 s; the other six together 205 s). allocate's
# runlocal is run (and killed and resumed) by tests/test_allocate_job.py.
SLOW = {"prune_compare", "prune", "compare", "allocate"}


def _module(job: str):
  return importlib.import_module(f"configs.{job}")


def test_every_config_file_is_listed():
  names = {f[:-3] for f in os.listdir(REPO / "configs")
           if f.endswith(".py") and f not in ("__init__.py", "common.py")}
  assert names == set(VARIANTS)


@pytest.mark.parametrize("job, arg", [(j, a) for j, args in VARIANTS.items()
                                      for a in (None, *args)])
def test_variant_builds(job, arg):
  config = _module(job).get_config(arg)
  assert config.job == job
  config.lock()  # as main.py runs it
  assert config.model


@pytest.mark.parametrize("job", [pytest.param(j, marks=pytest.mark.slow) if j in SLOW else j
                                 for j in VARIANTS])
def test_runlocal_runs_as_shipped(job, tmp_path):
  workdir = tmp_path / "workdir"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu",
             TOKENIZERS_PARALLELISM="false")
  proc = subprocess.run([sys.executable, "main.py", f"--config=configs/{job}.py:runlocal",
                         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert (workdir / OUTPUT.get(job, "results.json")).exists(), sorted(os.listdir(workdir))
