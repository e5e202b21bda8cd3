"""`main.py --dry_run=TARGET` (`dtm.aot`): compile a job for a TPU slice on this CPU host.

  * a tiny model's probe, train, prune, allocate and prune_compare jobs compile for a
    v5e-4 slice (libtpu's topology descriptors, no TPU attached) and write dry_run.json
    with bytes per device, FLOPs and estimated time; the probe is also compiled on the 2-D ('probe', 'model') mesh;
  * a job that cannot fit exits 2 naming the function, the bytes needed and the HBM;
  * bad targets and models get one line and exit 2;
  * config errors are refused before any model pass (no reference generation, no
    calibration: the workdir stays empty and the refusal takes seconds).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
import tiny_model

pytest.importorskip("libtpu", reason="the dry run's TPU targets need the tpu extra (libtpu)")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  """A tiny random Llama (config.json + safetensors; the dry run reads config.json only)."""
  return tiny_model.write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def run_main(workdir, config: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "JAX_PLATFORMS": "cpu", "DTM_JAX_CACHE": ""}
  cmd = [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _payload(workdir) -> dict:
  with open(os.path.join(workdir, "dry_run.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("mesh_model", [1, 2])
def test_probe_dry_run_on_v5e(tmp_path, tiny_dir, mesh_model):
  proc = run_main(tmp_path, "configs/probe.py:runlocal", "--dry_run=v5e-4",
                  f"--config.model={tiny_dir}", "--config.probe.layers=*",
                  f"--config.probe.mesh_model={mesh_model}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = _payload(tmp_path)
  assert got["target"] == "v5e-4" and got["num_devices"] == 4 and got["fits"]
  names = [f["name"] for f in got["functions"]]
  assert names[:2] == ["reference generation", "probe base pass"]
  assert "probe chunk magnitude" in names
  for f in got["functions"]:
    assert f["argument_bytes"] > 0 and f["flops"] > 0 and f["fits"], f
    assert f["calls"] >= 1 and f["seconds"] > 0
  chunk = next(f for f in got["functions"] if f["name"] == "probe chunk magnitude")
  # 2 kinds x 3 layers x 2 levels: 1-D: 6 slots of 2 levels on 4 groups = 2 calls; 2-D:
  # one component per call, its 2 levels over the 2 groups = 6 calls (`probe.schedule`)
  assert chunk["calls"] == (2 if mesh_model == 1 else 6)
  assert "fits" in proc.stdout and "estimated" in proc.stdout


def test_train_and_prune_dry_run(tmp_path, tiny_dir):
  for config, extra in (("configs/train.py:runlocal", ["--config.train.mesh.data=1",
                                                       "--config.train.mesh.fsdp=-1"]),
                        ("configs/prune.py:runlocal", [])):
    extra = extra + ["--config.train.batch_size=4"]  # 4 data-parallel devices
    workdir = tmp_path / config.split("/")[1].split(".")[0]
    proc = run_main(workdir, config, "--dry_run=v5e-4", f"--config.model={tiny_dir}", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [f["name"] for f in _payload(workdir)["functions"]]
    assert "train step + teacher" in names and "teacher-forced DTM pass" in names
  assert "probe chunk magnitude" in names  # prune: the selection probes


def test_prune_dry_run_with_a_calibrated_operator(tmp_path, tiny_dir):
  """prune.method=sparsegpt: the probes' sparsegpt chunks per kind, and every round a
  statistics pass and a sequential apply (2 calibration passes of 3 layers) plus one solve
  per candidate and per applied increment."""
  proc = run_main(tmp_path, "configs/prune.py:runlocal", "--dry_run=v5e-4",
                  f"--config.model={tiny_dir}", "--config.train.batch_size=4",
                  "--config.prune.method=sparsegpt")
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = {f["name"]: f for f in _payload(tmp_path)["functions"]}
  assert "probe chunk sparsegpt down" in got, list(got)
  assert got["calibration layer pass"]["calls"] == 3 * 2 * 2  # layers x passes x rounds
  solve = next(f for name, f in got.items() if name.startswith("sparsegpt solve"))
  assert solve["calls"] == 21 * 2 + 2 * 2  # 21 components x rounds + k x rounds


@pytest.mark.parametrize("config, extra, expect", [
    ("configs/quantize.py:runlocal",
     ["--config.search.layers=*", "--config.search.method=gptq", "--config.search.levels=(4,)",
      "--config.search.max_evals=5", "--config.search.method_args="],
     ["reference generation", "level 4: probe chunk gptq down", "teacher-forced DTM pass",
      "calibration layer pass", "gptq solve down [64x128]"]),
    ("configs/compare.py:runlocal", [],
     ["sampled references", "sampled DTM pass", "perplexity windows", "compress q x1 magnitude"]),
    ("configs/lm_eval.py:runlocal", ["--config.compression=|mlp@*:nm(2,m=4)"],
     ["lm-eval packed forward", "lm-eval scores", "compress down x3 nm"]),
])
def test_evaluation_jobs_dry_run(tmp_path, tiny_dir, config, extra, expect):
  """quantize / compare / lm_eval compile the functions they run, calls from the config."""
  proc = run_main(tmp_path, config, "--dry_run=v5e-4", f"--config.model={tiny_dir}", *extra)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = {f["name"]: f for f in _payload(tmp_path)["functions"]}
  for name in expect:
    assert name in got and got[name]["fits"] and got[name]["argument_bytes"] > 0, (name, list(got))
  if config.startswith("configs/quantize"):  # min(5, levels x components x rankings x bounds)
    assert got["teacher-forced DTM pass"]["calls"] == 5 + 1  # ... + the original model
    assert got["calibration layer pass"]["calls"] == 5 * 3  # every layer, per configuration
  if config.startswith("configs/lm_eval"):
    assert got["lm-eval packed forward"]["calls"] == 2  # per spec, per batch (note)


def test_allocation_jobs_dry_run(tmp_path, tiny_dir):
  """allocate: the selection and held-out passes, the probe chunks per kind, and the
  calibration counted per phase (statistics once, each target's sequential apply; solves:
  probes x 7 kinds, candidates and applies x 21 components); prune_compare: each row's
  compression and held-out pass, the FDT-guided rounds' plan under its own prefix."""
  proc = run_main(tmp_path / "allocate", "configs/allocate.py:runlocal", "--dry_run=v5e-4",
                  f"--config.model={tiny_dir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = {f["name"]: f for f in _payload(tmp_path / "allocate")["functions"]}
  for name in ("selection reference generation", "probe chunk sparsegpt q",
               "selection teacher-forced DTM pass", "teacher-forced DTM pass", "perplexity windows"):
    assert got[name]["fits"] and got[name]["argument_bytes"] > 0, (name, list(got))
  # runlocal: 3 layers, ladder of 3, targets (0.3, 0.5), 2 costs x 2 units x 1 band
  assert got["calibration layer pass"]["calls"] == 3 * (1 + 2)
  assert got["sparsegpt solve down [64x128]"]["calls"] == 3 * 3 * 7 + 8 * 21 + 2 * 21
  assert got["selection teacher-forced DTM pass"]["calls"] == 8 + 1  # candidates + F
  assert got["teacher-forced DTM pass"]["calls"] == 2  # per target
  proc = run_main(tmp_path / "compare", "configs/prune_compare.py:runlocal", "--dry_run=v5e-4",
                  f"--config.model={tiny_dir}", "--config.train.batch_size=4")
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = {f["name"]: f for f in _payload(tmp_path / "compare")["functions"]}
  assert "fdt-guided: probe chunk magnitude" in got and "compress q x3 magnitude" in got
  # 2 sparsities x 3 methods, one-shot and trained: held-out passes of every row
  assert got["teacher-forced DTM pass"]["calls"] == 2 * 3 * 2
  assert got["calibration layer pass"]["calls"] == 3 * 2 * 2  # wanda, sparsegpt x 2
  assert got["train step + teacher"]["calls"] == 6 * got["fdt-guided: train step + teacher"]["calls"]


def test_refused_fit_names_function_and_bytes(tmp_path):
  """Llama-2-70B probes on a v5e-8 with the 1-D mesh (every chip a whole bf16 replica)."""
  proc = run_main(tmp_path, "configs/probe.py:model=llama2-70b", "--dry_run=v5e-8",
                  "--config.probe.mesh_model=1")
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("error: reference generation does not fit"), line
  assert "G" in line and "15.75G" in line, line  # the bytes needed and the HBM
  assert _payload(tmp_path)["fits"] is False  # the table is written before refusing


@pytest.mark.parametrize("target, match", [
    ("v9x-8", "unknown dry-run target"),
    ("v5e-12", "unknown TPU slice"),
    ("gpu:h900", "unknown dry-run target"),
    ("cpu:0", "bad device count"),
])
def test_bad_targets(tmp_path, tiny_dir, target, match):
  proc = run_main(tmp_path, "configs/probe.py:runlocal", f"--dry_run={target}",
                  f"--config.model={tiny_dir}")
  assert proc.returncode == 2
  assert match in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1000:]


