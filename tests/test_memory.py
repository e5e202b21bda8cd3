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
  after = memory.peak_rss_bytes()  # >= the second entry's own peak
  # the larger of the two: never the second's alone when it is smaller. (Not `== first`: in a
  # test worker of several GB, other threads can move the RSS between the two entries, and
  # the second entry's peak, the RSS at its start, can then exceed the first by some kB.)
  assert first <= peaks.bytes["row"] <= max(first, after)


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


def test_huge_pages_environ_appends_the_tunable():
  env = memory.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert env["A"] == "b"
  assert memory.huge_pages_environ({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  # once set (or switched off) the restart is not wanted again: no exec loop
  assert not memory.huge_pages_wanted(env)
  assert not memory.huge_pages_wanted({"DTM_HUGE_PAGES": "0"})


def test_huge_pages_restart_reaches_the_child(tmp_path):
  """A script calling exec_with_huge_pages runs again with the tunable where the host
  wants it, once, with its arguments intact; elsewhere it runs on unchanged."""
  import subprocess
  script = tmp_path / "s.py"
  script.write_text("import os, sys\nfrom dtm import memory\nprint('start', flush=True)\n"
                    "memory.exec_with_huge_pages()\n"
                    "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DTM_HUGE_PAGES")}
  out = subprocess.run([sys.executable, str(script), "x", "--y=1"], env=env, check=True,
                       capture_output=True, text=True, cwd=os.getcwd()).stdout.splitlines()
  wanted = memory.huge_pages_wanted(env)
  assert out[-1].endswith("['x', '--y=1']")
  assert ("glibc.malloc.hugetlb=1" in out[-1]) == wanted
  assert out.count("start") == (2 if wanted else 1)
