"""Expand a config's `sweep(add)` ablation grid into runs, one workdir per override set,
and collect a grid's results into one table and one plot per metric.

  python launch/sweep.py --config=configs/probe.py:model=llama2-7b --root=runs/ablation
  python launch/sweep.py --config=configs/probe.py --root=runs/ab --run       # run them here
  python launch/sweep.py --config=configs/probe.py --root=runs/ab --collect   # gather results

Workdir names come from the override values (e.g. runs/ab/probe.method=absmax,...), so
relaunching the same grid resumes every run where it stopped. Without --run the
commands are printed (pipe them to your scheduler, or use launch/tpu_pod.sh).

--collect reads every run's results.json (the probe job: summary.csv + candidates.json)
and writes, in --root: sweep_results.csv and sweep_results.txt (one row per run, or per
record for jobs whose results hold several: quantize one per ranking and bound,
prune_compare one per method and sparsity, probe one per level; the swept values beside
the numeric metrics) and sweep_<metric>.png (the metric against each swept value, one
panel per swept key, one line per value of the other keys; metrics equal in every run
are tabulated, not plotted). A run without results is a row with status `not started`
(no workdir) or `unfinished` (workdir, no results yet), named on stdout; the collection
does not fail on it.
"""
import argparse
import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_module(config_arg: str):
  path = config_arg.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location("sweep_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, ROOT)
  spec.loader.exec_module(module)
  return module


def load_sweep(config_arg: str) -> list[dict]:
  module = load_module(config_arg)
  if not hasattr(module, "sweep"):
    sys.exit(f"error: {config_arg.split(':', 1)[0]} defines no sweep(add)")
  runs: list[dict] = []
  module.sweep(runs.append)
  return runs


def _value(v) -> str:
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def run_name(overrides: dict) -> str:
  name = ",".join(f"{k}={_value(v)}" for k, v in sorted(overrides.items()))
  return re.sub(r"[^\w.,=()+-]", "_", name) or "default"


def commands(config_arg: str, root: str) -> list[list[str]]:
  out = []
  for overrides in load_sweep(config_arg):
    workdir = os.path.join(root, run_name(overrides))
    path, _, arg = config_arg.partition(":")
    config_abs = os.path.abspath(path) + (f":{arg}" if arg else "")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={config_abs}",
           f"--workdir={workdir}"]
    cmd += [f"--config.{k}={_value(v)}" for k, v in sorted(overrides.items())]
    out.append(cmd)
  return out


# ------------------------------------------------------------------------------ collect

# Fields of results.json that describe the run rather than measure it.
_NOT_METRICS = {"config", "eval_settings", "heldout_settings", "data", "calibration",
                "settings", "rounds", "steps"}
# Lists of records in results.json that become one row each, and the fields naming a record.
_RECORD_LISTS = {"searches": ("rank_by", "bound"), "rows": ("target", "method", "variant")}
_PROBE_KEYS = ("level",)


def _flatten(d: dict, prefix: str = "") -> dict:
  """Numeric leaves of nested dicts, keyed by their dotted path (bools and lists skipped)."""
  out = {}
  for k, v in d.items():
    if k in _NOT_METRICS:
      continue
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[f"{prefix}{k}"] = float(v)
  return out


