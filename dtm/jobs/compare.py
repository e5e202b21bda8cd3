"""Compare job: many compressions x prompt domains -> DTMs (greedy and sampled), perplexity,
and Spearman rank correlations between the metrics across compressions.

For every domain (config.domains: prose, code, ...): prompts and perplexity windows from
that domain's data, F's greedy references (cached) and, with sampling enabled, F's
sampled continuations (`dtm.sampling`, cached). For every compression spec: F' =
compress(F, spec) once, then per domain the held-out DTMs of the evaluate job's code path
(`evaluation.HeldOut`), the sampled FDT / SDT and perplexity. One record per (spec,
domain) is appended to records.jsonl as soon as it is computed (`sweep_store`), so a run
killed at any moment and restarted with the same command skips what is done; more specs
may be added to a finished workdir. Outputs: records.jsonl, summary.csv, summary.txt
(table, rank correlations per domain, cross-domain agreement) and results.json.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
import numpy as np

from dtm import compress, evaluation, io_utils, metrics, report, sampling
from dtm.components import parse_component
from dtm.errors import DtmError
from dtm.jobs import common
from dtm.sweep_store import ProbeStore

log = logging.getLogger("dtm")


def parse_compressions(value) -> list[str]:
  """config.compressions (tuple of specs, or one string with '|' between specs) ->
  canonical spec strings, in order, duplicates and 'none' removed (the original model is
  always evaluated first); raises DtmError on a bad spec or when none is left."""
  items = [part for item in ([value] if isinstance(value, str) else list(value))
           for part in str(item).split("|")]  # a '|' list may also arrive inside a tuple
  out: list[str] = []
  for item in items:
    text = compress.parse_spec(item).to_string()
    if text != "none" and text not in out:  # the original model is always the first row
      out.append(text)
  if not out:
    raise DtmError("config.compressions is empty: give at least one compression spec")
  return out


def _domain_config(config, name: str):
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.data = ml_collections.ConfigDict(config.domains[name].to_dict())
  return sub


class Domain:
  """One prompt domain: its prompts, references, held-out evaluator and sampled refs."""

  def __init__(self, config, name: str, model, workdir: str, s: sampling.Sampling | None):
    self.name = name
    sub = _domain_config(config, name)
    ev = common.build_eval_data(sub, model.tokenizer)
    self.settings = {**ev.settings, "data": config.domains[name].to_dict()}
    self.prompts = ev.prompts
    ddir = os.path.join(workdir, name)
    y = common.references(sub, model, ev.prompts, ddir)
    self.held = evaluation.HeldOut(
        model.cfg, model.params, ev.prompts, y, batch_size=config.prompts.batch_size,
        alphas=tuple(config.alphas), kl=True,
        ppl_tokens_WT=None if ev.ppl is None else ev.ppl.tokens,
        ppl_ctx_W=None if ev.ppl is None else ev.ppl.ctx_len, ppl_batch_size=config.ppl.batch_size)
    self.sampling = s
    self.sampled_y = None
    if s is not None:
      self.sampled_y = _sampled_references(model, ev.prompts, int(config.prompts.new_tokens), s,
                                           config.prompts.batch_size, ddir)
    self.fingerprint = io_utils.array_fingerprint(ev.prompts)

  def evaluate(self, params, alphas) -> dict:
    agg = self.held.evaluate(params)
    if self.sampling is not None:
      per = sampling.sampled_divergence(self.held.cfg, params, self.prompts, self.sampled_y,
                                        self.sampling, self.held.batch_size)
      agg["sampled_fdt_mean"] = float(np.mean(per["fdt"]))
      agg["sampled_sdt_mean"] = float(np.mean(per["sdt"]))
      for a in alphas:
        agg[f"sampled_fdt_alpha_{a:g}"] = float(metrics.fdt_alpha(per["fdt"], a))
      agg["sampled_dppl"] = metrics.perplexity(np.sum(per["nll"]), per["nll"].size)
    return agg


class _Tasks:
  """Zero-shot accuracy of a params tree on config.tasks (lm-eval, `dtm.tasks`)."""

  def __init__(self, tc, model):
    from dtm.tasks import offline
    self.names = [t.strip() for t in tc.names.split(",") if t.strip()]
    if tc.batch_size < 1 or tc.limit < 0:
      raise DtmError(f"tasks.batch_size must be >= 1 and tasks.limit >= 0, got "
                     f"{tc.batch_size}, {tc.limit}")
    self.manager = offline.task_manager()
    self.tasks, self.data = offline.task_configs(self.names, tc.task_data, self.manager)
    self.tc, self.model = tc, model
    self.identity = {"names": self.names, "limit": int(tc.limit), "data": self.data}
    from dtm.sweep_store import identity_hash
    self._hash = identity_hash(self.identity)

  def key(self, text: str) -> str:
    return f"{text}|tasks:{self._hash}"

  def accuracy(self, params, text: str) -> dict[str, float]:
    """{task: acc} (lm-eval's 'acc,none')."""
    from lm_eval import simple_evaluate
    from dtm.tasks.lm_eval_model import DtmLM
    lm = DtmLM(loaded=self.model, params=params, compression=text,
               batch_size=int(self.tc.batch_size))
    out = simple_evaluate(model=lm, tasks=self.tasks, limit=int(self.tc.limit) or None,
                          task_manager=self.manager, bootstrap_iters=0, log_samples=False,
                          torch_random_seed=None)
    return {t: float(out["results"][t]["acc,none"]) for t in self.names}


def _sampled_references(model, prompts, n, s, batch_size, ddir) -> np.ndarray:
  key = io_utils.array_fingerprint(prompts, extra=f"{io_utils.params_fingerprint(model.params)}:"
                                   f"{n}:{sorted(s.describe().items())}")
  os.makedirs(os.path.join(ddir, "cache"), exist_ok=True)
  path = os.path.join(ddir, "cache", f"sampled-{key}.npy")
  if os.path.exists(path):
    return np.load(path)
  y = sampling.sample_references(model.cfg, model.params, prompts, n, s, batch_size)
  np.save(path + ".tmp.npy", y)
  os.replace(path + ".tmp.npy", path)
  return y


def _sampling(config) -> sampling.Sampling | None:
  c = config.sampling
  if not c.enabled:
    return None
  return sampling.Sampling(float(c.temperature), int(c.top_k), float(c.top_p), int(c.seed))


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  specs = parse_compressions(config.compressions)
  names = [n.strip() for n in config.domain_names.split(",") if n.strip()]
  if not names:
    raise DtmError("config.domain_names is empty: give at least one prompt domain")
  unknown = [n for n in names if n not in config.domains]
  if unknown:
    raise DtmError(f"config.domain_names names {unknown[0]!r}, which config.domains does not "
                   f"define (it has: {', '.join(config.domains.keys())})")
  s = _sampling(config)
  model = common.load(config)
  num_layers, shapes = compress.kernel_shapes(model.params)
  parsed = {t: compress.validate(t, num_layers, shapes) for t in specs}
  calib = next(filter(None, (common.calibration_for(config, model, t) for t in specs)), None)
  domains = [Domain(config, name, model, workdir, s) for name in names]
  identity = {
      "model": config.model, "model_source": model.source, "param_dtype": config.param_dtype,
      "dtype": config.dtype, "new_tokens": int(config.prompts.new_tokens),
      "alphas": [float(a) for a in config.alphas],
      "sampling": None if s is None else s.describe(),
      "domains": {d.name: {"prompts": d.fingerprint, "settings": d.settings} for d in domains},
  }
  if calib is not None:  # (absent otherwise: workdirs without calibrated specs stay valid)
    identity["calibration"] = calib[1]
  tasks = _Tasks(config.tasks, model) if config.tasks.names.strip() else None
  store = ProbeStore.open(workdir, identity)
  # task records are keyed by their settings, so tasks can be added to a finished workdir
  keys = lambda t: [f"{t}|{d.name}" for d in domains] + ([tasks.key(t)] if tasks else [])
  todo = [t for t in ["none"] + specs if any(k not in store.records for k in keys(t))]
  print(f"compare: {len(specs)} compressions x {len(domains)} domains "
        f"({', '.join(names)}), {len(todo)} to evaluate")
  for i, text in enumerate(todo):
    t1 = time.time()
    if text == "none":
      params_c, report_c = model.params, {}
    else:  # calibrated methods (wanda, sparsegpt, gptq) take config.calibration's windows
      params_c, report_c, _ = common.compress_model(config, model, parsed[text], calib)
    recs = []
    for d in domains:
      key = f"{text}|{d.name}"
      if key in store.records:
        continue
      agg = d.evaluate(params_c, tuple(config.alphas))
      recs.append({"probe": key, "compression": text, "domain": d.name, "aggregate": agg,
                   "linear_sparsity": _linear_sparsity(report_c, shapes)})
    if tasks is not None and tasks.key(text) not in store.records:
      recs.append({"probe": tasks.key(text), "compression": text, "tasks": tasks.identity,
                   "accuracy": tasks.accuracy(params_c, text)})
    store.add(recs)
    done = i + 1
    rate = (time.time() - t0) / done
    print(f"[{done}/{len(todo)}] {text}: {time.time() - t1:.1f} s; ETA "
          f"{rate * (len(todo) - done):.0f} s", flush=True)
    del params_c
  return _finish(config, workdir, store, ["none"] + specs, names, time.time() - t0, tasks)


def _linear_sparsity(report_c: dict, shapes: dict) -> float:
  """Fraction of exact zeros over the compressed components' weights (0 for none)."""
  if not report_c:
    return 0.0
  num = den = 0.0
  for name, r in report_c.items():
    out_dim, in_dim = shapes[parse_component(name).kind]
    num += r["sparsity"] * out_dim * in_dim
    den += out_dim * in_dim
  return num / den


def _finish(config, workdir, store, specs, names, seconds, tasks=None) -> dict:
  rows = []
  for text in specs:
    for name in names:
      rec = store.records[f"{text}|{name}"]
      acc = store.records[tasks.key(text)]["accuracy"] if tasks else {}
      extra = {f"acc_{k}": v for k, v in acc.items()}
      if acc:
        extra["task_acc_mean"] = float(np.mean(list(acc.values())))
      rows.append({"compression": text, "domain": name, **rec["aggregate"], **extra})
  metrics_ = [m for m in config.correlate if m in rows[0]]
  correlations = {name: report.rank_correlations(
      [r for r in rows if r["domain"] == name and r["compression"] != "none"], metrics_)
      for name in names}
  cross = {}
  for m in ("fdt_mean", "sampled_fdt_mean", "dppl"):
    if len(names) > 1 and m in rows[0]:
      a = [r[m] for r in rows if r["domain"] == names[0] and r["compression"] != "none"]
      b = [r[m] for r in rows if r["domain"] == names[1] and r["compression"] != "none"]
      cross[m] = report.spearman(a, b)
  text = report.compare_table(rows, names, tuple(config.alphas), correlations, cross)
  report.write_csv(os.path.join(workdir, "summary.csv"), rows)
  io_utils.atomic_write_text(os.path.join(workdir, "summary.txt"), text + "\n")
  results = {"job": "compare", "model": config.model, "rows": rows,
             "rank_correlations": correlations, "cross_domain": cross,
             "config": common.config_json(config), "seconds": round(seconds, 1)}
  io_utils.atomic_write_json(os.path.join(workdir, "results.json"), results)
  print(text)
  print(f"results: {os.path.join(workdir, 'results.json')}")
  return results
