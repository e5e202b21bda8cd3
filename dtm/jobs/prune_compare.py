"""Prune-compare job: pruning methods at equal overall sparsity of the linear parameters.

1. The FDT-guided run (`dtm.jobs.prune`, in <workdir>/fdt, resumable on its own) until it
   reaches the largest of compare.sparsities; for each sparsity s its first round with
   overall sparsity >= s is the FDT-guided model at s (its held-out record is reused).
2. For each one-shot method m (magnitude, wanda, sparsegpt) and s: F' = '<components>:m(s)'
   (calibrated methods with config.calibration, sequential as the references), evaluated
   on the same held-out prompts and PPL windows; with compare.train, F' is then trained
   for the FDT-guided run's budget up to s (rounds x train.steps, the same train block,
   KL from F) and evaluated again.
Every evaluation is appended to <workdir>/compare/probes.jsonl as soon as it is done;
the trainings resume from their own checkpoints. Outputs: results.json, summary.txt (one
table), comparison.png (held-out FDT_α, mean FDT, DPPL and PPL against sparsity).
"""
from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from dtm import evaluation, io_utils
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
  return sp


def _prune_config(config, target: float):
  d = config.to_dict()
  for key in ("compare", "calibration"):
    d.pop(key)
  pc = ml_collections.ConfigDict(d)
  pc.job = "prune"
  pc.prune.target_sparsity = target
  return pc


def run(config, workdir: str) -> dict | None:
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  sparsities = _check(config)
  fdt_dir = os.path.join(workdir, "fdt")
  pc = _prune_config(config, sparsities[-1])
  if prune_job.run(pc, fdt_dir) is None:
    return None  # SIGTERM during its training: saved; rerun to resume
  records = prune_rounds.RoundLog(os.path.join(fdt_dir, "rounds.jsonl")).records
  model = common.load(config)
  cfg = model.cfg
  ev = common.build_eval_data(config.eval, model.tokenizer)
  y = common.references(config.eval, model, ev.prompts, os.path.join(fdt_dir, "heldout"))
  alphas = tuple(sorted({float(a) for a in config.eval.alphas} | {float(config.prune.alpha)}))
  held = evaluation.HeldOut(
      cfg, model.params, ev.prompts, y, batch_size=config.eval.prompts.batch_size, alphas=alphas,
      kl=bool(config.eval.kl), ppl_tokens_WT=None if ev.ppl is None else ev.ppl.tokens,
      ppl_ctx_W=None if ev.ppl is None else ev.ppl.ctx_len, ppl_batch_size=config.eval.ppl.batch_size)
  steps_per_round = int(config.train.steps)
  tokens, mesh = None, None
  if config.compare.train and steps_per_round > 0:
    tokens = training_tokens(config, model.tokenizer)
    mesh = sharding.make_mesh(int(config.train.mesh.data), int(config.train.mesh.fsdp))
  windows = None
  if any(m in ("wanda", "sparsegpt") for m in config.compare.methods):
    windows = common.calibration_data(config, model)
  identity = {"model_source": model.source, "params": io_utils.params_fingerprint(model.params),
              "heldout": io_utils.array_fingerprint(ev.prompts, y), "alphas": list(alphas),
              "components": config.prune.components,
              "calibration": None if windows is None else windows[1],
              "train": config.train.to_dict(), "train_data": config.data.to_dict()}
  store = ProbeStore.open(os.path.join(workdir, "compare"), identity)
  rows = []
  for s in sparsities:
    reached = next((r for r in records if r["sparsity"] >= s - 1e-9), None)
    budget = reached["round"] * steps_per_round if reached else 0
    if reached is not None:
      rows.append({"target": s, "method": "fdt-guided", "variant": f"round {reached['round']}",
                   "sparsity": reached["sparsity"], "train_steps": budget, **reached["heldout"]})
    else:
      print(f"FDT-guided pruning did not reach sparsity {s:g} (stopped at "
            f"{records[-1]['sparsity']:.3f}: see {fdt_dir}/results.json)")
    for m in config.compare.methods:
      spec = f"{config.prune.components}:{m}({s:g})"
      variants = [("one-shot", 0)] + ([("trained", budget)] if tokens is not None and budget else [])
      params_c = None
      for variant, steps in variants:
        key = f"{spec}|{variant}|{steps}"
        if key not in store.records:
          t1 = time.time()
          if params_c is None:
            params_c, _, _ = common.compress_model(config, model, spec, windows)
          params = params_c
          if variant == "trained":
            tc = ml_collections.ConfigDict(config.train.to_dict())
            tc.steps = steps
            res = trainer.train(cfg, params_c, spec, tc, tokens=tokens, mesh=mesh,
                                workdir=os.path.join(workdir, "train", f"{m}-{s:g}"),
                                teacher_params=model.params,
                                identity={"spec": spec, "budget": steps})
            if res.interrupted:
              return None
            params = res.params
          agg = held.evaluate(params)
          store.add([{"probe": key, "aggregate": agg,
                      "sparsity": prune_rounds.linear_sparsity(params)["overall"]}])
          print(f"{spec} {variant} ({steps} steps): FDT_{alphas[-1]:g}="
                f"{agg[f'fdt_alpha_{alphas[-1]:g}']:g}, DPPL {agg['dppl']:.3f}, PPL "
                f"{agg.get('ppl', float('nan')):.2f} ({time.time() - t1:.0f} s)", flush=True)
        rec = store.records[key]
        rows.append({"target": s, "method": m, "variant": variant, "sparsity": rec["sparsity"],
                     "train_steps": steps, **rec["aggregate"]})
  return _finish(config, workdir, rows, alphas, ev.settings, windows, time.time() - t0)


def _finish(config, workdir, rows, alphas, eval_settings, windows, seconds) -> dict:
  cols = [f"fdt_alpha_{a:g}" for a in alphas] + ["fdt_mean", "sdt_mean", "dppl", "ppl"]
  head = ["target", "method", "variant", "sparsity", "steps"] + [
      c.replace("fdt_alpha_", "FDT_").replace("_mean", "") for c in cols]
  lines = [head] + [[f"{r['target']:g}", r["method"], r["variant"], f"{r['sparsity']:.3f}",
                     str(r["train_steps"])] + [f"{r[c]:.2f}" if c in r else "-" for c in cols]
                    for r in rows]
  w = [max(len(l[i]) for l in lines) for i in range(len(head))]
  table = "\n".join("  ".join(v.ljust(w[i]) if i in (1, 2) else v.rjust(w[i])
                              for i, v in enumerate(l)) for l in lines)
  io_utils.atomic_write_text(os.path.join(workdir, "summary.txt"), table + "\n")
  _plot(os.path.join(workdir, "comparison.png"), rows, alphas, config)
  results = {"job": "prune_compare", "model": config.model, "rows": rows,
             "heldout_settings": eval_settings,
             "calibration": None if windows is None else windows[1],
             "config": common.config_json(config), "seconds": round(seconds, 1)}
  io_utils.atomic_write_json(os.path.join(workdir, "results.json"), results)
  print(table)
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
