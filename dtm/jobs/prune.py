"""Prune job: FDT-guided iterative pruning (`dtm.search.prune_rounds`), by magnitude or
with a calibrated operator (prune.method=wanda|sparsegpt, `dtm.search.increments`),
from F or from a one-shot recipe (prune.start: refinement of an allocation).

Steps: load F; selection prompts with F's references (config.select); held-out prompts,
references and PPL windows (config.eval; disjoint from the selection prompts); training
tokens (config.data, when train.steps > 0); run or resume the rounds; write
  rounds.jsonl          one record per round (round 0 = the original model),
  results.json          final spec, stop reason, per-round summary, settings,
  model/                the final model (a dtm model directory; hf/ with export_hf),
  sparsity_heatmap.png  per-component sparsity of the final model (layers x kinds),
  curves.png            held-out FDT_α, DPPL and PPL against overall sparsity.
Rerunning the same command resumes; a finished run only rewrites its outputs.
"""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from dtm import checkpoint, compress, convert, evaluation, io_utils, probe
from dtm.errors import DtmError
from dtm.jobs import common, validate
from dtm.jobs.train import load_for_training, training_tokens
from dtm.model import abstract_params
from dtm.search import increments, plots, prune_rounds
from dtm.train import sharding
from dtm.train import trainer

# Settings that do not change results (left out of the pinned identity).
_EXECUTION_ONLY = ("cpu_devices", "export_hf")
_EXECUTION_ONLY_SELECT = ("mesh_model",)


def settings_of(config, num_layers: int | None) -> prune_rounds.PruneSettings:
  """config.prune as settings, validated (num_layers None: before the model is loaded,
  the component selector is only parsed)."""
  p = config.prune
  s = prune_rounds.PruneSettings(
      ladder=tuple(float(x) for x in p.ladder), k=int(p.k), alpha=float(p.alpha),
      fdt_bound=float(p.fdt_bound), target_sparsity=float(p.target_sparsity),
      max_rounds=int(p.max_rounds),
      components=prune_rounds.prunable(p.components, num_layers) if num_layers else (),
      operator=increments.Operator(p.method, p.method_args, config.calibration.mode,
                                   int(config.calibration.batch_size)),
      rank_by=p.rank_by)
  if num_layers is None:
    compress.parse_rule(f"{p.components}:identity")
  prune_rounds.validate_settings(s, int(config.eval.prompts.new_tokens))
  return s


def selection_mesh(config, devices=None):
  """The selection probes' ('probe', 'model') mesh over `devices` (default: all):
  select.mesh_model devices per tensor-parallel group (DtmError unless it divides them)."""
  devices = list(jax.devices() if devices is None else devices)
  m = int(config.select.mesh_model)
  if m < 1 or len(devices) % m:
    raise DtmError(f"select.mesh_model={m} must be >= 1 and divide the {len(devices)} devices")
  return probe.probe_mesh(devices, model=m)


def _check_prompt_blocks(config) -> None:
  for name in ("select", "eval"):
    pr = config[name].prompts
    if not pr.jsonl and pr.num < 1:
      raise DtmError(f"{name}.prompts.num must be >= 1, got {pr.num}: the {name} prompt set "
                     "is empty")


def run(config, workdir: str) -> dict | None:
  os.makedirs(workdir, exist_ok=True)
  settings = settings_of(config, None)  # model-independent checks before the slow load
  if settings.operator.calibrated:
    common.check_calibration_block(config.calibration, settings.operator.name)
  validate.validate(config)
  _check_prompt_blocks(config)
  steps = int(config.train.steps)
  if steps < 0:
    raise DtmError(f"train.steps must be >= 0 (0 = no training between rounds), got {steps}")
  probe_mesh = selection_mesh(config)  # a bad select.mesh_model is refused before the load
  # F in the trainer's FSDP layout when train.mesh.fsdp > 1 (a pod-sized model is never
  # whole on one device), and every round's params in that layout too
  model, train_mesh = load_for_training(config)
  cfg = model.cfg
  settings = settings_of(config, cfg.num_layers)
  layout = None
  if train_mesh.shape["fsdp"] > 1:
    layout = sharding.tree_shardings(train_mesh, abstract_params(cfg))
  tokens = np.zeros((0,), np.int32)
  if steps > 0:
    tokens = training_tokens(config, model.tokenizer)
    trainer.validate(config.train, train_mesh, tokens.size)
  windows = cal_settings = None
  if settings.operator.calibrated:
    windows, cal_settings = common.calibration_data(config, model)
  start_spec, start_levels = _start(config, model.params, settings)
  sel = common.build_eval_data(config.select, model.tokenizer, need_ppl=False)
  ev = common.build_eval_data(config.eval, model.tokenizer)
  prune_rounds.check_disjoint(sel.prompts, ev.prompts)
  y_sel = common.references(config.select, model, sel.prompts, os.path.join(workdir, "select"))
  y_ev = common.references(config.eval, model, ev.prompts, os.path.join(workdir, "heldout"))
  alphas = tuple(sorted({float(a) for a in config.eval.alphas} | {settings.alpha}))
  held = evaluation.HeldOut(
      cfg, model.params, ev.prompts, y_ev, batch_size=config.eval.prompts.batch_size,
      alphas=alphas, kl=bool(config.eval.kl),
      ppl_tokens_WT=None if ev.ppl is None else ev.ppl.tokens,
      ppl_ctx_W=None if ev.ppl is None else ev.ppl.ctx_len,
      ppl_batch_size=config.eval.ppl.batch_size)
  identity = {"model": config.model, "model_source": model.source,
              "params": io_utils.params_fingerprint(model.params),
              "select": io_utils.array_fingerprint(sel.prompts, y_sel),
              "heldout": io_utils.array_fingerprint(ev.prompts, y_ev),
              "tokens": io_utils.array_fingerprint(tokens),
              "calibration": None if cal_settings is None else {
                  k: v for k, v in cal_settings.items() if k != "batch_size"},
              "start": start_spec, "config": _identity_config(config)}
  prune_rounds.check_identity(workdir, identity)
  print(f"pruning search: {len(settings.components)} prunable components, ladder "
        f"{settings.ladder}, k={settings.k}, FDT_{settings.alpha:g} on {sel.prompts.shape[0]} "
        f"selection prompts (c={sel.prompts.shape[1]}, N={y_sel.shape[1]}), "
        f"{ev.prompts.shape[0]} held-out prompts, {steps} training steps per round, "
        f"{jax.device_count()} device(s)", flush=True)
  ctx = prune_rounds.Context(
      cfg=cfg, params=model.params, select_seq=np.concatenate([sel.prompts, y_sel], axis=1),
      c=int(sel.prompts.shape[1]), heldout=held, tc=config.train, tokens=tokens,
      tokenizer=model.tokenizer, alphas=alphas, mesh=probe_mesh, train_mesh=train_mesh,
      param_shardings=layout, identity={"prune": identity["params"]}, windows=windows,
      start_levels=start_levels,
      start_params=_start_params(config, model, start_spec, windows, cal_settings, layout))
  records, reason = prune_rounds.run(ctx, settings, workdir)
  if reason is None:
    return None  # SIGTERM during training: the trainer saved; rerun to resume
  return _outputs(config, workdir, model, ctx, settings, records, reason, alphas,
                  {"select": sel.settings, "heldout": ev.settings})


