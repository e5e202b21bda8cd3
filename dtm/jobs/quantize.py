"""Quantization search job (dtm.search.quant_search): rank components by single-component
probes on selection prompts, then grow the quantized set while held-out FDT_α >= bound.

Workdir: probe-<level>/ (the ranking probes: the probe job's own resumable store),
heldout/ (F's references on the held-out prompts), evals/ (every evaluated configuration,
keyed by its canonical spec, appended as soon as it is computed), searches.jsonl (one
line per finished (ranking, bound) search), recipe.txt (the spec of the first ranking at
the first bound: evaluate, train and convert accept it), results.json, share.png.
Killed at any moment and rerun with the same command, it replays every decision from
the stores and ends with the same recipes.
"""
from __future__ import annotations

import json
import logging
import os
import time

import ml_collections
import numpy as np

from dtm import compress, evaluation, io_utils
from dtm.components import get_path, kernel_path
from dtm.errors import DtmError
from dtm.jobs import common
from dtm.jobs import probe as probe_job
from dtm.search import quant_search
from dtm.sweep_store import ProbeStore

log = logging.getLogger("dtm")


# Weight quantization methods whose levels (bits) the probe sweep runs.
QUANT_METHODS: tuple[str, ...] = ("absmax", "rtn", "gptq")
# Activation methods (dtm.compress.act_quant): ranked by one held-out-style DTM pass per
# component on the selection prompts (the probe sweep's vmapped path does not run them).
# Their level: llm_int8's outlier threshold; w8a8 has none (give one stage, e.g. (8,)).
ACT_METHODS: tuple[str, ...] = ("w8a8", "llm_int8")


def _check(config) -> None:
  s = config.search
  n = int(config.prompts.new_tokens)
  if not s.levels:
    raise DtmError("search.levels is empty: give at least one stage (bits)")
  for b in s.bounds:
    if not 0 <= b <= n:
      raise DtmError(f"search bound {b:g} is outside 0..{n} (FDT_α is a token count of the "
                     f"N = prompts.new_tokens = {n} reference tokens)")
  if not s.bounds:
    raise DtmError("search.bounds is empty: give at least one FDT_α bound in tokens")
  if not 0 < s.alpha <= 1:
    raise DtmError(f"search.alpha must be in (0, 1], got {s.alpha}")
  for r in s.rank_by:
    if r not in quant_search.RANKINGS:
      raise DtmError(f"search.rank_by has {r!r}; expected a subset of "
                     f"{', '.join(quant_search.RANKINGS)}")
  if not s.rank_by:
    raise DtmError("search.rank_by is empty: give at least one ranking")
  if s.method not in QUANT_METHODS + ACT_METHODS:
    raise DtmError(f"search.method {s.method!r} is not a quantization method the search "
                   f"supports; expected one of {', '.join(QUANT_METHODS + ACT_METHODS)}")
  if s.method == "w8a8" and len(s.levels) != 1:
    raise DtmError("search.method=w8a8 has no level: give one stage, search.levels=(8,)")
  if s.patience < 0 or s.max_evals < 0:
    raise DtmError("search.patience and search.max_evals must be >= 0")


def method_text(config, level) -> str:
  s = config.search
  first = "" if s.method == "w8a8" else f"{level:g}"
  args = ", ".join(filter(None, [first, s.method_args]))
  return compress.parse_method(f"{s.method}({args})").to_string()


def _probe_config(config, level):
  from configs import probe as probe_config
  pc = probe_config.get_config()
  for key in ("model", "param_dtype", "dtype", "cpu_devices"):
    pc[key] = config[key]
  pc.data = ml_collections.ConfigDict(config.data.to_dict())
  pc.prompts = ml_collections.ConfigDict(config.prompts.to_dict())
  pc.prompts.seed = config.search.selection_seed
  if config.prompts.jsonl:
    if not config.search.selection_jsonl:
      raise DtmError("prompts.jsonl gives the held-out prompts; the ranking probes need other "
                     "prompts: set search.selection_jsonl")
    pc.prompts.jsonl = config.search.selection_jsonl
  pc.calibration = ml_collections.ConfigDict(config.calibration.to_dict())
  pc.calibration.mode = "parallel"  # single components of the original model
  pc.probe.method = config.search.method
  pc.probe.levels = (float(level),)
  pc.probe.method_args = config.search.method_args
  pc.probe.kinds = config.search.kinds
  pc.probe.layers = config.search.layers
  pc.probe.chunk_size = config.search.chunk_size
  pc.alphas = tuple(sorted({0.75, 0.9, float(config.search.alpha)}))
  pc.kl = True
  return pc


