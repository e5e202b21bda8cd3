"""Prune-compare job: pruning methods at equal overall sparsity of the linear parameters.

1. With compare.fdt_guided, the FDT-guided run (`dtm.jobs.prune`, in <workdir>/fdt,
   resumable on its own) until it reaches the largest of compare.sparsities; for each
   sparsity s its first round with overall sparsity >= s is the FDT-guided model at s (its
   held-out record is reused).
2. For each one-shot method m (magnitude, wanda, sparsegpt) and s: F' = '<components>:m(s)';
   for each compare.specs entry 'label=template' the template with {s} replaced (e.g. OWL:
   'owl-sparsegpt=owl({s}, method=sparsegpt)'); for compare.recipes (an allocate job's
   workdir) its recipe-<s>.txt, labelled 'fdt-alloc-<operator>'. Calibrated methods use
   config.calibration (the same windows for every row; sequential as the references).
   Each F' is evaluated on the same held-out prompts and PPL windows; with compare.train
   (and an FDT-guided run), F' is then trained for the FDT-guided run's budget up to s
   (rounds x train.steps, the same train block, KL from F) and evaluated again.
Every evaluation is appended to <workdir>/compare/probes.jsonl as soon as it is done;
the trainings resume from their own checkpoints. Outputs: results.json, summary.txt (one
table), comparison.png (held-out FDT_α, mean FDT, DPPL and PPL against sparsity).
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from dtm import compress, evaluation, io_utils, memory
from dtm.errors import DtmError
from dtm.jobs import common
from dtm.jobs import prune as prune_job
from dtm.jobs.train import training_tokens
from dtm.search import prune_rounds
from dtm.sweep_store import ProbeStore
from dtm.train import sharding, trainer

ONE_SHOT = ("magnitude", "wanda", "sparsegpt")


def _check(config) -> list[float]:
  c = config.compare
  sp = sorted(float(s) for s in c.sparsities)
  if not sp:
    raise DtmError("compare.sparsities is empty: give at least one overall sparsity")
  if not all(0 < s < 1 for s in sp):
    raise DtmError(f"compare.sparsities must lie in (0, 1), got {tuple(c.sparsities)}")
  bad = [m for m in c.methods if m not in ONE_SHOT]
  if bad:
    raise DtmError(f"compare.methods has {bad[0]!r}; expected a subset of {', '.join(ONE_SHOT)}")
  for entry in c.specs:
    label, _, template = entry.partition("=")
    if not label.strip() or "{s}" not in template:
      raise DtmError(f"compare.specs entry {entry!r} must read 'label=template' with {{s}} "
                     "for the sparsity, e.g. 'owl-sparsegpt=owl({s}, method=sparsegpt)'")
  if c.recipes:
    missing = [s for s in sp if not os.path.isfile(_recipe_path(c.recipes, s))]
    if missing:
      raise DtmError(f"compare.recipes={c.recipes!r} has no recipe for sparsity "
                     f"{missing[0]:g} ({_recipe_path(c.recipes, missing[0])}): run the "
                     "allocate job with these targets first")
  if not (c.fdt_guided or c.methods or c.specs or c.recipes):
    raise DtmError("nothing to compare: compare.fdt_guided is off and compare.methods, "
                   "compare.specs and compare.recipes are empty")
  return sp


def _recipe_path(directory: str, s: float) -> str:
  return os.path.join(directory, f"recipe-{s:g}.txt")


def _one_shot_rows(config, s: float) -> list[tuple[str, str]]:
  """(label, spec) of every one-shot row at sparsity s, in table order."""
  c, comps = config.compare, config.prune.components
  rows = [(m, f"{comps}:{m}({s:g})") for m in c.methods]
  for entry in c.specs:
    label, _, template = entry.partition("=")
    rows.append((label.strip(), f"{comps}:{template.strip().replace('{s}', f'{s:g}')}"))
  if c.recipes:
    with open(_recipe_path(c.recipes, s)) as f:
      rows.append((f"fdt-alloc-{_recipe_operator(c.recipes)}", f.read().strip()))
  return rows


def _allocate_records(config, identity: dict, eval_settings: dict) -> dict[str, dict]:
  """spec -> {aggregate, sparsity, source} of compare.recipes' own held-out evaluations
  (<recipes>/final), when that allocate run used this job's model, held-out prompts and
  references, PPL windows, alphas and calibration windows: its records are what this job
  would compute (the evaluate job reproduces them exactly, tests/test_allocate_job.py).
  Empty otherwise: the recipes are then applied and evaluated here."""
  directory = config.compare.recipes
  try:
    with open(os.path.join(directory, "results.json")) as f:
      res = json.load(f)
    with open(os.path.join(directory, "final", "sweep.json")) as f:
      final = json.load(f)["identity"]
  except (OSError, ValueError, KeyError):
    return {}
  cal = dict(identity["calibration"] or {})
  cal.pop("batch_size", None)
  cfg = res.get("config", {})
  same = (final.get("params") == identity["params"]
          and final.get("heldout") == identity["heldout"]
          and final.get("calibration") == cal
          and final.get("mode") == config.calibration.mode
          and res.get("data", {}).get("heldout") == eval_settings
          and sorted(cfg.get("alphas", ())) == sorted(identity["alphas"])
          and bool(cfg.get("kl")) == bool(config.eval.kl))
  if not same:
    return {}
  out = {}
  for line in open(os.path.join(directory, "final", "probes.jsonl")):
    rec = json.loads(line)
    out[rec["probe"]] = {"aggregate": rec["heldout"], "sparsity": rec["sparsity"],
                         "seconds": None, "source": os.path.join(directory, "final")}
  return out


def _recipe_operator(directory: str) -> str:
  """The allocate job's operator (its results.json), for the row label."""
  try:
    with open(os.path.join(directory, "results.json")) as f:
      return json.load(f)["operator"]
  except (OSError, ValueError, KeyError):
    return "recipe"


