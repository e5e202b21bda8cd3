"""The quantization search job on a tiny random Llama: ranking probes, search decisions,
recipe reproduced by the evaluate job, two SIGKILLs -> same recipes, bad inputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_model
from conftest import REPO
from dtm.cli import run_job
from dtm.errors import DtmError
from dtm.jobs import quantize
from dtm.search import quant_search

N = 8
ARGS = ("--config.search.rank_by=('fdt','dppl','random')", "--config.search.bounds=(6.0,4.0)",
        "--config.search.method_args=granularity=tensor", "--config.search.levels=(3,)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tinyq")
  tiny_model.write_tiny_model(str(root / "model"))
  tiny_model.write_prompts(str(root / "heldout.jsonl"), num=6, length=12, seed=1)
  tiny_model.write_prompts(str(root / "select.jsonl"), num=6, length=12, seed=2)
  return {"root": root, "model": str(root / "model"), "heldout": str(root / "heldout.jsonl"),
          "select": str(root / "select.jsonl"), "cache": str(root / "jax-cache")}


def _command(tiny, workdir, *extra):
  return [sys.executable, "main.py", "--config=configs/quantize.py:runlocal",
          f"--workdir={workdir}", f"--config.model={tiny['model']}",
          f"--config.prompts.jsonl={tiny['heldout']}",
          f"--config.search.selection_jsonl={tiny['select']}",
          f"--config.prompts.new_tokens={N}", "--config.cpu_devices=1", *ARGS, *extra]


def _env(tiny):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=tiny["cache"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _run(tiny, workdir, *extra, check=True):
  p = subprocess.run(_command(tiny, workdir, *extra), cwd=REPO, env=_env(tiny),
                     capture_output=True, text=True, timeout=600)
  if check:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  return p


@pytest.fixture(scope="module")
def reference(tiny):
  workdir = tiny["root"] / "reference"
  _run(tiny, workdir)
  return workdir


def _searches(workdir):
  return [json.loads(l) for l in Path(workdir, "searches.jsonl").read_text().splitlines()]


def test_search_decisions_and_recipe(tiny, reference):
  searches = _searches(reference)
  assert [(s["rank_by"], s["bound"]) for s in searches] == [
      (r, b) for r in ("fdt", "dppl", "random") for b in (6.0, 4.0)]
  evals = {json.loads(l)["probe"]: json.loads(l)["aggregate"]
           for l in Path(reference, "evals", "probes.jsonl").read_text().splitlines()}
  for s in searches:
    accepted = set()
    for step in s["steps"]:  # every decision follows the bound on the stored evaluation
      agg = evals[step["spec"]]
      assert step["accepted"] == (agg["fdt_alpha_0.9"] >= s["bound"])
      if step["accepted"]:
        accepted.add(step["component"])
    assert len(accepted) == s["components"]
    assert s["aggregate"]["fdt_alpha_0.9"] >= s["bound"]
    assert 0 < s["share"] <= 1
  # the stricter bound's accepted set is a prefix decision sequence of the same ranking:
  # both searches try the components in the same order
  for r in ("fdt", "dppl", "random"):
    by = {s["bound"]: s for s in searches if s["rank_by"] == r}
    assert [st["component"] for st in by[4.0]["steps"]] == [st["component"] for st in by[6.0]["steps"]]
  # the FDT ranking is the probe order: descending FDT_0.9 of the single-component probes
  rows = [json.loads(l) for l in Path(reference, "probe-3", "probes.jsonl").read_text().splitlines()]
  order = quant_search.rank([{"component": r["component"], "aggregate": r["aggregate"]}
                             for r in rows], "fdt", 0.9)
  fdts = [next(r["aggregate"]["fdt_alpha_0.9"] for r in rows if r["component"] == c) for c in order]
  assert fdts == sorted(fdts, reverse=True)
  first = searches[0]
  assert [st["component"] for st in first["steps"]] == order[:len(first["steps"])]


def test_recipe_reproduced_by_the_evaluate_job(tiny, reference, tmp_path):
  recipe = Path(reference, "recipe.txt").read_text().strip()
  from configs import evaluate as evaluate_config
  config = evaluate_config.get_config("runlocal")
  config.model = tiny["model"]
  config.prompts.jsonl = tiny["heldout"]
  config.prompts.new_tokens = N
  config.prompts.length = 12
  config.compression = recipe
  assert run_job(config, str(tmp_path / "eval")) == 0
  res = json.loads(Path(tmp_path, "eval", "results.json").read_text())
  assert res["aggregate"]["fdt_alpha_0.9"] == _searches(reference)[0]["aggregate"]["fdt_alpha_0.9"]


def test_two_sigkills_then_same_recipes(tiny, reference):
  workdir = tiny["root"] / "killed"
  evals = Path(workdir, "evals", "probes.jsonl")
  for target in (2, 6):  # kill once during the ranking probes or early search, once later
    proc = subprocess.Popen(_command(tiny, workdir), cwd=REPO, env=_env(tiny),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if evals.exists() and evals.read_bytes().count(b"\n") >= target:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  _run(tiny, workdir)
  strip = lambda ss: [{k: v for k, v in s.items()} for s in ss]
  assert strip(_searches(workdir)) == strip(_searches(reference))
  assert Path(workdir, "recipe.txt").read_text() == Path(reference, "recipe.txt").read_text()


def _config(tiny, **overrides):
  from configs import quantize as quantize_config
  config = quantize_config.get_config("runlocal")
  config.model = tiny["model"]
  config.prompts.jsonl = tiny["heldout"]
  config.prompts.length = 12
  config.search.selection_jsonl = tiny["select"]
  config.prompts.new_tokens = N
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_llm_int8_search_ranks_by_evaluation(tiny, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  config = _config(tiny, **{"search.method": "llm_int8", "search.levels": (2.0,),
                            "search.method_args": "", "search.rank_by": ("fdt",),
                            "search.bounds": (8.0,), "search.kinds": "q,down",
                            "search.layers": "0,2"})
  assert run_job(config, str(tmp_path / "int8")) == 0
  res = json.loads(Path(tmp_path, "int8", "results.json").read_text())
  assert res["methods"] == ["llm_int8(threshold=2.0)"]
  ranked = Path(tmp_path, "int8", "rank-2", "probes.jsonl").read_text().splitlines()
  assert len(ranked) == 4
  s = res["searches"][0]
  assert s["aggregate"]["fdt_alpha_0.9"] >= 8.0  # bound N: only harmless components kept
  assert all(json.loads(l)["probe"] in {"L00.q", "L00.down", "L02.q", "L02.down"} for l in ranked)


@pytest.mark.parametrize("overrides, needle", [
    ({"search.bounds": (9.0,)}, "outside 0..8"),
    ({"search.rank_by": ("perplexity",)}, "rank_by"),
    ({"search.levels": ()}, "levels is empty"),
    ({"search.levels": (9,)}, "bits must be in"),
    ({"search.method": "magnitude"}, "quantization method"),
    ({"search.method": "w8a8", "search.levels": (8, 4)}, "w8a8 has no level"),
    ({"search.selection_jsonl": ""}, "selection_jsonl"),
    ({"search.selection_jsonl": "HELDOUT"}, "selection prompts equal held-out"),
])
def test_bad_inputs(tiny, tmp_path, capsys, monkeypatch, overrides, needle):
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  overrides = {k: (tiny["heldout"] if v == "HELDOUT" else v) for k, v in overrides.items()}
  with pytest.raises(SystemExit) as exc:
    run_job(_config(tiny, **overrides), str(tmp_path / "bad"))
  assert exc.value.code == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and needle in err[0], err
