"""lm_eval job: zero-shot task accuracy (lm-evaluation-harness) of compressed models.

Steps: check the specs, tasks and task data (before the slow load); load the model once;
for each spec F' = compress(F, spec) (`common.compress_model`), then
`lm_eval.simple_evaluate` with `dtm.tasks.lm_eval_model.DtmLM`; after each spec,
workdir/results.json is rewritten with every finished run, so a rerun with the same
settings skips the specs already done. A table goes to stdout.
"""
from __future__ import annotations

import json
import logging
import os
import time

from dtm import compress, io_utils
from dtm.errors import DtmError
from dtm.jobs import common

log = logging.getLogger("dtm")

METRICS = ("acc", "acc_norm", "exact_match", "word_perplexity")


def parse_specs(text) -> list[compress.Spec]:
  """'|'-separated spec strings (or a list of them) -> Specs ('' = the original model)."""
  items = text if isinstance(text, (list, tuple)) else str(text).split("|")
  specs = [compress.parse_spec(item.strip()) for item in items]
  names = [s.to_string() for s in specs]
  if len(set(names)) != len(names):
    raise DtmError(f"compression lists the same spec twice: {' | '.join(names)}")
  return specs


def check_settings(config) -> list[str]:
  """The task names; DtmError for a bad batch_size, limit or max_length."""
  for field, low in (("batch_size", 1), ("limit", 0), ("max_length", 0),
                     ("bootstrap_iters", 0)):
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise DtmError(f"{field} must be an integer >= {low}, got {value!r}")
  return [t.strip() for t in config.tasks.split(",") if t.strip()]


def settings_key(config, data: dict) -> dict:
  """What a finished run must share with this one to be reused on a rerun."""
  return {"model": config.model, "param_dtype": config.param_dtype, "dtype": config.dtype,
          "tasks": config.tasks, "limit": config.limit, "max_length": config.max_length,
          "task_data": data, "calibration": common.config_json(config)["calibration"]}


def _previous_runs(path: str, key: dict) -> dict[str, dict]:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return {}
  if old.get("job") != "lm_eval" or old.get("settings") != key:
    return {}
  return {run["compression"]: run for run in old.get("runs", [])}


def run(config, workdir: str) -> dict:
  from lm_eval import simple_evaluate
  from lm_eval.utils import handle_non_serializable

  from dtm.tasks import offline
  from dtm.tasks.lm_eval_model import DtmLM

  os.makedirs(workdir, exist_ok=True)
  specs = parse_specs(config.compression)  # syntax errors before anything slow
  names = check_settings(config)
  task_manager = offline.task_manager()
  tasks, data = offline.task_configs(names, config.task_data, task_manager,
                                     config.task_data_dir or None)
  model = common.load(config)
  num_layers, shapes = compress.kernel_shapes(model.params)
  specs = [compress.validate(s, num_layers, shapes) for s in specs]  # all fit, before any run
  path = os.path.join(workdir, "results.json")
  key = settings_key(config, data)
  done = _previous_runs(path, key)
  runs = []
  for spec in specs:
    name = spec.to_string()
    if name in done:
      log.info("compression %s: done in an earlier run, reusing it", name)
      runs.append(done[name])
      continue
    t0 = time.time()
    params, report, calibration = common.compress_model(config, model, spec)
    lm = DtmLM(loaded=model, params=params, compression=name, batch_size=config.batch_size,
               max_length=config.max_length or None)
    out = simple_evaluate(model=lm, tasks=tasks, limit=config.limit or None,
                          task_manager=task_manager, bootstrap_iters=config.bootstrap_iters,
                          log_samples=False, torch_random_seed=None)
    out = json.loads(json.dumps(dict(out), default=handle_non_serializable))
    runs.append({"compression": name, "components": report, "calibration": calibration,
                 "lm_eval": out, "seconds": round(time.time() - t0, 2),
                 "seconds_model": {k: round(v, 2) for k, v in lm.seconds.items()}})
    _write(path, config, model, key, data, runs)
  results = _write(path, config, model, key, data, runs)
  print(table(runs, data))
  print(f"results: {path}")
  return results


def _write(path, config, model, key, data, runs) -> dict:
  results = {"job": "lm_eval", "model": config.model, "model_source": model.source,
             "settings": key, "task_data": data, "runs": runs,
             "config": common.config_json(config)}
  io_utils.atomic_write_json(path, results)
  return results


def table(runs: list[dict], data: dict) -> str:
  """One row per (compression, task): split, documents, the metrics lm-eval reported."""
  rows = [("compression", "task", "split", "docs", "metric", "value", "stderr")]
  for run in runs:
    res = run["lm_eval"]
    for task, metrics in res["results"].items():
      split = data.get(task, {}).get("split", "hub")
      docs = res.get("n-samples", {}).get(task, {}).get("effective", "")
      for metric in METRICS:
        if f"{metric},none" in metrics:
          err = metrics.get(f"{metric}_stderr,none")
          rows.append((run["compression"], task, split, str(docs), metric,
                       f"{metrics[f'{metric},none']:.4f}",
                       f"{err:.4f}" if isinstance(err, float) else ""))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