def _prune_config(config, target: float):
  d = config.to_dict()
  d.pop("compare")  # calibration stays: the rounds' calibrated operator (prune.method) uses it
  pc = ml_collections.ConfigDict(d)
  pc.job = "prune"
  pc.prune.target_sparsity = target
  return pc


def run(config, workdir: str) -> dict | None:
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  sparsities = _check(config)
  records = []
  fdt_dir = os.path.join(workdir, "fdt")
  memory.map_large_buffers()  # freed models and train states go back to the OS
  peaks = memory.PhasePeaks(release=True)
  if config.compare.fdt_guided:
    with peaks.phase("fdt"):
      if prune_job.run(_prune_config(config, sparsities[-1]), fdt_dir) is None:
        return None  # SIGTERM during its training: saved; rerun to resume
    records = prune_rounds.RoundLog(os.path.join(fdt_dir, "rounds.jsonl")).records
  with peaks.phase("load"):
    model = common.load(config)
  with peaks.phase("references"):
    ev = common.build_eval_data(config.eval, model.tokenizer)
    y = common.references(config.eval, model, ev.prompts, os.path.join(fdt_dir, "heldout"))
    alphas = tuple(sorted({float(a) for a in config.eval.alphas} | {float(config.prune.alpha)}))
    held = evaluation.HeldOut(
        model.cfg, model.params, ev.prompts, y, batch_size=config.eval.prompts.batch_size,
        alphas=alphas, kl=bool(config.eval.kl),
        ppl_tokens_WT=None if ev.ppl is None else ev.ppl.tokens,
        ppl_ctx_W=None if ev.ppl is None else ev.ppl.ctx_len,
        ppl_batch_size=config.eval.ppl.batch_size)
  with peaks.phase("setup"):
    ctx = _Context(config, workdir, model, held, alphas, peaks)
  identity = {"model_source": model.source, "params": io_utils.params_fingerprint(model.params),
              "heldout": io_utils.array_fingerprint(ev.prompts, y), "alphas": list(alphas),
              "components": config.prune.components,
              "calibration": None if ctx.windows is None else ctx.windows[1],
              "train": config.train.to_dict(), "train_data": config.data.to_dict()}
  ctx.store = ProbeStore.open(os.path.join(workdir, "compare"), identity)
  ctx.reusable = _allocate_records(config, identity, ev.settings)
  rows = []
  for s in sparsities:
    reached = next((r for r in records if r["sparsity"] >= s - 1e-9), None)
    budget = reached["round"] * int(config.train.steps) if reached else 0
    if reached is not None:
      method = ("fdt-guided" if config.prune.method == "magnitude"
                else f"fdt-guided {config.prune.method}")
      rows.append({"target": s, "method": method, "variant": f"round {reached['round']}",
                   "sparsity": reached["sparsity"], "train_steps": budget, **reached["heldout"]})
    elif config.compare.fdt_guided:
      print(f"FDT-guided pruning did not reach sparsity {s:g} (stopped at "
            f"{records[-1]['sparsity']:.3f}: see {fdt_dir}/results.json)")
    for label, spec in _one_shot_rows(config, s):
      got = ctx.method_rows(label, spec, s, budget)
      if got is None:
        return None  # interrupted training: saved; rerun to resume
      rows += got
  return _finish(config, workdir, rows, alphas, ev.settings, ctx.windows, time.time() - t0,
                 peaks)


