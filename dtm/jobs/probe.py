"""Probe sweep job: every selected component at every level, resumable.

Writes to the workdir: sweep.json (the settings that define the results), probes.jsonl
(one record per probe with all per-prompt values, appended per chunk), summary.csv,
summary.txt, heatmap.png (FDT_α per component and level) and candidates.json.
Killed at any moment and restarted with the same command, it skips finished probes.

Calibrated methods (wanda, sparsegpt, gptq) use statistics of the ORIGINAL model on
config.calibration's windows (parallel mode), collected once per run for the probed
layers; the windows' settings and token fingerprint are part of sweep.json.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys

import jax
import numpy as np
from tqdm.auto import tqdm

from dtm import compress, io_utils, metrics, probe, report
from dtm.components import Component, get_path, kernel_path
from dtm.compress import calibration
from dtm.errors import DtmError
from dtm.jobs import common, validate
from dtm.sweep_store import ProbeStore

log = logging.getLogger("dtm")


@dataclasses.dataclass(frozen=True)
class Probe:
  component: Component
  method: compress.Method
  level: float

  @property
  def id(self) -> str:
    return f"{self.component.name}:{self.method.to_string()}"


def plan(config, num_layers: int, shapes: dict) -> list[Probe]:
  """All probes, validated against the model (layers exist, rates in [0, 1), ...)."""
  p = config.probe
  if not p.levels:
    raise DtmError("probe.levels is empty: give at least one level")
  probes = []
  keys = {item.partition("=")[0].strip() for item in p.method_args.split(",") if item.strip()}
  # wanda / sparsegpt take one level as the rate, or as n with m in method_args
  level_key = "n=" if p.method in ("wanda", "sparsegpt") and "m" in keys else ""
  for level in p.levels:
    args = ", ".join(filter(None, [f"{level_key}{level:g}", p.method_args]))
    text = f"{p.kinds}@{p.layers}:{p.method}({args})"
    spec = compress.validate(text, num_layers, shapes)
    if not spec.rules:
      raise DtmError(f"probe method {p.method}({args}) is the identity; nothing to probe")
    for comp, method in spec.resolve(num_layers).items():
      probes.append(Probe(comp, method, float(level)))
  return sorted(probes, key=lambda q: (q.component, q.level))


PROBE_METHODS: tuple[str, ...] = ("magnitude", "absmax", "nm", "rtn", "wanda", "sparsegpt",
                                  "gptq")


def identity(config, model_source: str, prompts: np.ndarray, cfg,
             calibration: dict | None = None) -> dict:
  """The settings that define the results (execution knobs such as chunk size excluded);
  `calibration`: the calibration settings of a calibrated method (absent otherwise)."""
  ident = {
      "model": config.model, "model_source": model_source, "param_dtype": config.param_dtype,
      "dtype": config.dtype, "prompts": io_utils.array_fingerprint(prompts),
      "new_tokens": int(config.prompts.new_tokens), "method": config.probe.method,
      "method_args": config.probe.method_args, "kinds": config.probe.kinds,
      "layers": config.probe.layers, "levels": [float(x) for x in config.probe.levels],
      "kl": bool(config.kl), "num_layers": cfg.num_layers,
  }
  if calibration is not None:
    ident["calibration"] = {k: v for k, v in calibration.items() if k != "batch_size"}
  return ident


def auto_chunk(cfg, p: int, s: int, levels: int) -> int:
  """Probes per device and call: all levels of a component, capped so activations of the
  call (about 12 [P, S, max(D, F)] f32 buffers per probe) use at most a quarter of
  memory (a device's own memory, or on CPU the host's, which all its devices share)."""
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() or {}
  limit = stats.get("bytes_limit")
  if not limit:
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
  per_probe = 12 * p * s * max(cfg.hidden_size, cfg.intermediate_size) * 4
  return max(1, min(levels, int(limit // 4 // per_probe)))


def _records(chunk: list[Probe], out: dict, alphas, numel: int) -> list[dict]:
  recs = []
  for i, q in enumerate(chunk):
    per = {k: np.asarray(v[i]) for k, v in out.items() if k != "sparsity"}
    r6 = lambda x: np.round(np.asarray(x, np.float64), 6).tolist()  # short, exact JSON
    agg = metrics.aggregate(per, alphas)
    rec = {"probe": q.id, "component": q.component.name, "layer": q.component.layer,
           "kind": q.component.kind, "method": q.method.to_string(), "level": q.level,
           "sparsity": round(float(out["sparsity"][i]), 6), "numel": numel, "aggregate": agg,
           "per_prompt": {"fdt": per["fdt"].tolist(), "sdt": r6(per["sdt"]), "nll": r6(per["nll"])}}
    if "kl" in per:
      rec["per_prompt"]["kl_mean"] = r6(per["kl"].mean(-1))
      rec["per_prompt"]["top1_agree"] = r6(per["top1_agree"].mean(-1))
    recs.append(rec)
  return recs


def _gather(out):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(out, tiled=True)
  return jax.device_get(out)


def run(config, workdir: str) -> dict:
  is_writer = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  validate.validate(config)  # every config error before the slow load
  if config.probe.method not in PROBE_METHODS:
    raise DtmError(f"probe.method must be one of {', '.join(PROBE_METHODS)}, got "
                   f"{config.probe.method!r}")
  calibrated = config.probe.method in compress.CALIBRATED_METHODS
  if calibrated and config.calibration.mode != "parallel":
    raise DtmError(f"probing {config.probe.method} uses statistics of the original model: "
                   f"set calibration.mode=parallel (got {config.calibration.mode!r})")
  mesh = probe.probe_mesh(model=int(config.probe.mesh_model))
  model = common.load(config, shardings_fn=_shardings_fn(mesh))
  cfg = model.cfg
  num_layers, shapes = compress.kernel_shapes(model.params)
  probes = plan(config, num_layers, shapes)
  ev = common.build_eval_data(config, model.tokenizer, need_ppl=False)
  c, n = ev.prompts.shape[1], int(config.prompts.new_tokens)
  windows, cal_settings = common.calibration_data(config, model) if calibrated else (None, None)
  store = ProbeStore.open(workdir, identity(config, model.source, ev.prompts, cfg, cal_settings),
                          is_writer)
  todo = [q for q in probes if q.id not in store.records]
  print(f"probe sweep: {len(probes)} probes ({len(probes) - len(todo)} done), "
        f"{len({q.component for q in probes})} components x {len(config.probe.levels)} levels, "
        f"{ev.prompts.shape[0]} prompts, c={c}, N={n}, {jax.device_count()} device(s)")
  if todo:
    y = common.references(config, model, ev.prompts, workdir)
    seq = np.concatenate([ev.prompts, y], axis=1)
    kinds = tuple(sorted({q.component.kind for q in todo}))
    statistics = None
    if calibrated:
      statistics = held_statistics(cfg, model.params, windows, config,
                                   {q.component.layer for q in todo}, mesh)
    runner = probe.ProbeRunner(cfg, model.params, seq, c, mesh, kl=config.kl,
                               kinds=kinds, statistics=statistics)
    per_device = config.probe.chunk_size or auto_chunk(cfg, seq.shape[0], seq.shape[1] - 1,
                                                       len(config.probe.levels))
    _run_chunks(runner, todo, per_device, store, tuple(config.alphas), model.params, is_writer)
  return _finish(config, workdir, store, probes, n, is_writer)


def held_statistics(cfg, params, windows, config, layers: set[int], mesh):
  """`calibration.collect_statistics` of `layers` (parallel mode), each layer's statistics
  spread over every device of `mesh` as soon as they are made (`spread_sharding`): the
  runner holds all of them while it probes, and Llama-2-70B's 80 layers of Hessians are
  307 GiB (28672^2 float32 for each down projection); spread over a v5p-64's 32 chips, 9.6
  GiB each. The calibrated methods read them through jit, so results are unchanged."""
  held: dict = {}
  spread: dict = {}

  def visit(layer, lp, stats):
    for comp, st in stats.items():  # q, k, v (gate, up) share one InputStats: spread once
      if id(st) not in spread:  # all of this layer's stats are alive: ids are distinct
        put = lambda x: None if x is None else jax.device_put(x, spread_sharding(mesh, x.shape))
        spread[id(st)] = dataclasses.replace(st, sq_norms=put(st.sq_norms),
                                             hessian=put(st.hessian))
      held[comp] = spread[id(st)]
    spread.clear()
    return lp

  calibration.run_layers(cfg, params, windows, visit, batch_size=config.calibration.batch_size,
                         hessian=config.probe.method in compress.HESSIAN_METHODS,
                         stats_layers=layers, output=False, progress=True)
  return held


def spread_sharding(mesh, shape: tuple[int, ...]):
  """Rows split over every device of `mesh` (all its axes), or replicated when they do
  not divide."""
  from jax.sharding import NamedSharding, PartitionSpec as PS
  rows = shape[0] % mesh.size == 0 if shape else False
  return NamedSharding(mesh, PS(tuple(mesh.axis_names)) if rows else PS())


def _shardings_fn(mesh):
  """Load straight into the probe layout when the model is split over 'model' (a model
  that fits no single device is never materialised whole on one)."""
  if mesh.shape[probe.MODEL_AXIS] == 1:
    return None
  from dtm.model import abstract_params
  return lambda cfg: probe.param_shardings(mesh, abstract_params(cfg))


def _calls(todo: list[Probe], per_device: int, num_devices: int, numel_of, in_dim_of=None,
           uniform: bool = False):
  """(family, [probe.Slot]) per call; slot keys are the Probes. Precomputed families
  (sparsegpt, gptq) get calls of one kind each."""
  groups: dict[tuple, dict[Component, list]] = {}
  for q in todo:
    family, level = probe.split_method(q.method)
    if family.name in ("magnitude", "absmax", "nm"):
      level = q.level  # (the level as configured; the method's is its %g text)
    in_dim = in_dim_of(q.component.kind) if in_dim_of is not None else None
    arg = probe.dynamic_arg(family, level, numel_of(q.component.kind), in_dim)
    key = (family, q.component.kind if family.precomputed else None)
    groups.setdefault(key, {}).setdefault(q.component, []).append((q, arg))
  for (family, _), work in groups.items():
    for slots in probe.schedule(work, num_devices, per_device, uniform):
      yield family, slots


def _run_chunks(runner, todo, per_device, store, alphas, params, is_writer):
  bar = tqdm(total=len(todo), unit="probe", desc="probes", smoothing=0.1,
             mininterval=0.5 if sys.stderr.isatty() else 30)

  def numel_of(kind):
    shape = get_path(params, kernel_path(kind)).shape
    return int(shape[1] * shape[2])

  def in_dim_of(kind):
    return int(get_path(params, kernel_path(kind)).shape[1])

  calls = _calls(todo, per_device, runner.num_devices, numel_of, in_dim_of, runner.uniform)
  for slots, outs in runner.stream(calls, gather=_gather):  # the next call is running
    recs = []
    for slot, out in zip(slots, outs):
      recs += _records(list(slot.keys), out, alphas, numel_of(slot.component.kind))
    if is_writer:
      store.add(recs)
    bar.update(len(recs))
  bar.close()


def _finish(config, workdir, store, probes, n, is_writer) -> dict:
  records = [store.records[q.id] for q in probes if q.id in store.records]
  missing = len(probes) - len(records)
  if missing:
    raise DtmError(f"{missing} probes have no record; rerun the same command to finish")
  rows = report.summary_rows(records, config.alphas)
  alpha = config.probe.candidate_alpha
  if f"fdt_alpha_{alpha:g}" not in rows[0]:
    raise DtmError(f"probe.candidate_alpha={alpha} must be one of config.alphas={config.alphas}")
  min_fdt = config.probe.candidate_min_fdt or n / 2
  # fewer bits, or fewer kept of every m, = more aggressive
  descending = (config.probe.method in ("absmax", "rtn", "gptq")
                or probe.split_method(probes[0].method)[0].level_key == "n")
  cands = report.candidates(rows, alpha, min_fdt, descending)
  levels = sorted({r["level"] for r in rows})
  table = report.text_table(rows, alpha, levels)
  shares = report.candidate_shares(cands, levels, descending)
  if is_writer:
    report.write_csv(os.path.join(workdir, "summary.csv"), rows)
    io_utils.atomic_write_text(os.path.join(workdir, "summary.txt"), table + "\n")
    io_utils.atomic_write_json(os.path.join(workdir, "candidates.json"), {
        "alpha": alpha, "min_fdt": min_fdt, "method": config.probe.method,
        "candidates": cands,
        "shares": [{**r, "reach": {f"{lv:g}": c for lv, c in r["reach"].items()}}
                   for r in shares]})
    title = (f"{config.model}: one component at a time, FDT_{alpha:g} (N={n}, "
             f"{len(records[0]['per_prompt']['fdt'])} prompts); panels: {config.probe.method} level")
    report.heatmap(os.path.join(workdir, "heatmap.png"), rows, alpha, n, title)
  print(table)
  ok = sum(v is not None for v in cands.values())
  print(f"\ncandidates (most aggressive level with FDT_{alpha:g} >= {min_fdt:g}): {ok} of "
        f"{len(cands)} components; see {os.path.join(workdir, 'candidates.json')}")
  print(f"components whose candidate reaches each level (FDT_{alpha:g} >= {min_fdt:g}):")
  print(report.shares_table(shares, descending))
  print(f"results: {workdir}/probes.jsonl, summary.csv, heatmap.png")
  return {"rows": rows, "candidates": cands, "shares": shares}