def run(config, workdir: str) -> dict:
  """The search (module docstring): scope, held-out references, ranking probes per stage,
  then one search per (ranking, bound) over the resumable store of evaluations."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  _check(config)
  s = config.search
  alpha, n = float(s.alpha), int(config.prompts.new_tokens)
  model = common.load(config)
  methods, comps, numel, total = _scope(config, model)
  calib = common.calibration_for(config, model, f"{s.kinds}@{s.layers}:{methods[0]}")
  ev = common.build_eval_data(config, model.tokenizer, need_ppl=False)
  y = common.references(config, model, ev.prompts, os.path.join(workdir, "heldout"))
  held = evaluation.HeldOut(model.cfg, model.params, ev.prompts, y,
                            batch_size=config.prompts.batch_size, alphas=(alpha,), kl=True)
  stages_rows = _rank_stages(config, model, comps, ev.prompts, workdir)
  identity = {"model": config.model, "model_source": model.source,
              "param_dtype": config.param_dtype, "dtype": config.dtype,
              "prompts": io_utils.array_fingerprint(ev.prompts), "new_tokens": n,
              "alpha": alpha, "calibration": None if calib is None else calib[1]}
  store = ProbeStore.open(os.path.join(workdir, "evals"), identity)
  base = held.evaluate(model.params)
  evaluate = _evaluator(config, model, held, calib, store, t0)
  searches = _searches(config, methods, stages_rows, numel, total, evaluate, base)
  return _finish(config, workdir, searches, methods, total, alpha, n, time.time() - t0)


def _scope(config, model):
  """(method string per stage, the components searched, {name: weights}, weights of every
  linear kind): the stages' specs validated against the model."""
  s = config.search
  num_layers, shapes = compress.kernel_shapes(model.params)
  methods = [method_text(config, lvl) for lvl in s.levels]
  scope = compress.validate(f"{s.kinds}@{s.layers}:{methods[0]}", num_layers, shapes)
  for m in methods[1:]:
    compress.validate(f"{s.kinds}@{s.layers}:{m}", num_layers, shapes)
  comps = list(scope.resolve(num_layers))
  numel = {c.name: int(np.prod(get_path(model.params, kernel_path(c.kind)).shape[1:]))
           for c in comps}
  total = sum(int(np.prod(get_path(model.params, kernel_path(k)).shape)) for k in shapes)
  return methods, comps, numel, total


def _rank_stages(config, model, comps, heldout_prompts, workdir: str) -> list[list[dict]]:
  """Per stage (level), the single-component rows the rankings read: the probe job on
  the selection prompts (resumable on its own), or for activation methods one DTM pass
  per component. DtmError if a selection prompt equals a held-out one."""
  s = config.search
  held = {r.tobytes() for r in heldout_prompts}
  stages_rows = []
  for lvl in s.levels:
    pc = _probe_config(config, lvl)
    sel = common.build_eval_data(pc, model.tokenizer, need_ppl=False).prompts
    overlap = len({r.tobytes() for r in sel} & held)
    if overlap:
      raise DtmError(f"{overlap} selection prompts equal held-out prompts; change "
                     f"search.selection_seed or prompts.seed")
    if s.method in ACT_METHODS:
      stages_rows.append(_rank_by_evaluation(pc, model, comps, method_text(config, lvl), sel,
                                             os.path.join(workdir, f"rank-{lvl:g}")))
      continue
    out = probe_job.run(pc, os.path.join(workdir, f"probe-{lvl:g}"))
    stages_rows.append([{"component": r["component"], "aggregate": r} for r in out["rows"]])
  return stages_rows


def _evaluator(config, model, held, calib, store: ProbeStore, t0: float):
  """spec text -> held-out aggregate, computed once per spec and appended to `store`."""
  counter = {"new": 0}

  def evaluate(text: str) -> dict:
    if text not in store.records:
      params_c, _, _ = common.compress_model(config, model, text, calib)
      agg = held.evaluate(params_c)
      store.add([{"probe": text, "aggregate": agg}])
      counter["new"] += 1
      log.info("evaluated %d configurations (%.1f s/config)", len(store.records),
               (time.time() - t0) / max(1, counter["new"]))
    return store.records[text]["aggregate"]
  return evaluate