class _Context:
  """What every one-shot row shares: the model, the held-out evaluator, the calibration
  windows, the training data and mesh (when rows are trained), the record store."""

  def __init__(self, config, workdir, model, held, alphas, peaks: memory.PhasePeaks):
    self.config, self.workdir, self.model, self.held, self.alphas, self.peaks = (
        config, workdir, model, held, alphas, peaks)
    self.tokens = self.mesh = None
    if config.compare.train and config.compare.fdt_guided and int(config.train.steps) > 0:
      self.tokens = training_tokens(config, model.tokenizer)
      self.mesh = sharding.make_mesh(int(config.train.mesh.data), int(config.train.mesh.fsdp))
    specs = [spec for s in config.compare.sparsities
             for _, spec in _one_shot_rows(config, float(s))]
    calibrated = any(common.calibrated_components(
        compress.validate(spec, *compress.kernel_shapes(model.params)),
        model.cfg.num_layers) for spec in specs)
    self.windows = common.calibration_data(config, model) if calibrated else None
    self.store = None
    self.reusable: dict[str, dict] = {}

  def method_rows(self, label: str, spec: str, s: float, budget: int) -> list[dict] | None:
    """The one-shot row of `spec` (and its trained row when there is a budget), each
    evaluated once and kept in the store."""
    variants = [("one-shot", 0)] + ([("trained", budget)]
                                    if self.tokens is not None and budget else [])
    params_c, out = None, []
    for variant, steps in variants:
      key = f"{spec}|{variant}|{steps}"
      if key not in self.store.records and variant == "one-shot" and spec in self.reusable:
        self.store.add([{"probe": key, **self.reusable[spec]}])
        print(f"{label} {s:g}: the allocate job's held-out record (same model, held-out "
              f"set, PPL windows and calibration windows)", flush=True)
      if key not in self.store.records:
        t1 = time.time()
        if params_c is None:
          with self.peaks.phase("compress"):
            params_c, _, _ = common.compress_model(self.config, self.model, spec, self.windows)
        params = params_c
        if variant == "trained":
          with self.peaks.phase("train"):
            params = self._train(label, spec, s, params_c, steps)
          if params is None:
            return None
          params_c = None  # the last variant: the one-shot model is not needed again
        with self.peaks.phase("evaluate"):
          agg = self.held.evaluate(params)
        self.store.add([{"probe": key, "aggregate": agg, "seconds": round(time.time() - t1, 3),
                         "sparsity": prune_rounds.linear_sparsity(params)["overall"]}])
        a = self.alphas[-1]
        print(f"{label} {s:g} {variant} ({steps} steps): FDT_{a:g}={agg[f'fdt_alpha_{a:g}']:g}, "
              f"mean FDT {agg['fdt_mean']:.2f}, DPPL {agg['dppl']:.3f}, PPL "
              f"{agg.get('ppl', float('nan')):.2f} ({time.time() - t1:.0f} s)", flush=True)
      rec = self.store.records[key]
      out.append({"target": s, "method": label, "variant": variant, "sparsity": rec["sparsity"],
                  "train_steps": steps, "seconds": rec.get("seconds"), **rec["aggregate"]})
    return out

  def _train(self, label, spec, s, params_c, steps):
    tc = ml_collections.ConfigDict(self.config.train.to_dict())
    tc.steps = steps
    res = trainer.train(self.model.cfg, params_c, spec, tc, tokens=self.tokens, mesh=self.mesh,
                        workdir=os.path.join(self.workdir, "train", f"{label}-{s:g}"),
                        teacher_params=self.model.params,
                        identity={"spec": spec, "budget": steps})
    return None if res.interrupted else _one_replica(res.params)