def run_rows(workdir: str) -> tuple[tuple[str, ...], list[dict]] | None:
  """(record keys, rows) of a finished run, None while it has no results."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
  except (OSError, json.JSONDecodeError):
    return _probe_rows(workdir)
  for name, keys in _RECORD_LISTS.items():
    if isinstance(results.get(name), list):
      run = _flatten({k: v for k, v in results.items() if k != name})
      return keys, [{**{k: r[k] for k in keys if k in r}, **run,
                     **_flatten({k: v for k, v in r.items() if k not in keys})}
                    for r in results[name]]
  return (), [_flatten(results)]


def _probe_rows(workdir: str):
  """The probe job: per level, the mean of summary.csv's metrics over the components and
  the share of components whose candidate reaches the level (candidates.json)."""
  try:
    with open(os.path.join(workdir, "candidates.json")) as f:
      shares = {r["group"]: r for r in json.load(f)["shares"]}
    with open(os.path.join(workdir, "summary.csv"), newline="") as f:
      table = list(csv.DictReader(f))
  except (OSError, json.JSONDecodeError, KeyError):
    return None
  by_level: dict[float, list[dict]] = {}
  for r in table:
    by_level.setdefault(float(r["level"]), []).append(r)
  rows = []
  for level, group in sorted(by_level.items()):
    row = {"level": level}
    for k in group[0]:
      vals = [_number(r[k]) for r in group]
      if k != "level" and all(v is not None for v in vals):
        row[k] = sum(vals) / len(vals)
    everything = shares.get("all")
    if everything and everything["components"]:
      row["candidate_share"] = everything["reach"].get(f"{level:g}", 0) / everything["components"]
    rows.append(row)
  return _PROBE_KEYS, rows


def _number(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _lookup(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def collect(config_arg: str, root: str) -> dict:
  """Gather the grid's results under `root`; write the table and the plots there.

  Returns {"rows", "missing" (run names without results), "columns", "files"}.
  """
  grid = load_sweep(config_arg)
  module = load_module(config_arg)
  defaults = module.get_config(config_arg.partition(":")[2] or None)
  keys = list(dict.fromkeys(k for o in grid for k in o))
  values = [{k: o[k] if k in o else _lookup(defaults, k) for k in keys} for o in grid]
  swept = [k for k in keys if len({_value(v[k]) for v in values}) > 1]
  rows, missing, record_keys = [], [], []
  for overrides, vals in zip(grid, values):
    name = run_name(overrides)
    workdir = os.path.join(root, name)
    found = run_rows(workdir)
    base = {"run": name, **{k: vals[k] for k in swept}}
    if found is None:
      missing.append(name)
      rows.append({**base, "status": "unfinished" if os.path.isdir(workdir) else "not started"})
      continue
    record_keys += [k for k in found[0] if k not in record_keys]
    rows += [{**base, "status": "done", **r} for r in found[1]]
  factors = swept + record_keys
  metrics = list(dict.fromkeys(k for r in rows for k in r
                               if k not in factors and k not in ("run", "status")))
  columns = ["run", "status"] + factors + metrics
  os.makedirs(root, exist_ok=True)
  files = [_write_csv(os.path.join(root, "sweep_results.csv"), rows, columns),
           _write_text(os.path.join(root, "sweep_results.txt"), rows, columns, missing)]
  done = [r for r in rows if r["status"] == "done"]
  for m in metrics:
    if len({r[m] for r in done if m in r}) > 1:
      files.append(_plot(os.path.join(root, f"sweep_{_safe(m)}.png"), done, m,
                         _panels(swept, values) + [[k] for k in record_keys], factors))
  return {"rows": rows, "missing": missing, "columns": columns, "files": files}


def _panels(swept: list[str], values: list[dict]) -> list[list[str]]:
  """Swept keys grouped into one panel when their values determine each other (keys that
  only vary together, e.g. a method and its levels)."""
  groups: list[list[str]] = []
  for k in swept:
    for g in groups:
      pairs = {(_value(v[g[0]]), _value(v[k])) for v in values}
      if len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs}):
        g.append(k)
        break
    else:
      groups.append([k])
  return groups


def _cell(v) -> str:
  if v is None:
    return ""
  return f"{v:.4g}" if isinstance(v, float) else _value(v)


def _write_csv(path: str, rows: list[dict], columns: list[str]) -> str:
  with open(path + ".tmp", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    w.writerows([[repr(r[c]) if isinstance(r.get(c), float) else _cell(r.get(c))
                  for c in columns] for r in rows])
  os.replace(path + ".tmp", path)
  return path


def _write_text(path: str, rows: list[dict], columns: list[str], missing: list[str]) -> str:
  lines = [columns] + [[_cell(r.get(c)) or "-" for c in columns] for r in rows]
  widths = [max(len(l[i]) for l in lines) for i in range(len(columns))]
  text = "\n".join("  ".join(v.ljust(w) for v, w in zip(l, widths)).rstrip() for l in lines)
  status = {r["run"]: r["status"] for r in rows}
  text += f"\n\n{len(status) - len(missing)} of {len(status)} runs finished"
  text += (": missing " + ", ".join(f"{m} ({status[m]})" for m in missing) if missing else "")
  text += "\n"
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path


def _safe(name: str) -> str:
  return re.sub(r"[^\w.+-]", "_", name)


def _plot(path: str, rows: list[dict], metric: str, panels: list[list[str]],
          factors: list[str]) -> str:
  """`metric` against each panel's key (numeric axis when every value is a number, log when
  positive over more than 20x), one line per combination of the other factors' values."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
  for ax, keys in zip(axes[0], panels):
    x_key, others = keys[0], [f for f in factors if f not in keys]
    xs = [r[x_key] for r in rows if metric in r]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    ticks = list(dict.fromkeys(_value(x) for x in xs))
    series: dict[str, list] = {}
    for r in rows:
      if metric in r:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_value(r[k])}" for k in others)
        series.setdefault(label, []).append(
            (r[x_key] if numeric else ticks.index(_value(r[x_key])), r[metric]))
    longest = max(map(len, series.values()), default=0)
    for label, pts in series.items():
      if len(pts) == 1 < longest:
        continue  # one-at-a-time grids: a run of another key, alone at this key's default
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label or None, ms=4)
    if numeric and min(xs) > 0 and max(xs) >= 20 * min(xs):
      ax.set_xscale("log")
    if not numeric:
      ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=7)
    ax.set_xlabel(" / ".join(keys))
    ax.set_ylabel(metric)
    if 1 < len(series) <= 12:
      ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
  fig.suptitle(metric)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def print_collection(result: dict, root: str) -> None:
  with open(os.path.join(root, "sweep_results.txt")) as f:
    print(f.read(), end="")
  print("wrote " + ", ".join(os.path.basename(f) for f in result["files"]) + f" in {root}")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", required=True)
  ap.add_argument("--root", required=True)
  ap.add_argument("--run", action="store_true", help="run the runs one after another here")
  ap.add_argument("--collect", action="store_true",
                  help="gather the runs' results into a table and plots in --root")
  args = ap.parse_args()
  if args.collect and not args.run:
    print_collection(collect(args.config, args.root), args.root)
    return
  failed = 0
  for cmd in commands(args.config, args.root):
    print(shlex.join(cmd), flush=True)
    if args.run:
      failed += subprocess.call(cmd) != 0
  if args.collect:
    print_collection(collect(args.config, args.root), args.root)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