def test_libtpu_topologies():
  """Every slice of the target table is a topology libtpu knows (v5e-1: one chip per
  host); a layout libtpu rejects is one DtmError naming it."""
  from dtm.aot import targets
  from dtm.errors import DtmError
  for name in ("v5e-1", "v6e-1", "v5e-256", "v4-8", "v5p-1024"):
    t = targets.parse_target(name)
    assert len(t.devices) == t.num_devices, name
  odd = targets.Target("v5e-9", "tpu", 9, 197e12, 1, topology="v5e:3x3")
  with pytest.raises(DtmError, match="libtpu does not know topology 'v5e:3x3'"):
    odd.devices


def test_libtpu_missing_names_the_extra(tmp_path, tiny_dir):
  """Without libtpu a TPU target is one line saying which extra to install."""
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "DTM_JAX_CACHE": ""}
  hide = ("import runpy, sys; sys.modules['libtpu'] = None; sys.argv = ['main.py', "
          f"'--config=configs/probe.py:runlocal', '--workdir={tmp_path}', '--dry_run=v5e-4', "
          f"'--config.model={tiny_dir}', '--config.probe.layers=*']; "
          "runpy.run_path('main.py', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", hide], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-1000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert "needs libtpu" in line and "pip install -e '.[tpu]'" in line, line


def test_model_without_architecture(tmp_path):
  proc = run_main(tmp_path, "configs/probe.py:runlocal", "--dry_run=v5e-4",
                  f"--config.model={tmp_path}/nowhere")
  assert proc.returncode == 2
  assert "no shipped architecture" in proc.stderr and "config.json" in proc.stderr


@pytest.mark.parametrize("override, match", [
    ("--config.compression=q@*:gptq(4)", "cannot be trained with fake quantization"),
    ("--config.train.steps=-1", "train.steps must be >= 1"),
])
def test_train_refusals_before_any_model_pass(tmp_path, override, match):
  """Tried on SmolLM2 as a new user would: refused in seconds, nothing generated."""
  start = time.perf_counter()
  proc = run_main(tmp_path, "configs/train.py", override, timeout=120)
  seconds = time.perf_counter() - start
  assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-1000:]
  assert not os.path.exists(tmp_path / "cache"), "references were generated before refusing"
  assert not os.path.exists(tmp_path / "ckpt")
  assert seconds < 60, f"refusal took {seconds:.0f} s"
