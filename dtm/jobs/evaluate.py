"""Evaluate job: DTMs of one compressed model F' against its original F.

Steps: load F; prompts; references y = greedy(F, p, N) (cached); F' = compress(F, spec)
(calibrated methods with windows from config.calibration, `common.compress_model`);
one teacher-forced pass of F' on s = p ⊕ y -> FDT, SDT, NLL (DPPL), KL(F‖F'), top-1;
context-aware PPL of F and F'; a table on stdout and workdir/results.json.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from dtm import compress, evaluation, io_utils, metrics
from dtm.jobs import common

log = logging.getLogger("dtm")


def _table(rows: list[tuple[str, str, str]]) -> str:
  w = [max(len(r[i]) for r in rows) for i in range(3)]
  return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows)


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  spec = compress.parse_spec(config.compression)  # syntax errors before the slow load
  model = common.load(config)
  cfg = model.cfg
  num_layers, shapes = compress.kernel_shapes(model.params)
  spec = compress.validate(spec, num_layers, shapes)
  windows = common.calibration_for(config, model, spec)  # bad calibration input fails here
  ev = common.build_eval_data(config, model.tokenizer)
  y = common.references(config, model, ev.prompts, workdir)
  held = evaluation.HeldOut(
      cfg, model.params, ev.prompts, y, batch_size=config.prompts.batch_size,
      alphas=tuple(config.alphas), kl=config.kl,
      ppl_tokens_WT=None if ev.ppl is None else ev.ppl.tokens,
      ppl_ctx_W=None if ev.ppl is None else ev.ppl.ctx_len, ppl_batch_size=config.ppl.batch_size)
  params_c, report, calibration = common.compress_model(config, model, spec, windows)
  per_prompt = held.per_prompt(params_c)
  agg = metrics.aggregate(per_prompt, tuple(config.alphas))
  ppl = {}
  if ev.ppl is not None:
    for name, p in (("base", model.params), ("compressed", params_c)):
      ppl[name] = held.perplexity(p, desc=f"ppl {name}")
  results = {
      "job": "evaluate", "model": config.model, "model_source": model.source,
      "compression": spec.to_string(), "components": report,
      "settings": ev.settings, "calibration": calibration, "aggregate": agg, "ppl": ppl,
      "per_prompt": {"fdt": per_prompt["fdt"].tolist(), "sdt": per_prompt["sdt"].tolist(),
                     "nll": np.round(per_prompt["nll"], 6).tolist()},
      "config": common.config_json(config), "seconds": round(time.time() - t0, 2),
  }
  io_utils.atomic_write_json(os.path.join(workdir, "results.json"), results)
  print(_summary(model, ev, y, agg, ppl, spec, config))
  print(f"results: {os.path.join(workdir, 'results.json')}")
  return results


def _summary(model, ev, y, agg, ppl, spec, config) -> str:
  n = y.shape[1]
  # the spec on its own line: a recipe (one rule per component group) is far wider than a
  # table column
  rows = [("metric", "value", ""),
          ("prompts x c, N", f"{ev.prompts.shape[0]} x {ev.prompts.shape[1]}", str(n))]
  for a in config.alphas:
    rows.append((f"FDT_{a:g}", f"{agg[f'fdt_alpha_{a:g}']:.0f}", f"of {n}"))
  rows += [("FDT mean / median", f"{agg['fdt_mean']:.2f}", f"{agg['fdt_median']:.1f}"),
           ("SDT mean", f"{agg['sdt_mean']:.4f}", ""),
           ("DPPL", f"{agg['dppl']:.4f}", "")]
  if "kl_mean" in agg:
    rows += [("KL mean / p99", f"{agg['kl_mean']:.5f}", f"{agg['kl_p99']:.5f}"),
             ("top-1 agreement", f"{agg['top1_agree']:.4f}", "")]
  for name, p in ppl.items():
    rows.append((f"PPL {name} (ctx {config.ppl.ctx})", f"{p['ppl']:.4f}", f"{p['tokens']} tok"))
  text = f"compression: {spec.to_string() or 'none'}\n" + _table(rows)
  if model.tokenizer is not None:
    prompt = model.tokenizer.decode(ev.prompts[0], skip_special_tokens=True)
    cont = model.tokenizer.decode(y[0], skip_special_tokens=True)
    text += f"\n\nprompt 0: {prompt!r}\ngreedy continuation (F): {cont!r}"
  return text