def _start(config, params, settings) -> tuple[str | None, dict]:
  """prune.start (a recipe file, e.g. the allocate job's recipe-0.4.txt, or spec text)
  -> (its canonical spec, Component -> rate); (None, {}) when the search starts at F."""
  text = config.prune.start.strip()
  if not text:
    return None, {}
  if os.path.isfile(text):
    with open(text) as f:
      text = f.read().strip()
  elif "@" not in text and ":" not in text:
    raise DtmError(f"prune.start={text!r} is neither a recipe file nor a spec")
  num_layers, shapes = compress.kernel_shapes(params)
  spec = compress.validate(text, num_layers, shapes)
  levels = increments.levels_of_spec(spec, num_layers, settings.operator, settings.components)
  if not levels:
    raise DtmError("prune.start selects no component: give a recipe with rates, or leave it empty")
  return prune_rounds.spec_of(levels, settings.operator), levels


def _start_params(config, model, spec, windows, cal_settings, layout):
  """Round 0's model of a refinement: F with the start recipe applied with
  config.calibration (as the evaluate job applies a recipe), placed like F."""
  if spec is None:
    return None
  params, _, _ = common.compress_model(config, model, spec,
                                       None if windows is None else (windows, cal_settings))
  if layout is not None:
    return jax.device_put(params, layout)
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x)), params)


def _identity_config(config) -> dict:
  """The config as pinned in the search's identity: without the settings that do not
  change results (`_EXECUTION_ONLY`, select.mesh_model)."""
  out = {k: v for k, v in common.config_json(config).items() if k not in _EXECUTION_ONLY}
  out["select"] = {k: v for k, v in out["select"].items() if k not in _EXECUTION_ONLY_SELECT}
  return out


def _outputs(config, workdir, model, ctx, settings, records, reason, alphas, data_settings):
  last = records[-1]
  if last["round"] == 0:
    params = model.params
  else:
    params = checkpoint.restore_params(
        os.path.join(prune_rounds.round_dir(workdir, last["round"]), "model"), model.cfg,
        ctx.param_shardings)
  out = os.path.join(workdir, "model")
  if os.path.isdir(out):
    shutil.rmtree(out)
  checkpoint.save_model(out, model.cfg, params, model.tokenizer,
                        source=f"dtm prune of {model.source} ({last['spec']})")
  if config.export_hf:
    hf = os.path.join(workdir, "hf")
    if os.path.isdir(hf):
      shutil.rmtree(hf)
    convert.export_hf(params, model.cfg, hf, model.tokenizer)
  key = f"fdt_alpha_{settings.alpha:g}"
  within = [r["round"] for r in records if r["heldout"][key] >= settings.fdt_bound]
  summary = [{"round": r["round"], "sparsity": r["sparsity"], "spec": r["spec"],
              "heldout": r["heldout"]} for r in records]
  results = {"job": "prune", "model": config.model, "model_source": model.source,
             "final_spec": last["spec"], "final_round": last["round"],
             "final_sparsity": last["sparsity"], "final_heldout": last["heldout"],
             "stop_reason": reason, "last_round_within_bound": max(within) if within else None,
             "rounds": summary, "data": data_settings, "config": common.config_json(config)}
  io_utils.atomic_write_json(os.path.join(workdir, "results.json"), results)
  n = int(config.eval.prompts.new_tokens)
  plots.sparsity_heatmap(os.path.join(workdir, "sparsity_heatmap.png"),
                         last["per_component_sparsity"],
                         f"{config.model}: FDT-guided pruning, round {last['round']}, "
                         f"overall {last['sparsity']:.1%}")
  plots.curves(os.path.join(workdir, "curves.png"), records, alphas, n,
               f"{config.model}: held-out metrics per pruning round (N={n})")
  print(f"stopped: {reason} after round {last['round']}; overall sparsity "
        f"{last['sparsity']:.4f}; final spec: {last['spec']}")
  print(f"results: {workdir}/results.json, rounds.jsonl, model/, sparsity_heatmap.png, curves.png")
  return results
