"""Allocate job: one sparsity per component, chosen from what single-component probes do
to F's generations (FDT-guided allocation, `dtm.search.allocation`).

  python main.py --config=configs/allocate.py --workdir=runs/allocate

Phases (seconds of each in results.json):
  1. statistics: the calibration windows' input statistics of the ORIGINAL model (parallel
     mode; the Hessian for sparsegpt);
  2. probes: every component alone at every rate of allocate.ladder with the operator, on
     the selection prompts (against F's references), resumable (<workdir>/probe);
  3. candidates: for every target, cost and unit (component / layer) the knapsack's rates,
     applied with the parallel statistics and measured on the selection prompts (resumable,
     <workdir>/select); per target the candidate with the best allocate.select_by is chosen
     (selection prompts only: the held-out prompts never choose anything);
  4. apply: the chosen recipe with config.calibration (sequential, as the evaluate job
     applies it), measured on the held-out prompts and PPL windows (<workdir>/final).
Outputs: recipe.txt (the first target's chosen spec; recipe-<target>.txt for each),
allocation.png (layers x kinds, colour = rate), prediction.png (the additive model's cost
against the measured cost of the combined model), results.json.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from dtm import compress, evaluation, io_utils, metrics, probe
from dtm.components import Component, get_path, kernel_path
from dtm.compress import calibration
from dtm.errors import DtmError
from dtm.jobs import common
from dtm.jobs import probe as probe_job
from dtm.search import allocation, plots, prune_rounds
from dtm.sweep_store import ProbeStore

OPERATORS = ("wanda", "sparsegpt")
UNITS = ("component", "layer")
SELECT_BY = {"fdt_mean": -1.0, "dppl": 1.0, "kl_mean": 1.0, "sdt_mean": 1.0}  # sign: lower wins


def check(config) -> None:
  """Every allocate-block error the job can know before loading anything (DtmError)."""
  a = config.allocate
  if a.operator not in OPERATORS:
    raise DtmError(f"allocate.operator must be one of {', '.join(OPERATORS)} (a calibrated "
                   f"pruning operator), got {a.operator!r}")
  ladder = [float(r) for r in a.ladder]
  if not ladder or any(not 0 < r < 1 for r in ladder):
    raise DtmError(f"allocate.ladder must hold rates in (0, 1), got {tuple(a.ladder)}")
  if any(b <= a_ for a_, b in zip(ladder, ladder[1:])):
    raise DtmError(f"allocate.ladder must be strictly increasing, got {tuple(a.ladder)}")
  if not a.targets:
    raise DtmError("allocate.targets is empty: give the overall sparsities to allocate")
  for t in a.targets:
    if not 0 < float(t) <= ladder[-1]:
      raise DtmError(f"allocate target sparsity {t:g} cannot be reached with the ladder "
                     f"{tuple(ladder)}: targets must lie in (0, {ladder[-1]:g}]")
  bad = [c for c in a.costs if c not in allocation.COSTS] or (["(none)"] if not a.costs else [])
  if bad:
    raise DtmError(f"allocate.costs has {bad[0]!r}; expected a non-empty subset of "
                   f"{', '.join(allocation.COSTS)}")
  bad = [u for u in a.units if u not in UNITS] or (["(none)"] if not a.units else [])
  if bad:
    raise DtmError(f"allocate.units has {bad[0]!r}; expected a non-empty subset of "
                   f"{', '.join(UNITS)}")
  if not a.bands or any(not 0 <= float(b) for b in a.bands):
    raise DtmError(f"allocate.bands must be a non-empty tuple of rates >= 0 (0: the uniform "
                   f"allocation, >= 1: unbounded), got {tuple(a.bands)}")
  if a.select_by not in SELECT_BY:
    raise DtmError(f"allocate.select_by must be one of {', '.join(SELECT_BY)}, got "
                   f"{a.select_by!r}")
  common.check_calibration_block(config.calibration, a.operator)
  if config.calibration.mode != "sequential":
    raise DtmError("allocate applies the chosen allocation as the references do: set "
                   f"calibration.mode=sequential (got {config.calibration.mode!r}); the probes "
                   "always use the original model's statistics")
  compress.parse_rule(f"{a.components}:identity")


class _Phases:
  def __init__(self):
    self.seconds: dict[str, float] = {}

  def add(self, name: str, start: float) -> None:
    self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  check(config)
  t0, phases = time.perf_counter(), _Phases()
  a = config.allocate
  model = common.load(config)
  cfg = model.cfg
  comps = prune_rounds.prunable(a.components, cfg.num_layers)
  sel = common.build_eval_data(config.select, model.tokenizer, need_ppl=False)
  ev = common.build_eval_data(config, model.tokenizer)
  prune_rounds.check_disjoint(sel.prompts, ev.prompts)
  y_sel = common.references(config.select, model, sel.prompts, os.path.join(workdir, "selection"))
  y_ev = common.references(config, model, ev.prompts, os.path.join(workdir, "heldout"))
  windows = common.calibration_data(config, model)
  seq_sel = np.concatenate([sel.prompts, y_sel], axis=1)
  c_sel = int(sel.prompts.shape[1])
  print(f"allocation: {a.operator} on {len(comps)} components x {len(a.ladder)} rates "
        f"{tuple(a.ladder)}, targets {tuple(a.targets)}, costs {tuple(a.costs)}, units "
        f"{tuple(a.units)}; {sel.prompts.shape[0]} selection prompts (c={c_sel}, N="
        f"{y_sel.shape[1]}), {ev.prompts.shape[0]} held-out prompts, {jax.device_count()} "
        f"device(s)", flush=True)
  ident = {"model_source": model.source, "params": io_utils.params_fingerprint(model.params),
           "select": io_utils.array_fingerprint(sel.prompts, y_sel), "operator": a.operator,
           "calibration": {k: v for k, v in windows[1].items() if k != "batch_size"}}
  state = _State(config, model, comps, windows, seq_sel, c_sel, phases)
  state.probe(workdir, ident)
  tables = state.tables()
  candidates = state.candidates(workdir, ident, tables)
  chosen = {t: _choose(candidates[t], a.select_by) for t in candidates}
  held = evaluation.HeldOut(
      cfg, model.params, ev.prompts, y_ev, batch_size=config.prompts.batch_size,
      alphas=tuple(config.alphas), kl=bool(config.kl),
      ppl_tokens_WT=None if ev.ppl is None else ev.ppl.tokens,
      ppl_ctx_W=None if ev.ppl is None else ev.ppl.ctx_len, ppl_batch_size=config.ppl.batch_size)
  finals = state.apply(workdir, ident, chosen, held, ev.prompts, y_ev)
  return _finish(config, workdir, state, tables, candidates, chosen, finals,
                 {"select": sel.settings, "heldout": ev.settings}, time.perf_counter() - t0)


class _State:
  """What the phases share: the model, the components, the selection set, statistics."""

  def __init__(self, config, model, comps, windows, seq_sel, c_sel, phases):
    self.config, self.model, self.comps, self.windows = config, model, comps, windows
    self.seq_sel, self.c_sel, self.phases = seq_sel, c_sel, phases
    self.a = config.allocate
    self.ladder = tuple(float(r) for r in self.a.ladder)
    self._stats = None
    _, shapes = compress.kernel_shapes(model.params)
    self.numel = {c: int(np.prod(shapes[c.kind])) for c in comps}
    self.alphas = tuple(sorted({float(x) for x in config.alphas}))
    self.base = None

  def stats(self):
    """The original model's input statistics on the calibration windows (once)."""
    if self._stats is None:
      start = time.perf_counter()
      c = self.config.calibration
      self._stats = calibration.collect_statistics(
          self.model.cfg, self.model.params, self.windows[0], mode="parallel",
          batch_size=c.batch_size, hessian=self.a.operator in compress.HESSIAN_METHODS,
          layers={comp.layer for comp in self.comps}, progress=True)
      self.phases.add("statistics", start)
    return self._stats

  def method(self, rate: float) -> compress.Method:
    extra = dict(item.split("=", 1) for item in self.a.operator_args.split(",") if item.strip())
    return compress.Method(self.a.operator, {"rate": rate, **extra})

  # ---------------------------------------------------------------------------- probes

  def probe(self, workdir: str, ident: dict) -> None:
    self.store = ProbeStore.open(os.path.join(workdir, "probe"), {
        **ident, "ladder": list(self.ladder), "operator_args": self.a.operator_args,
        "components": self.a.components})
    probes = [probe_job.Probe(c, self.method(r), r) for c in self.comps for r in self.ladder]
    todo = [q for q in probes if q.id not in self.store.records]
    print(f"probes: {len(probes)} ({len(probes) - len(todo)} done)", flush=True)
    if not todo:
      return
    stats = self.stats()
    start = time.perf_counter()
    mesh = probe.probe_mesh()
    runner = probe.ProbeRunner(self.model.cfg, self.model.params, self.seq_sel, self.c_sel,
                               mesh, kl=True, kinds=tuple(sorted({q.component.kind for q in todo})),
                               statistics=stats)
    per_device = -(-len(self.ladder) // runner.num_devices)
    if self.a.operator == "sparsegpt":  # one slot per component: one batched solve each
      per_device = len(self.ladder)
    probe_job._run_chunks(runner, todo, per_device, self.store, self.alphas, self.model.params,
                          True)
    self.phases.add("probes", start)

  def base_nll(self) -> float:
    """F's own mean NLL of its continuation on the selection prompts."""
    if self.base is None:
      cfg, params = self.model.cfg, self.model.params
      bs = int(self.config.select.prompts.batch_size)
      self.base_heads = evaluation.base_reference(cfg, params, self.seq_sel, self.c_sel, bs)
      per = evaluation.divergence(cfg, params, self.seq_sel, self.c_sel, bs, self.base_heads,
                                  desc="selection, F")
      self.base = float(np.mean(per["nll"]))
    return self.base

  def tables(self) -> dict[str, allocation.Table]:
    """cost -> per-component Table from the probe records."""
    base = self.base_nll()
    out = {}
    for cost in self.a.costs:
      raw = {c: [allocation.cost_of(_per_prompt(self.store.records[
          probe_job.Probe(c, self.method(r), r).id]), cost, base) for r in self.ladder]
             for c in self.comps}
      out[cost] = allocation.table(raw, self.ladder, self.numel)
    return out

  # ---------------------------------------------------------------------------- candidates

  def candidates(self, workdir: str, ident: dict, tables) -> dict[float, list[dict]]:
    """Per target, one record per (cost, unit): rates, recipe, predicted cost and the
    selection metrics of the recipe applied with the parallel statistics."""
    store = ProbeStore.open(os.path.join(workdir, "select"), ident)
    out: dict[float, list[dict]] = {}
    for target in (float(t) for t in self.a.targets):
      for cost, unit, band in self._variants():
        t = tables[cost] if unit == "component" else allocation.group_by_layer(tables[cost])
        try:
          rates = allocation.component_rates(t, allocation.solve_banded(t, target, band))
        except DtmError as e:  # a band too narrow for the ladder around this target
          print(f"target {target:g} cost {cost} per {unit} band {band:g}: skipped ({e})")
          continue
        spec = allocation.recipe(rates, self.a.operator, self.a.operator_args)
        if spec not in store.records:  # a spec two variants share is measured once
          store.add([{"probe": spec, **self._measure_selection(spec)}])
        rec = store.records[spec]
        out.setdefault(target, []).append({
            "target": target, "cost": cost, "unit": unit, "band": band, "spec": spec,
            "rates": {c.name: r for c, r in rates.items()},
            "predicted": {k: allocation.predicted_cost(tables[k], rates) for k in tables},
            **{k: rec[k] for k in ("selection", "measured", "sparsity")}})
        s = rec["selection"]
        print(f"target {target:g} cost {cost} per {unit} band {band:g}: selection mean FDT "
              f"{s['fdt_mean']:.2f}, DPPL {s['dppl']:.3f}, KL {s['kl_mean']:.4f} "
              f"(predicted {cost} {out[target][-1]['predicted'][cost]:.4f}, measured "
              f"{rec['measured'][cost]:.4f})", flush=True)
      if target not in out:
        raise DtmError(f"no allocation meets target {target:g} within allocate.bands "
                       f"{tuple(self.a.bands)} on the ladder {self.ladder}: widen a band")
    return out

  def _variants(self):
    """(cost, unit, band) of every candidate, widest band first (band >= 1: unbounded)."""
    bands = sorted((float(b) for b in self.a.bands), reverse=True)
    return [(cost, unit, band) for band in bands for cost in self.a.costs
            for unit in self.a.units]

  def _measure_selection(self, spec: str) -> dict:
    start = time.perf_counter()
    cfg = self.model.cfg
    params, _ = compress.apply_spec(self.model.params, spec, calibration=self.stats())
    bs = int(self.config.select.prompts.batch_size)
    self.base_nll()
    per = evaluation.divergence(cfg, params, self.seq_sel, self.c_sel, bs, self.base_heads,
                                desc="selection")
    per_prompt = {**per, "kl_mean": per["kl"].mean(-1)}
    rec = {"selection": metrics.aggregate(per, self.alphas),
           "measured": {k: allocation.cost_of(per_prompt, k, self.base) for k in allocation.COSTS},
           "sparsity": prune_rounds.linear_sparsity(params)["overall"]}
    self.phases.add("candidates", start)
    return rec

  # ---------------------------------------------------------------------------- apply

  def apply(self, workdir, ident, chosen, held, prompts, y) -> dict[float, dict]:
    """The chosen recipes applied with config.calibration (sequential), held-out metrics."""
    store = ProbeStore.open(os.path.join(workdir, "final"), {
        **ident, "heldout": io_utils.array_fingerprint(prompts, y),
        "mode": self.config.calibration.mode})
    out = {}
    for target, cand in chosen.items():
      if cand["spec"] not in store.records:
        start = time.perf_counter()
        params, report, _ = common.compress_model(self.config, self.model, cand["spec"],
                                                  self.windows)
        store.add([{"probe": cand["spec"], "heldout": held.evaluate(params),
                    "sparsity": prune_rounds.linear_sparsity(params)["overall"]}])
        self.phases.add("apply", start)
      out[target] = store.records[cand["spec"]]
      h = out[target]["heldout"]
      print(f"target {target:g} ({cand['cost']} per {cand['unit']}): sparsity "
            f"{out[target]['sparsity']:.4f}, held-out mean FDT {h['fdt_mean']:.2f}, DPPL "
            f"{h['dppl']:.3f}, PPL {h.get('ppl', float('nan')):.2f}", flush=True)
    return out


def _per_prompt(rec: dict) -> dict[str, np.ndarray]:
  pp = rec["per_prompt"]
  return {k: np.asarray(v) for k, v in pp.items()}


def _choose(cands: list[dict], select_by: str) -> dict:
  """The candidate with the best selection metric (ties: the earlier one)."""
  sign = SELECT_BY[select_by]
  return min(cands, key=lambda c: sign * c["selection"][select_by])


def _finish(config, workdir, state, tables, candidates, chosen, finals, data, seconds) -> dict:
  targets = list(chosen)
  for i, t in enumerate(targets):
    text = chosen[t]["spec"] + "\n"
    io_utils.atomic_write_text(os.path.join(workdir, f"recipe-{t:g}.txt"), text)
    if i == 0:
      io_utils.atomic_write_text(os.path.join(workdir, "recipe.txt"), text)
    title = (f"{config.model}: {state.a.operator} allocation at {t:g} ({chosen[t]['cost']} per "
             f"{chosen[t]['unit']}), rate per component")
    plots.sparsity_heatmap(os.path.join(workdir, f"allocation-{t:g}.png"),
                           chosen[t]["rates"], title)
    if i == 0:
      plots.sparsity_heatmap(os.path.join(workdir, "allocation.png"), chosen[t]["rates"], title)
  plots.prediction(os.path.join(workdir, "prediction.png"),
                              [c for t in targets for c in candidates[t]], config.model)
  results = {
      "job": "allocate", "model": config.model, "operator": state.a.operator,
      "ladder": list(state.ladder), "base_nll_selection": state.base,
      "targets": [{"target": t, "chosen": {k: chosen[t][k] for k in ("cost", "unit", "band", "spec")},
                   "heldout": finals[t]["heldout"], "sparsity": finals[t]["sparsity"],
                   "selection": chosen[t]["selection"],
                   "candidates": [{k: c[k] for k in ("cost", "unit", "band", "predicted",
                                                     "measured", "selection", "sparsity")}
                                  for c in candidates[t]]} for t in targets],
      "costs": {k: {"components": tables[k].names, "rates": tables[k].rates.tolist(),
                    "costs": np.round(tables[k].costs, 6).tolist()} for k in tables},
      "phase_seconds": state.phases.seconds, "seconds": round(seconds, 1), "data": data,
      "calibration": state.windows[1], "config": common.config_json(config)}
  io_utils.atomic_write_json(os.path.join(workdir, "results.json"), results)
  for t in targets:
    h = finals[t]["heldout"]
    print(f"{t:g}: {chosen[t]['cost']} per {chosen[t]['unit']} band {chosen[t]['band']:g}: "
          f"held-out FDT_"
          f"{state.alphas[0]:g}={h[f'fdt_alpha_{state.alphas[0]:g}']:g} mean FDT "
          f"{h['fdt_mean']:.2f} SDT {h['sdt_mean']:.3f} DPPL {h['dppl']:.3f} PPL "
          f"{h.get('ppl', float('nan')):.2f}")
  print(f"phase seconds: {state.phases.seconds}; results: {workdir}/results.json, recipe.txt, "
        f"allocation.png, prediction.png")
  return results

