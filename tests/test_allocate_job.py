"""The allocate job (FDT-guided allocation) end to end on a tiny random Llama with
SmolLM2's tokenizer and real WikiText-2 text: outputs and phase timings, the chosen
allocation meets each target, recipe.txt given to the evaluate job reproduces the held-out
numbers exactly, a SIGKILLed run resumes to the same recipe, and bad inputs fail with one
line (exit 2) before any model pass."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, SHARED
from dtm import compress, convert, gguf_io
from dtm.errors import DtmError
from dtm.model import init_params
from dtm.model_config import ModelConfig

TINY = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=256)
VALID = str(SHARED / "data" / "wikitext-2" / "wiki.valid.tokens")
TEST = str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw")
OVERRIDES = {"calibration.data_files": VALID, "select.data.data_files": VALID,
             "data.data_files": TEST}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("tiny") / "model")
  params = init_params(TINY, seed=1)
  params = {**params, "lm_head": jax.tree.map(lambda x: x * 50.0, params["lm_head"])}
  convert.export_hf(params, TINY, directory,
                    tokenizer=gguf_io.gguf_tokenizer(gguf_io.find_smollm2_gguf()))
  return directory


def _set(config, overrides):
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def make_config(model_dir: str, **overrides):
  from configs import allocate as allocate_config
  return _set(allocate_config.get_config("runlocal"),
              {"model": model_dir, **OVERRIDES, **overrides})


def cli_args(model_dir: str, **overrides) -> list[str]:
  items = {"model": model_dir, **OVERRIDES, **overrides}
  return [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
          for k, v in items.items()]


def env() -> dict:
  # DTM_ESTIMATE=0: no preflight compile before each of the killed runs (the plan it
  # compiles is the dry run's, tests/test_dry_run.py)
  return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
          "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false", "DTM_ESTIMATE": "0"}


def main_cmd(workdir, args, config="configs/allocate.py:runlocal") -> list[str]:
  return [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}", *args]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
  from dtm.jobs import allocate as allocate_job
  workdir = str(tmp_path_factory.mktemp("allocate") / "reference")
  return workdir, allocate_job.run(make_config(tiny_dir), workdir)


def test_outputs_targets_and_phases(reference):
  workdir, results = reference
  for name in ("recipe.txt", "recipe-0.3.txt", "recipe-0.5.txt", "allocation.png",
               "prediction.png", "results.json", "probe/probes.jsonl"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert set(results["phase_seconds"]) == {"statistics", "probes", "candidates", "apply"}
  assert [t["target"] for t in results["targets"]] == [0.3, 0.5]
  for t in results["targets"]:
    assert abs(t["sparsity"] - t["target"]) < 0.01  # rates per row / block round down
    assert len(t["candidates"]) == 4  # costs kl, fdt x units component, layer
    best = min(c["selection"]["dppl"] for c in t["candidates"])
    assert t["selection"]["dppl"] == best  # chosen on the selection prompts
    spec = compress.parse_spec(t["chosen"]["spec"])
    rates = {m.kwargs["rate"] for m in spec.resolve(TINY.num_layers).values()}
    assert all(m.name == "sparsegpt" for m in spec.resolve(TINY.num_layers).values())
    assert len(rates) > 1  # not uniform
  # every probe is stored with its per-prompt values: 14 components x 3 rates
  with open(os.path.join(workdir, "probe", "probes.jsonl")) as f:
    assert sum(1 for _ in f) == 14 * 3
  with open(os.path.join(workdir, "recipe.txt")) as f:
    assert f.read().strip() == results["targets"][0]["chosen"]["spec"]


def test_recipe_reproduces_heldout_with_evaluate_job(reference, tiny_dir, tmp_path):
  from configs import evaluate as evaluate_config
  from dtm.jobs import evaluate as evaluate_job
  workdir, results = reference
  alloc = make_config(tiny_dir)
  config = evaluate_config.get_config("runlocal")
  with open(os.path.join(workdir, "recipe.txt")) as f:
    recipe = f.read().strip()
  for block in ("data", "prompts", "ppl", "calibration"):
    config[block] = alloc[block]
  config.alphas, config.kl = alloc.alphas, alloc.kl
  _set(config, {"model": tiny_dir, "compression": recipe})
  got = evaluate_job.run(config, str(tmp_path / "eval"))
  want = results["targets"][0]["heldout"]
  for key, value in want.items():
    if key == "ppl":
      assert got["ppl"]["compressed"]["ppl"] == value
    else:
      assert got["aggregate"][key] == value, key


def _run_until(workdir, args, log_path, ready, delay: float) -> int:
  with open(log_path, "w") as log:
    p = subprocess.Popen(main_cmd(workdir, args), cwd=REPO, env=env(), stdout=log,
                         stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
      if ready():
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        break
      time.sleep(0.01)
    return p.wait()


def _lines(path) -> int:
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for _ in f)


def test_sigkill_then_resume_gives_the_same_recipe(reference, tiny_dir, tmp_path):
  """SIGKILL during the probes (after the first records), then again during the
  candidates; the third run finishes with the reference's recipes and held-out numbers."""
  ref_dir, ref = reference
  workdir = str(tmp_path / "killed")
  args = cli_args(tiny_dir)
  probes = os.path.join(workdir, "probe", "probes.jsonl")
  code = _run_until(workdir, args, tmp_path / "log1", lambda: _lines(probes) >= 1, 0.1)
  assert code == -signal.SIGKILL, "the first run ended before the kill"
  assert 0 < _lines(probes) < 42
  select = os.path.join(workdir, "select", "probes.jsonl")
  code = _run_until(workdir, args, tmp_path / "log2", lambda: _lines(select) >= 1, 0.0)
  assert code == -signal.SIGKILL, "the second run ended before the kill"
  proc = subprocess.run(main_cmd(workdir, args), cwd=REPO, env=env(), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    got = json.load(f)
  for a, b in zip(got["targets"], ref["targets"]):
    assert a["chosen"] == b["chosen"] and a["heldout"] == b["heldout"]
  with open(os.path.join(workdir, "recipe.txt")) as f, \
       open(os.path.join(ref_dir, "recipe.txt")) as g:
    assert f.read() == g.read()


@pytest.mark.parametrize("overrides, message", [
    ({"allocate.ladder": (0.5, 0.25)}, "strictly increasing"),
    ({"allocate.ladder": (0.5, 1.0)}, r"rates in \(0, 1\)"),
    ({"allocate.targets": (0.8,)}, r"0.8 cannot be reached with the ladder"),
    ({"allocate.operator": "gptq"}, "allocate.operator must be one of wanda, sparsegpt"),
    ({"allocate.costs": ("ppl",)}, "allocate.costs has 'ppl'"),
    ({"calibration.data_files": ""}, "sparsegpt needs calibration data"),
    ({"calibration.source": ""}, "sparsegpt needs calibration data"),
    ({"calibration.mode": "parallel"}, "set calibration.mode=sequential"),
    ({"allocate.bands": ()}, "allocate.bands must be a non-empty tuple"),
    ({"allocate.bands": (-0.1,)}, "allocate.bands must be a non-empty tuple"),
])
def test_bad_inputs_before_any_work(tiny_dir, tmp_path, overrides, message):
  from dtm.jobs import allocate as allocate_job
  start = time.perf_counter()
  with pytest.raises(DtmError, match=message):
    allocate_job.run(make_config(tiny_dir, **overrides), str(tmp_path / "w"))
  assert time.perf_counter() - start < 5  # refused before the model is loaded
  assert os.listdir(tmp_path / "w") == []


def test_bad_input_cli_one_line(tiny_dir, tmp_path):
  proc = subprocess.run(main_cmd(tmp_path / "w", cli_args(tiny_dir, **{
      "allocate.ladder": (0.5, 0.4)})), cwd=REPO, env=env(), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: allocate.ladder must be strictly increasing")