def _searches(config, methods, stages_rows, numel, total, evaluate, base) -> list[dict]:
  """One `quant_search.search` per (ranking, bound), in config order -> their records."""
  s = config.search
  alpha = float(s.alpha)
  searches = []
  for rank_by in s.rank_by:
    stages = [(m, quant_search.rank(rows, rank_by, alpha, s.seed))
              for m, rows in zip(methods, stages_rows)]
    for bound in s.bounds:
      t1 = time.time()
      res = quant_search.search(stages, numel, total, evaluate, alpha=alpha, bound=float(bound),
                                patience=int(s.patience), base_aggregate=base,
                                max_evals=int(s.max_evals) or None)
      searches.append({"rank_by": rank_by, "bound": float(bound), "share": res.share,
                       "components": len(res.assignment), "spec": res.spec,
                       "evaluated": len(res.steps), "aggregate": res.aggregate,
                       "steps": res.steps})
      print(f"search rank_by={rank_by} bound={bound:g}: {len(res.assignment)} components, "
            f"{res.share:.1%} of linear params, FDT_{alpha:g}="
            f"{res.aggregate[f'fdt_alpha_{alpha:g}']:.0f} ({len(res.steps)} configurations, "
            f"{time.time() - t1:.1f} s)", flush=True)
  return searches


def _rank_by_evaluation(pc, model, comps, method: str, prompts, rdir: str) -> list[dict]:
  """Single-component aggregates of `method` on the selection prompts, one DTM pass per
  component (the evaluate job's path), each appended to rdir/probes.jsonl when done."""
  y = common.references(pc, model, prompts, rdir)
  held = evaluation.HeldOut(model.cfg, model.params, prompts, y,
                            batch_size=pc.prompts.batch_size, alphas=tuple(pc.alphas), kl=True)
  store = ProbeStore.open(rdir, {"model_source": model.source, "method": method,
                                 "prompts": io_utils.array_fingerprint(prompts),
                                 "new_tokens": int(pc.prompts.new_tokens)})
  t0, done = time.time(), 0
  for comp in comps:
    if comp.name in store.records:
      continue
    params_c, _ = compress.apply_spec(model.params, f"{comp.kind}@{comp.layer}:{method}")
    store.add([{"probe": comp.name, "component": comp.name, "aggregate": held.evaluate(params_c)}])
    done += 1
    left = sum(c.name not in store.records for c in comps)
    log.info("ranking %s: %d/%d components (%.1f s each, ETA %.0f s)", method,
             len(comps) - left, len(comps), (time.time() - t0) / done,
             (time.time() - t0) / done * left)
  return [store.records[c.name] for c in comps]


def _finish(config, workdir, searches, methods, total, alpha, n, seconds) -> dict:
  io_utils.atomic_write_text(os.path.join(workdir, "searches.jsonl"), "".join(
      json.dumps(r, separators=(",", ":")) + "\n" for r in searches))
  io_utils.atomic_write_text(os.path.join(workdir, "recipe.txt"), searches[0]["spec"] + "\n")
  table = _table(searches, alpha)
  io_utils.atomic_write_text(os.path.join(workdir, "summary.txt"), table + "\n")
  _plot(os.path.join(workdir, "share.png"), searches, alpha, n, config.model, methods)
  results = {"job": "quantize", "model": config.model, "methods": methods,
             "linear_params": total, "alpha": alpha, "new_tokens": n,
             "searches": [{k: v for k, v in r.items() if k != "steps"} for r in searches],
             "recipe": searches[0]["spec"], "config": common.config_json(config),
             "seconds": round(seconds, 1)}
  io_utils.atomic_write_json(os.path.join(workdir, "results.json"), results)
  print(table)
  print(f"recipe ({searches[0]['rank_by']}, bound {searches[0]['bound']:g}): "
        f"{os.path.join(workdir, 'recipe.txt')}")
  return results


def _table(searches, alpha) -> str:
  rows = [("ranking", "bound", "components", "share", f"FDT_{alpha:g}", "DPPL", "evaluated")]
  for r in searches:
    a = r["aggregate"]
    rows.append((r["rank_by"], f"{r['bound']:g}", str(r["components"]), f"{r['share']:.1%}",
                 f"{a[f'fdt_alpha_{alpha:g}']:.0f}", f"{a['dppl']:.3f}", str(r["evaluated"])))
  w = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(v.rjust(w[i]) if i else v.ljust(w[i]) for i, v in enumerate(x))
                   for x in rows)


def _plot(path, searches, alpha, n, model, methods) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for rank_by in dict.fromkeys(r["rank_by"] for r in searches):
    pts = sorted((r["bound"], r["share"]) for r in searches if r["rank_by"] == rank_by)
    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=rank_by)
  ax.set_xlabel(f"bound on held-out FDT_{alpha:g} (tokens of N={n})")
  ax.set_ylabel("linear parameters quantized (%)")
  ax.set_title(f"{model}: {' then '.join(methods)}", fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(title="ranking")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
