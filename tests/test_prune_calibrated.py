"""The prune job with calibrated operators (`prune.method=wanda|sparsegpt`,
`dtm.search.increments`) on the tiny random Llama of test_prune_job: each round's
probes equal a direct evaluation of the candidate compressed with the CURRENT model's
statistics, a round's model is the chosen increments applied with sequential calibration
on the current model, Wanda keeps earlier zeros, a start recipe (refinement of a one-shot
allocation) is round 0, KL ranking picks the lowest-KL candidates, and bad settings fail
with one line before any work."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dtm import compress, evaluation, io_utils
from dtm.components import get_path, kernel_path, parse_component
from dtm.compress import calibration
from dtm.errors import DtmError
from dtm.loading import load_model
from dtm.search import increments, prune_rounds
from test_prune_job import make_config, rounds, tiny_dir  # noqa: F401 (fixture)

NO_TRAIN = {"train.steps": 0, "prune.k": 3}


def _selection(workdir):
  with open(os.path.join(workdir, "select", "prompts.jsonl")) as f:
    prompts = np.asarray([json.loads(line)["ids"] for line in f], np.int32)
  with open(os.path.join(workdir, "select", "references.jsonl")) as f:
    y = np.asarray([json.loads(line)["ids"] for line in f], np.int32)
  return prompts, np.concatenate([prompts, y], axis=1)


def _probes(workdir, r):
  with open(os.path.join(prune_rounds.round_dir(workdir, r), "probe", "probes.jsonl")) as f:
    return {rec["component"]: rec for rec in map(json.loads, f)}


def _windows(config, model):
  from dtm.jobs import common
  return common.calibration_data(config, model)[0]


@pytest.fixture(scope="module")
def wanda_run(tiny_dir, tmp_path_factory):
  from dtm.jobs import prune as prune_job
  workdir = str(tmp_path_factory.mktemp("wanda") / "run")
  config = make_config(tiny_dir, **NO_TRAIN, **{"prune.method": "wanda", "prune.max_rounds": 2})
  results = prune_job.run(config, workdir)
  return workdir, results, config


def test_wanda_probes_and_rounds_follow_the_current_model(wanda_run, tiny_dir):
  """Round r's probes equal wanda(level) of the candidate with the statistics of round
  r-1's model, evaluated directly; round r's model is round r-1's with the chosen
  increments applied by sequential calibration; earlier zeros stay zero."""
  workdir, results, config = wanda_run
  model = load_model(tiny_dir)
  windows = _windows(config, model)
  prompts, seq = _selection(workdir)
  recs = rounds(workdir)
  assert [r["round"] for r in recs] == [0, 1, 2] and results["stop_reason"] == "max_rounds"
  assert "wanda(rate=" in recs[-1]["spec"] and "statistics" in recs[1]["phase_seconds"]
  current = model.params
  for r in (1, 2):
    stats = calibration.collect_statistics(model.cfg, current, windows, mode="parallel",
                                           batch_size=4, hessian=False)
    probed = _probes(workdir, r)
    for name in list(probed)[:4]:
      rec = probed[name]
      comp = parse_component(name)
      direct, _ = compress.apply_spec(current, f"{comp.kind}@{comp.layer}:wanda({rec['level']})",
                                      calibration=stats)
      per = evaluation.divergence(model.cfg, direct, seq, prompts.shape[1], batch_size=8)
      assert per["fdt"].tolist() == rec["fdt"], (r, name)
      np.testing.assert_allclose(rec["aggregate"]["dppl"], np.exp(per["nll"].mean()), rtol=1e-4)
    step = {parse_component(c["component"]): c["level"] for c in recs[r]["chosen"]}
    want, _ = calibration.calibrate_and_compress(
        model.cfg, current, increments.Operator("wanda").spec(step), windows, batch_size=4)
    # only the last round's model is kept; every round's fingerprint is recorded
    assert io_utils.params_fingerprint(want) == recs[r]["params_fingerprint"], r
    got = want
    for name in recs[r - 1]["levels"]:  # wanda keeps the zeros of earlier rounds
      comp = parse_component(name)
      was = np.asarray(get_path(current, kernel_path(comp.kind))[comp.layer]) == 0
      now = np.asarray(get_path(got, kernel_path(comp.kind))[comp.layer]) == 0
      assert np.all(now[was]), name
    current = got
  final = load_model(os.path.join(workdir, "model")).params
  assert io_utils.params_fingerprint(final) == recs[-1]["params_fingerprint"]


def test_sparsegpt_refines_a_start_recipe_ranked_by_kl(tiny_dir, tmp_path):
  """prune.start: round 0 is F with the recipe applied (sequential SparseGPT); the rounds
  climb from its levels, ranked by KL; a rerun of the finished search resumes to the same
  records; the trained rounds keep the calibrated zeros (masks from the zeros)."""
  from dtm.jobs import common
  from dtm.jobs import prune as prune_job
  recipe = tmp_path / "recipe.txt"
  recipe.write_text("q,k@*:sparsegpt(rate=0.5); down@1:sparsegpt(rate=0.75)\n")
  config = make_config(tiny_dir, **{"prune.method": "sparsegpt", "prune.start": str(recipe),
                                    "prune.rank_by": "kl", "prune.k": 2, "prune.max_rounds": 2})
  workdir = str(tmp_path / "run")
  prune_job.run(config, workdir)
  recs = rounds(workdir)
  model = load_model(tiny_dir)
  start, _, _ = common.compress_model(config, model, recs[0]["spec"])
  assert recs[0]["levels"] == {"L00.k": 0.5, "L00.q": 0.5, "L01.down": 0.75, "L01.k": 0.5,
                               "L01.q": 0.5}
  assert recs[0]["params_fingerprint"] == io_utils.params_fingerprint(start)
  assert recs[0]["sparsity"] > 0.1
  for prev, cur in zip(recs, recs[1:]):
    assert cur["sparsity"] > prev["sparsity"]
    probed = _probes(workdir, cur["round"])
    prev_levels = prev["levels"]
    size = {n: np.prod(get_path(model.params, kernel_path(parse_component(n).kind)).shape[1:])
            for n in probed}
    kl = sorted((probed[n]["aggregate"]["kl_mean"]
                 / (size[n] * (probed[n]["level"] - prev_levels.get(n, 0.0))), n) for n in probed)
    assert [c["component"] for c in cur["chosen"]] == [n for _, n in kl[:2]]
    assert all("kl_mean" in c for c in cur["chosen"])
  final = load_model(os.path.join(workdir, "model")).params
  for name, level in recs[-1]["levels"].items():
    comp = parse_component(name)
    kernel = np.asarray(get_path(final, kernel_path(comp.kind))[comp.layer])
    assert np.mean(kernel == 0) >= level - 1.0 / kernel.shape[0], name
  before = open(os.path.join(workdir, "rounds.jsonl")).read()
  prune_job.run(config, workdir)  # finished: resumes to the same records
  assert open(os.path.join(workdir, "rounds.jsonl")).read() == before


def test_operator_specs_and_ids():
  c = parse_component
  op = increments.Operator("sparsegpt", "percdamp=0.02")
  assert op.spec({c("L01.q"): 0.5, c("L00.q"): 0.5, c("L00.down"): 0.25}) == (
      "q@0-1:sparsegpt(rate=0.5,percdamp=0.02,blocksize=128); "
      "down@0:sparsegpt(rate=0.25,percdamp=0.02,blocksize=128)")
  assert op.probe_id(c("L00.q"), 0.35) == "L00.q:sparsegpt(rate=0.35,percdamp=0.02,blocksize=128)"
  assert increments.Operator().probe_id(c("L00.q"), 0.5) == "L00.q:magnitude(0.5)"
  assert prune_rounds.spec_of({c("L00.q"): 0.5}) == "q@0:magnitude(rate=0.5)"


def test_last_round_stops_at_the_target():
  """The ranked increments are cut where the overall sparsity (by levels) reaches the
  target, so the last round does not overshoot it."""
  c = parse_component
  numel = {"q": 100, "down": 300, "_total": 2 * 100 + 2 * 300}
  levels = {c("L00.q"): 0.5}                         # 50 zeros of 800
  nxt = {c("L00.down"): 0.5, c("L01.q"): 0.5, c("L01.down"): 0.5, c("L00.q"): 0.75}
  ranked = [c("L01.q"), c("L00.down"), c("L01.down"), c("L00.q")]
  assert prune_rounds.to_target(ranked, levels, nxt, numel, 0.25) == ranked[:2]  # 250 >= 200
  assert prune_rounds.to_target(ranked, levels, nxt, numel, 0.1) == ranked[:1]   # 100 >= 80
  assert prune_rounds.to_target(ranked, levels, nxt, numel, 0.9) == ranked       # never reached


@pytest.mark.parametrize("overrides, message", [
    ({"prune.method": "gptq"}, "prune.method must be one of magnitude, wanda, sparsegpt"),
    ({"prune.method": "wanda", "prune.method_args": "rate=0.3"}, "must not set rate"),
    ({"prune.method": "sparsegpt", "prune.method_args": "bogus=1"}, "bogus"),
    ({"prune.rank_by": "ppl"}, "prune.rank_by must be one of fdt, kl"),
    ({"prune.method": "sparsegpt", "prune.start": "q@*:wanda(0.5)"},
     r"L00.q uses wanda\(rate=0.5.*\); a start recipe must use prune.method=sparsegpt"),
    ({"prune.method": "wanda", "prune.start": "/nonexistent/recipe.txt"},
     "neither a recipe file nor a spec"),
    ({"prune.method": "wanda", "prune.start": "q@*:wanda(0.5)", "prune.components": "mlp@*"},
     "prune.start prunes L00.q, which prune.components leaves out"),
    ({"prune.method": "wanda", "calibration.samples": 0}, "calibration.samples"),
])
def test_bad_inputs(tiny_dir, tmp_path, overrides, message):
  from dtm.jobs import prune as prune_job
  with pytest.raises(DtmError, match=message):
    prune_job.run(make_config(tiny_dir, **overrides), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "rounds.jsonl")