def _one_replica(params):
  """Trained params replicated over a data-parallel mesh -> the replica on the first local
  device (no copy; the others are freed with the tree): on a CPU host every JAX device
  holds its replica in the same RAM, and the held-out evaluation needs one (its metrics
  are equal, measured on SmolLM2). Sharded (FSDP) leaves stay as they are."""
  device = jax.local_devices()[0]

  def one(x):
    if len(x.sharding.device_set) == 1 or not x.sharding.is_fully_replicated:
      return x
    return next(shard.data for shard in x.addressable_shards if shard.device == device)

  return jax.tree.map(one, params)


def _finish(config, workdir, rows, alphas, eval_settings, windows, seconds,
            peaks: memory.PhasePeaks) -> dict:
  cols = [f"fdt_alpha_{a:g}" for a in alphas] + ["fdt_mean", "sdt_mean", "dppl", "kl_mean",
                                                  "ppl", "seconds"]
  head = ["target", "method", "variant", "sparsity", "steps"] + [
      c.replace("fdt_alpha_", "FDT_").replace("_mean", "").replace("seconds", "wall s")
      for c in cols]
  fmt = lambda r, c: ("-" if r.get(c) is None else f"{r[c]:.0f}" if c == "seconds"
                      else f"{r[c]:.3f}" if c == "kl_mean" else f"{r[c]:.2f}")
  lines = [head] + [[f"{r['target']:g}", r["method"], r["variant"], f"{r['sparsity']:.3f}",
                     str(r["train_steps"])] + [fmt(r, c) for c in cols] for r in rows]
  w = [max(len(l[i]) for l in lines) for i in range(len(head))]
  table = "\n".join("  ".join(v.ljust(w[i]) if i in (1, 2) else v.rjust(w[i])
                              for i, v in enumerate(l)) for l in lines)
  io_utils.atomic_write_text(os.path.join(workdir, "summary.txt"), table + "\n")
  with peaks.phase("finish"):
    _plot(os.path.join(workdir, "comparison.png"), rows, alphas, config)
  results = {"job": "prune_compare", "model": config.model, "rows": rows,
             "heldout_settings": eval_settings,
             "calibration": None if windows is None else windows[1],
             "config": common.config_json(config), "seconds": round(seconds, 1),
             "phase_peak_rss_bytes": peaks.bytes, "phase_peak_rss_exact": peaks.exact}
  io_utils.atomic_write_json(os.path.join(workdir, "results.json"), results)
  print(table)
  print(f"peak RSS per phase{'' if peaks.exact else ' (process peak up to its end)'}: "
        f"{peaks.summary()}")
  print(f"results: {workdir}/results.json, summary.txt, comparison.png")
  return results


def _plot(path, rows, alphas, config) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics_ = [f"fdt_alpha_{alphas[-1]:g}", "fdt_mean", "dppl", "ppl"]
  metrics_ = [m for m in metrics_ if m in rows[0]]
  fig, axes = plt.subplots(1, len(metrics_), figsize=(3.4 * len(metrics_), 3.2))
  series = list(dict.fromkeys((r["method"], "" if r["method"] == "fdt-guided" else r["variant"])
                              for r in rows))
  for ax, m in zip(np.atleast_1d(axes), metrics_):
    for method, variant in series:
      pts = sorted((r["sparsity"], r[m]) for r in rows if r["method"] == method and
                   (method == "fdt-guided" or r["variant"] == variant))
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
              linestyle="-" if variant != "one-shot" else "--",
              label=f"{method} {variant}".strip())
    ax.set_xlabel("overall sparsity of linear params")
    ax.set_title(m, fontsize=9)
    if m in ("dppl", "ppl"):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].legend(fontsize=6)
  fig.suptitle(f"{config.model}: pruning at equal sparsity (held-out, N="
               f"{config.eval.prompts.new_tokens})", fontsize=9)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
