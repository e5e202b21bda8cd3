"""launch/sweep.py: every research config's `sweep(add)` yields declared fields that parse
from its command line, and `--collect` gathers finished and half-finished grids (runs'
outputs faked as small results.json / probe files)."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO

_spec = importlib.util.spec_from_file_location("launch_sweep", REPO / "launch" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

RESEARCH = ("train", "prune", "quantize", "probe")


def _parse(argv: list[str], monkeypatch):
  """The config main.py would run for `argv` (its flags, on a private FlagValues)."""
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads overrides from sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("job", RESEARCH)
def test_sweep_overrides_are_declared_fields(job, tmp_path, monkeypatch):
  module = sweep.load_module(f"configs/{job}.py")
  grid = sweep.load_sweep(f"configs/{job}.py")
  assert len(grid) >= 3 and len({sweep.run_name(o) for o in grid}) == len(grid)
  for overrides in grid:
    config = module.get_config()
    config.lock()
    config.update_from_flattened_dict(overrides)  # KeyError / TypeError if undeclared / mistyped
  for overrides, cmd in zip(grid, sweep.commands(f"configs/{job}.py", str(tmp_path))):
    config = _parse([c for c in cmd[1:] if not c.startswith("--workdir")], monkeypatch)
    for key, value in overrides.items():
      assert sweep._lookup(config, key) == value, (key, cmd)


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def _train_results(alpha, temperature, lr, div_weight):
  fdt = 1.0 + alpha + 0.1 * temperature - div_weight + lr * 1e3
  return {"job": "train", "steps": 80, "params_fingerprint": "abc",
          "heldout_before": {"fdt_mean": 0.5, "dppl": 32.0},
          "heldout_after": {"fdt_mean": fdt, "dppl": 6.0 - fdt / 10},
          "last_train": {"loss": 1.0 / fdt}, "config": {"train": {"steps": 80}},
          "eval_settings": {"num_prompts": 64}, "train_tokens": 30720}


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_collect_finished_train_grid(tmp_path):
  grid = sweep.load_sweep("configs/train.py")
  for o in grid:
    _write(tmp_path / sweep.run_name(o) / "results.json", _train_results(
        o.get("train.objective.alpha", 1.0), o.get("train.objective.temperature", 1.0),
        o.get("train.optim.lr", 2e-4), o.get("train.objective.div_weight", 0.0)))
  out = sweep.collect("configs/train.py", str(tmp_path))
  assert out["missing"] == [] and len(out["rows"]) == len(grid)
  rows = _read_csv(tmp_path / "sweep_results.csv")
  assert [r["run"] for r in rows] == [sweep.run_name(o) for o in grid]
  assert {r["status"] for r in rows} == {"done"}
  by_run = {r["run"]: r for r in rows}
  # swept values (defaults filled in for the keys a run does not set) beside the metrics
  assert by_run["default"]["train.objective.alpha"] == "1.0"
  assert by_run["train.objective.alpha=0.0"]["train.objective.alpha"] == "0.0"
  assert float(by_run["train.objective.alpha=0.0"]["heldout_after.fdt_mean"]) == pytest.approx(1.3)
  assert float(by_run["default"]["heldout_after.fdt_mean"]) == pytest.approx(2.3)
  assert "config.train.steps" not in rows[0] and "eval_settings.num_prompts" not in rows[0]
  # one plot per metric that varies; constant ones are only tabulated
  names = {p.name for p in tmp_path.glob("sweep_*.png")}
  assert names == {"sweep_heldout_after.fdt_mean.png", "sweep_heldout_after.dppl.png",
                   "sweep_last_train.loss.png"}
  assert all((tmp_path / n).stat().st_size > 1000 for n in names)
  text = (tmp_path / "sweep_results.txt").read_text()
  assert f"{len(grid)} of {len(grid)} runs finished" in text and "missing" not in text


def _quantize_results(levels):
  bonus = {(8,): 2, (4,): 0, (4, 8): 1}[levels]
  return {"job": "quantize", "alpha": 0.9, "linear_params": 1000, "recipe": "q@0:absmax(8)",
          "searches": [{"rank_by": r, "bound": b, "share": 0.1 * bonus + i / 100 - b / 1000,
                        "components": 10 + bonus, "spec": "q@0:absmax(8)", "evaluated": 40,
                        "aggregate": {"fdt_alpha_0.9": b + 1, "dppl": 3.0 + i}}
                       for i, r in enumerate(("fdt", "dppl", "kl", "random"))
                       for b in (8.0, 16.0, 24.0)],
          "config": {}, "seconds": 10.0}


def test_collect_half_finished_quantize_grid(tmp_path):
  """One run done, one started (workdir, no results.json), one never started: the table
  names the missing runs, the plots come from the finished one, the command succeeds."""
  grid = sweep.load_sweep("configs/quantize.py")
  done, started, absent = (sweep.run_name(o) for o in grid)
  _write(tmp_path / done / "results.json", _quantize_results(grid[0]["search.levels"]))
  (tmp_path / started / "probe-8").mkdir(parents=True)
  proc = subprocess.run([sys.executable, "launch/sweep.py", "--config=configs/quantize.py",
                         f"--root={tmp_path}", "--collect"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"missing {started} (unfinished), {absent} (not started)" in proc.stdout
  assert "1 of 3 runs finished" in proc.stdout
  rows = _read_csv(tmp_path / "sweep_results.csv")
  assert [r["status"] for r in rows] == ["done"] * 12 + ["unfinished", "not started"]
  assert [r["run"] for r in rows[12:]] == [started, absent]
  # one row per ranking and bound; the constant overrides are not columns
  assert list(rows[0])[:5] == ["run", "status", "search.levels", "rank_by", "bound"]
  assert {(r["rank_by"], r["bound"]) for r in rows[:12]} == {
      (r, b) for r in ("fdt", "dppl", "kl", "random") for b in ("8.0", "16.0", "24.0")}
  assert rows[12]["search.levels"] == "(4,)" and rows[12]["share"] == ""
  assert (tmp_path / "sweep_share.png").exists()
  assert (tmp_path / "sweep_aggregate.fdt_alpha_0.9.png").exists()
  assert not (tmp_path / "sweep_components.png").exists()  # constant in the finished run


def test_collect_probe_grid_reads_summary_and_candidates(tmp_path):
  grid = sweep.load_sweep("configs/probe.py")
  first = grid[0]
  workdir = tmp_path / sweep.run_name(first)
  workdir.mkdir()
  levels = first["probe.levels"]
  with open(workdir / "summary.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["component", "level", "method", "sparsity", "fdt_alpha_0.9", "fdt_mean"])
    for comp, base in (("L00.q", 30.0), ("L01.down", 20.0)):
      for lv in levels:
        w.writerow([comp, lv, "magnitude", lv, base * (1 - lv), base * (1 - lv) + 1])
  _write(workdir / "candidates.json", {"shares": [
      {"group": "all", "components": 2, "reach": {f"{lv:g}": int(lv < 0.6) for lv in levels}}]})
  out = sweep.collect("configs/probe.py", str(tmp_path))
  assert out["missing"] == [sweep.run_name(o) for o in grid[1:]]
  rows = [r for r in out["rows"] if r["status"] == "done"]
  assert [r["level"] for r in rows] == list(levels)
  assert rows[0]["fdt_alpha_0.9"] == pytest.approx(25 * 0.9)
  assert [r["candidate_share"] for r in rows] == [0.5 * (lv < 0.6) for lv in levels]
  assert (tmp_path / "sweep_fdt_mean.png").exists()
