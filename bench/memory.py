"""Peak host memory (RSS) of the prune_compare job per phase, SmolLM2-135M, CPU-sized.

  .venv/bin/python bench/memory.py [--workdir DIR] [-- --config.x=y ...]

Runs `main.py --config=configs/prune_compare.py` in a subprocess on a fresh workdir (the
config's defaults with SMALL below: two sparsities, magnitude / Wanda / SparseGPT one-shot
and trained rows, a one-round FDT-guided run, fewer prompts, PPL and calibration windows,
so that the run takes minutes on 2 cores) and reads the job's own per-phase peaks from
results.json (`phase_peak_rss_bytes`: VmHWM reset at every phase start, `dtm.memory`).
A second subprocess gives the baseline: RSS after the job's imports and JAX start-up,
then the float32 bytes of SmolLM2's params.

Bound (issue 22): peak RSS <= 4 x float32 model bytes + one layer's calibration
activations, where one layer's activations (float32) are what a calibration layer pass
holds: the hidden states entering and leaving the layer for all windows (2 n T D), one
batch's intermediates (B T (D + 2 KV + H hd + H T + 3 I): q, k, v, attention output,
scores, MLP) and the layer's input statistics (sq_norms and Hessians of its four input
sites: 2 D^2 + (H hd)^2 + I^2). The check is on the absolute peak, baseline included.
Prints the CPU, the load average, one line per phase, and XLA's memory plan of one train
step of a trained row (`memory_analysis`, per device: params, masks, Adam moments and the
teacher as arguments, activations and gradients as temporaries; a data-parallel mesh holds
one of each per JAX device), which is why the train phase cannot meet the bound.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # configs/ and bench/ (the children import them)
from bench import children  # noqa: E402
MB = 2**20

SMALL = (
    "--config.compare.sparsities=(0.02,0.04)",
    "--config.compare.methods=('magnitude','wanda','sparsegpt')",
    "--config.prune.max_rounds=1",
    "--config.select.prompts.num=2",
    "--config.select.prompts.new_tokens=8",
    "--config.eval.prompts.num=8",
    "--config.eval.ppl.max_windows=4",
    "--config.calibration.samples=16",
    "--config.calibration.length=256",
    "--config.train.steps=2",
)


def child_baseline() -> dict:
  """RSS after the job's imports and JAX start-up, then SmolLM2's float32 param bytes and
  the dimensions the activation bound needs."""
  import jax
  import matplotlib.pyplot  # noqa: F401 (the job plots)
  from dtm import cli, memory
  from dtm.jobs import prune_compare  # noqa: F401
  cli.setup_jax(cpu_devices=0)
  jax.devices()
  base = memory.rss_bytes()
  from dtm.loading import load_model
  model = load_model("smollm2-135m", param_dtype="float32", dtype="float32")
  c = model.cfg
  return {"baseline": base, "devices": jax.device_count(),
          "param_bytes": int(sum(x.size * 4 for x in jax.tree.leaves(model.params))),
          "dims": {"D": c.hidden_size, "I": c.intermediate_size, "H": c.num_attention_heads,
                   "KV": c.num_key_value_heads * c.head_dim, "hd": c.head_dim}}


def child_train_step(*overrides: str) -> dict:
  """XLA's plan for one compiled train step of a trained row (`compiled.memory_analysis()`,
  bytes per device): arguments (params, masks, Adam moments, teacher) and temporaries."""
  import ast
  from configs import prune_compare as cfg_module
  from dtm import cli, data
  from dtm.jobs import common
  from dtm.jobs.train import training_tokens
  from dtm.train import sharding, trainer
  config = cfg_module.get_config()
  for item in overrides:  # --config.train.x.y=v (the others do not change the step)
    key, _, value = item[len("--config."):].partition("=")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  cli.setup_jax(cpu_devices=config.cpu_devices)
  model = common.load(config)
  spec = "*@*:magnitude(0.02)"
  params_c, _, _ = common.compress_model(config, model, spec)
  tokens = training_tokens(config, model.tokenizer)
  tc = config.train
  mesh = sharding.make_mesh(int(tc.mesh.data), int(tc.mesh.fsdp))
  with tempfile.TemporaryDirectory() as tmp:
    run = trainer._setup(model.cfg, params_c, spec, tc, tokens=tokens, workdir=tmp, identity={},
                         teacher_params=model.params, mesh=mesh)
    batch = data.train_batch(tokens, batch=int(tc.batch_size), seq_len=int(tc.seq_len),
                             seed=0, step=0)
    lowered = run.fns.step(True).lower(run.state, sharding.put_batch(batch, run.fns.batch_sharding),
                                       run.teacher)
    ma = lowered.compile().memory_analysis()
  return {"arguments": int(ma.argument_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes),
          "devices": int(mesh.size), "mesh": dict(mesh.shape), "remat": bool(tc.remat),
          "tokens": int(tc.batch_size) * int(tc.seq_len)}


def layer_activation_bytes(dims: dict, samples: int, length: int, batch: int) -> int:
  """float32 bytes of one calibration layer pass (module docstring)."""
  d, i, h, kv, hd = dims["D"], dims["I"], dims["H"], dims["KV"], dims["hd"]
  hidden = 2 * samples * length * d
  per_batch = batch * length * (d + 2 * kv + h * hd + h * length + 3 * i)
  stats = 2 * d * d + (h * hd) ** 2 + i * i + 2 * d + h * hd + i
  return 4 * (hidden + per_batch + stats)


def run_job(workdir: str, extra: list[str]) -> tuple[dict, float]:
  """The job in a subprocess -> (results.json, seconds)."""
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
  cmd = [sys.executable, "main.py", "--config=configs/prune_compare.py",
         f"--workdir={workdir}", *SMALL, *extra]
  print("$", " ".join(cmd[1:]), flush=True)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if proc.returncode != 0:
    sys.exit(f"prune_compare failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f), seconds


def _child(kind: str, *args: str) -> dict:
  return children.run_child(__file__, kind, *args)


def main(argv: list[str]) -> int:
  if argv[:1] == ["--child"]:
    kinds = {"baseline": child_baseline, "train_step": child_train_step}
    print(json.dumps(kinds[argv[1]](*argv[2:])))
    return 0
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default=None, help="kept afterwards (default: a temp dir)")
  args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  from bench.common import cpu_model, table
  load0 = os.getloadavg()
  base = _child("baseline")
  step = _child("train_step", *[a for a in (*SMALL, *extra) if a.startswith("--config.train.")])
  workdir = args.workdir or tempfile.mkdtemp(prefix="dtm-bench-memory-")
  shutil.rmtree(workdir, ignore_errors=True)
  res, seconds = run_job(workdir, extra)
  load1 = os.getloadavg()
  cal = res["calibration"] or {"samples": 0, "length": 0, "batch_size": 1}
  acts = layer_activation_bytes(base["dims"], cal["samples"], cal["length"], cal["batch_size"])
  model, bound = base["param_bytes"], 4 * base["param_bytes"] + acts
  peaks = dict(res["phase_peak_rss_bytes"])
  peaks["job (max over phases)"] = max(peaks.values())
  rows = [(name, f"{b / MB:.0f}", f"{(b - base['baseline']) / MB:.0f}", f"{b / model:.2f}",
           f"{bound / MB:.0f}", "pass" if b <= bound else "FAIL") for name, b in peaks.items()]
  print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, {base['devices']} JAX CPU devices; "
        f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; job {seconds:.0f} s, "
        f"{len(res['rows'])} rows")
  print(f"float32 model bytes {model / MB:.0f} MB; one layer's calibration activations "
        f"{acts / MB:.0f} MB ({cal['samples']} x {cal['length']} tokens, batch "
        f"{cal['batch_size']}); bound 4 x model + activations = {bound / MB:.0f} MB; RSS "
        f"after imports + JAX start {base['baseline'] / MB:.0f} MB")
  print(table(rows, ("phase", "peak RSS MB", "- baseline", "/ model", "bound MB", "check")))
  per_device = step["arguments"] + step["temporaries"]
  print(f"train step (XLA's plan, per device; mesh {step['mesh']}, remat {step['remat']}, "
        f"{step['tokens']} tokens): arguments {step['arguments'] / MB:.0f} MB (params, masks, "
        f"Adam moments, teacher: {step['arguments'] / model:.2f} x model) + temporaries "
        f"{step['temporaries'] / MB:.0f} MB; x {step['devices']} devices = "
        f"{step['devices'] * per_device / MB:.0f} MB")
  if not res.get("phase_peak_rss_exact", True):
    print("note: VmHWM could not be reset; each phase shows the process peak up to its end")
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  return 0 if max(peaks.values()) <= bound else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
