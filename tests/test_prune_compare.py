"""The prune-compare job on a tiny random Llama (SmolLM2 tokenizer, WikiText-2 text): the
FDT-guided rows are the prune run's rounds, one-shot rows equal evaluating the spec, the
trained rows get the FDT-guided budget and keep their zeros, a rerun recomputes nothing."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from test_prune_job import OVERRIDES, TRAIN_FILE, tiny_dir  # noqa: F401 (fixture)
from dtm.cli import run_job
from dtm.errors import DtmError
from dtm.jobs import common, prune_compare
from dtm.loading import load_model


def make_config(model_dir, **overrides):
  from configs import prune_compare as cfg_module
  config = cfg_module.get_config("runlocal")
  items = {"model": model_dir, **OVERRIDES, "calibration.data_files": TRAIN_FILE,
           "prune.ladder": (0.25, 0.5), "compare.sparsities": (0.05, 0.1),
           "compare.methods": ("magnitude", "wanda"), **overrides}
  for key, value in items.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_prune_compare_rows(tiny_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  workdir = str(tmp_path / "cmp")
  config = make_config(tiny_dir)
  assert run_job(config, workdir) == 0
  res = json.load(open(os.path.join(workdir, "results.json")))
  rounds = [json.loads(l) for l in open(os.path.join(workdir, "fdt", "rounds.jsonl"))]
  rows = res["rows"]
  for s in (0.05, 0.1):
    fdt = next(r for r in rows if r["target"] == s and r["method"] == "fdt-guided")
    first = next(r for r in rounds if r["sparsity"] >= s)
    assert fdt["sparsity"] == first["sparsity"] and fdt["dppl"] == first["heldout"]["dppl"]
    assert fdt["train_steps"] == first["round"] * config.train.steps
    for m in ("magnitude", "wanda"):
      one = next(r for r in rows if r["target"] == s and r["method"] == m and r["variant"] == "one-shot")
      # per-matrix (magnitude) or per-row (wanda) rounding down: at most 1/in below s
      assert s - 1 / 32 - 1e-9 <= one["sparsity"] <= s + 1e-9
      trained = [r for r in rows if r["target"] == s and r["method"] == m and r["variant"] == "trained"]
      assert len(trained) == 1 and trained[0]["train_steps"] == fdt["train_steps"]
      assert trained[0]["sparsity"] >= one["sparsity"] - 1e-9  # zeros kept through training
  # a one-shot row is the evaluate path of its spec on the same held-out set
  model = load_model(tiny_dir)
  from dtm import evaluation, data
  ev = common.build_eval_data(config.eval, model.tokenizer)
  y = data.read_prompt_jsonl(os.path.join(workdir, "fdt", "heldout", "references.jsonl"))
  held = evaluation.HeldOut(model.cfg, model.params, ev.prompts, y,
                            batch_size=config.eval.prompts.batch_size, alphas=(0.75, 0.9),
                            ppl_tokens_WT=ev.ppl.tokens, ppl_ctx_W=ev.ppl.ctx_len)
  params, _, _ = common.compress_model(config, model, "*@*:wanda(0.1)")
  agg = held.evaluate(params)
  row = next(r for r in rows if r["target"] == 0.1 and r["method"] == "wanda" and r["variant"] == "one-shot")
  assert row["fdt_mean"] == agg["fdt_mean"] and row["ppl"] == pytest.approx(agg["ppl"], rel=1e-6)
  lines = open(os.path.join(workdir, "compare", "probes.jsonl")).read()
  assert run_job(config, workdir) == 0  # finished: rerun only rewrites outputs
  assert open(os.path.join(workdir, "compare", "probes.jsonl")).read() == lines
  assert os.path.exists(os.path.join(workdir, "comparison.png"))


def test_specs_and_recipe_rows(tiny_dir, tmp_path, monkeypatch):
  """Without the FDT-guided run: a uniform row, an OWL row from compare.specs and an
  allocate-style recipe row, each equal to evaluating its spec; with a wall time."""
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  recipes = tmp_path / "alloc"
  recipes.mkdir()
  for s, (lo, hi) in {0.05: (0.0, 0.1), 0.1: (0.05, 0.15)}.items():
    (recipes / f"recipe-{s:g}.txt").write_text(
        f"q,k,v,o@*:wanda(rate={hi}); gate,up,down@*:wanda(rate={lo})\n")
  (recipes / "results.json").write_text(json.dumps({"operator": "wanda"}))
  workdir = str(tmp_path / "cmp")
  config = make_config(tiny_dir, **{"compare.fdt_guided": False, "compare.methods": ("wanda",),
                                    "compare.specs": ("owl-wanda=owl({s}, method=wanda)",),
                                    "compare.recipes": str(recipes)})
  assert run_job(config, workdir) == 0
  rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
  assert [(r["target"], r["method"]) for r in rows] == [
      (s, m) for s in (0.05, 0.1) for m in ("wanda", "owl-wanda", "fdt-alloc-wanda")]
  assert not os.path.exists(os.path.join(workdir, "fdt", "rounds.jsonl"))
  assert all(r["variant"] == "one-shot" and r["seconds"] > 0 for r in rows)
  model = load_model(tiny_dir)
  from dtm import evaluation, data
  ev = common.build_eval_data(config.eval, model.tokenizer)
  y = data.read_prompt_jsonl(os.path.join(workdir, "fdt", "heldout", "references.jsonl"))
  held = evaluation.HeldOut(model.cfg, model.params, ev.prompts, y,
                            batch_size=config.eval.prompts.batch_size, alphas=(0.75, 0.9),
                            ppl_tokens_WT=ev.ppl.tokens, ppl_ctx_W=ev.ppl.ctx_len)
  for method, spec in (("owl-wanda", "*@*:owl(0.1, method=wanda)"),
                       ("fdt-alloc-wanda", (recipes / "recipe-0.1.txt").read_text())):
    agg = held.evaluate(common.compress_model(config, model, spec)[0])
    row = next(r for r in rows if r["target"] == 0.1 and r["method"] == method)
    assert row["fdt_mean"] == agg["fdt_mean"] and row["ppl"] == pytest.approx(agg["ppl"], rel=1e-6)
  assert "owl-wanda" in open(os.path.join(workdir, "summary.txt")).read()
  _recipe_rows_reuse_the_allocate_records(config, workdir, recipes, tmp_path)


def _recipe_rows_reuse_the_allocate_records(config, workdir, recipes, tmp_path):
  """An allocate run's own held-out records (<recipes>/final) are taken when it used the
  same model, held-out set, PPL windows and calibration windows, and only then."""
  res = json.load(open(os.path.join(workdir, "results.json")))
  ident = json.load(open(os.path.join(workdir, "compare", "sweep.json")))["identity"]
  cal = {k: v for k, v in ident["calibration"].items() if k != "batch_size"}
  for name, heldout in (("same", ident["heldout"]), ("other", "0000000000000000")):
    alloc = tmp_path / f"alloc-{name}"
    (alloc / "final").mkdir(parents=True)
    records = []
    for s in (0.05, 0.1):
      spec = (recipes / f"recipe-{s:g}.txt").read_text()
      (alloc / f"recipe-{s:g}.txt").write_text(spec)
      agg = {k: v for k, v in res["rows"][0].items()
             if k not in ("target", "method", "variant", "sparsity", "train_steps", "seconds")}
      records.append({"probe": spec.strip(), "heldout": {**agg, "fdt_mean": 99.0},
                      "sparsity": s})
    (alloc / "final" / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (alloc / "final" / "sweep.json").write_text(json.dumps({"identity": {
        "params": ident["params"], "heldout": heldout, "calibration": cal,
        "mode": config.calibration.mode}}))
    (alloc / "results.json").write_text(json.dumps({
        "operator": "wanda", "data": {"heldout": res["heldout_settings"]},
        "config": {"alphas": [0.75, 0.9], "kl": bool(config.eval.kl)}}))
    config.compare.methods, config.compare.specs = (), ()
    config.compare.recipes = str(alloc)
    out = str(tmp_path / f"cmp-{name}")
    assert run_job(config, out) == 0
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    assert [r["method"] for r in rows] == ["fdt-alloc-wanda"] * 2
    reused = [r["fdt_mean"] == 99.0 for r in rows]
    assert reused == ([True, True] if name == "same" else [False, False]), (name, rows)


@pytest.mark.parametrize("overrides, needle", [
    ({"compare.sparsities": ()}, "empty"),
    ({"compare.sparsities": (0.5, 1.0)}, "(0, 1)"),
    ({"compare.methods": ("magnitude", "obs")}, "'obs'"),
    ({"compare.specs": ("owl(0.5)",)}, "'label=template'"),
    ({"compare.recipes": "/nonexistent"}, "no recipe for sparsity 0.05"),
    ({"compare.fdt_guided": False, "compare.methods": ()}, "nothing to compare"),
])
def test_bad_inputs(tiny_dir, overrides, needle):
  with pytest.raises(DtmError, match=None) as e:
    prune_compare._check(make_config(tiny_dir, **overrides))
  assert needle in str(e.value)
