"""Peak RSS per phase (`dtm.memory`): a phase's peak is its own after the reset, the
fallbacks degrade without raising, and the prune_compare job records its phases."""
from __future__ import annotations

import builtins
import json
import os
import sys

import numpy as np
import pytest

from test_prune_job import tiny_dir  # noqa: F401 (fixture)
from dtm import memory

MB = 2**20
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


@linux
def test_each_phase_gets_its_own_peak():
  peaks = memory.PhasePeaks(release=True)
  with peaks.phase("big"):
    base = memory.rss_bytes()
    a = np.ones(200 * MB // 8)  # 200 MB, every page touched
    assert memory.rss_bytes() >= base + 150 * MB
    del a
  with peaks.phase("small"):
    b = np.ones(10 * MB // 8)
    del b
  assert peaks.exact  # the kernel allows the reset here
  assert peaks.bytes["big"] >= base + 150 * MB
  # without the reset "small" would repeat big's peak
  assert peaks.bytes["small"] < peaks.bytes["big"] - 100 * MB
  assert list(peaks.bytes) == ["big", "small"]
  assert "big" in peaks.summary() and "MB" in peaks.summary()


@linux
def test_a_phase_entered_twice_keeps_the_larger_peak():
  peaks = memory.PhasePeaks()
  with peaks.phase("row"):
    a = np.ones(120 * MB // 8)
    del a
  first = peaks.bytes["row"]
  with peaks.phase("row"):
    pass
  assert peaks.bytes["row"] == first


def test_without_proc_the_peak_is_an_upper_bound(monkeypatch):
  real_open = builtins.open

  def no_proc(path, *args, **kwargs):
    if str(path).startswith("/proc/self"):
      raise OSError("no /proc")
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", no_proc)
  assert memory.rss_bytes() is None and not memory.reset_peak_rss()
  peaks = memory.PhasePeaks()
  with peaks.phase("x"):
    pass
  assert not peaks.exact
  assert peaks.bytes.get("x", 1) > 0  # getrusage's ru_maxrss where there is one


def test_release_and_large_buffers_never_raise():
  memory.release_free_memory()
  assert memory.map_large_buffers() in (True, False)


@linux
def test_prune_compare_records_peak_rss_per_phase(tiny_dir, tmp_path, monkeypatch):
  """A one-row comparison (no FDT-guided run, no training) writes every phase it ran."""
  from test_prune_compare import make_config
  from dtm.cli import run_job
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  config = make_config(tiny_dir, **{"compare.fdt_guided": False, "compare.methods": ("magnitude",),
                                    "compare.sparsities": (0.1,)})
  workdir = str(tmp_path / "cmp")
  assert run_job(config, workdir) == 0
  res = json.load(open(os.path.join(workdir, "results.json")))
  peaks = res["phase_peak_rss_bytes"]
  assert list(peaks) == ["load", "references", "setup", "compress", "evaluate", "finish"]
  assert res["phase_peak_rss_exact"] is True
  assert all(isinstance(v, int) and 50 * MB < v < 64 * 2**30 for v in peaks.values()), peaks
