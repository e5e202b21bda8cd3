"""The 2-D probe mesh ('probe', 'model'): tensor-parallel probes give the 1-D results.

On 8 simulated CPU devices (a subprocess, since the device count is fixed at JAX start),
the same probes of a tiny random model (magnitude on every kind, Wanda, SparseGPT) run
on meshes 8x1, 4x2 and 2x4. FDT, SDT and top-1 agreement must be identical; NLL within 1e-5
and KL within 1e-4 (sums that the 'model' split reorders; KL of an unchanged position is
0 up to float noise).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
import tiny_model
from dtm import probe
from dtm.components import KINDS, Component
from dtm.compress import calibration
from dtm.model import init_params

cfg = tiny_model.TINY.replace(num_hidden_layers=2)
params = init_params(cfg, seed=1)
params = {**params, "lm_head": jax.tree.map(lambda x: x * 50.0, params["lm_head"])}
rng = np.random.default_rng(0)
seq = rng.integers(0, cfg.vocab_size, (8, 12)).astype(np.int32)
C = 6
windows = rng.integers(0, cfg.vocab_size, (4, 16)).astype(np.int32)
stats = calibration.collect_statistics(cfg, params, windows, mode="parallel", batch_size=4,
                                       hessian=True)
out = {}
for shape in ((8, 1), (4, 2), (2, 4)):
  mesh = probe.probe_mesh(model=shape[1])
  runner = probe.ProbeRunner(cfg, params, seq, C, mesh, statistics=stats)
  res = {}
  work = {Component(layer, kind): [((layer, kind, a), a) for a in (8.0, 512.0, 2000.0)]
          for kind in KINDS for layer in range(cfg.num_layers)}
  calls = [(probe.MethodFamily("magnitude"), slots)
           for slots in probe.schedule(work, runner.num_devices, 3, runner.uniform)]
  for slots, outs in runner.stream(calls):  # one compile for all kinds
    for slot, o in zip(slots, outs):
      for j, key in enumerate(slot.keys):  # a component's levels may span several slots
        res[f"magnitude:{slot.component.name}:{key[2]:g}"] = {
            k: np.asarray(v[j]).tolist() for k, v in o.items()}
  comp = Component(1, "gate")
  r = runner.run(comp, probe.MethodFamily("wanda"), [16.0, 48.0])
  res["wanda"] = {k: np.asarray(v).tolist() for k, v in r.items()}
  fam = probe.split_method(__import__("dtm").compress.parse_method("sparsegpt(0.5)"))[0]
  r = runner.run(Component(0, "down"), fam, [0.5, 0.75])
  res["sparsegpt"] = {k: np.asarray(v).tolist() for k, v in r.items()}
  out["x".join(map(str, shape))] = res
print(json.dumps(out))
"""


def test_2d_mesh_equals_1d_mesh():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  ref = results["8x1"]
  diverged = sum(int(np.sum(np.asarray(r["fdt"]) < 6)) for r in ref.values())
  assert diverged > 0, "no probe diverged: the comparison would not discriminate"
  for shape in ("4x2", "2x4"):
    for name, r in results[shape].items():
      for key in ("fdt", "sdt", "top1_agree"):
        assert np.array_equal(r[key], ref[name][key]), (shape, name, key)
      for key, atol in (("nll", 1e-5), ("sparsity", 0), ("kl", 1e-4)):  # kl: ~0 minus ~0
        np.testing.assert_allclose(r[key], ref[name][key], rtol=1e-5, atol=atol,
                                   err_msg=f"{shape} {name} {key}")
