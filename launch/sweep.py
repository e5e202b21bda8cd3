"""Expand a config's `sweep(add)` ablation grid into runs, one workdir per override set.

  python launch/sweep.py --config=configs/probe.py:model=llama2-7b --root=runs/ablation
  python launch/sweep.py --config=configs/probe.py --root=runs/ab --run   # run them here

Workdir names come from the override values (e.g. runs/ab/probe.method=absmax,...), so
relaunching the same grid resumes every run where it stopped. Without --run the
commands are printed (pipe them to your scheduler, or use launch/tpu_pod.sh).
"""
import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_sweep(config_arg: str) -> list[dict]:
  path = config_arg.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location("sweep_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, ROOT)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    sys.exit(f"error: {path} defines no sweep(add)")
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


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", required=True)
  ap.add_argument("--root", required=True)
  ap.add_argument("--run", action="store_true", help="run the runs one after another here")
  args = ap.parse_args()
  failed = 0
  for cmd in commands(args.config, args.root):
    print(shlex.join(cmd), flush=True)
    if args.run:
      failed += subprocess.call(cmd) != 0
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
