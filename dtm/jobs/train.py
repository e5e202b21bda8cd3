"""Train job: recover a compressed model by continued training (`dtm.train.trainer.train`).

Steps: load F; training token stream (config.data); held-out prompts with F's references
and PPL windows (config.eval); train; write <workdir>/model (a dtm model directory holding
the trained compressed params: zeros and quantized values included), optionally
<workdir>/hf, and results.json (held-out metrics before and after, settings). Rerunning
the same command resumes; a finished run only rewrites its outputs.
"""
from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np

from dtm import checkpoint, compress, convert, data, evaluation, io_utils
from dtm.errors import DtmError
from dtm.jobs import common, validate
from dtm.model import abstract_params
from dtm.train import sharding, trainer

log = logging.getLogger("dtm")


def training_tokens(config, tokenizer) -> np.ndarray:
  """The training token stream: config.data's documents joined and tokenized once."""
  if tokenizer is None:
    raise DtmError("the model has no tokenizer to tokenize config.data; load a model with one")
  texts = common.load_texts(config)
  bos = common.resolve_bos(config, tokenizer)
  stream = data.tokenize_corpus(tokenizer, texts, add_bos=bos is not None)
  if stream.size == 0:
    raise DtmError(f"no training tokens in data.source={config.data.source!r} "
                   f"data_files={config.data.data_files!r}")
  return stream


def load_for_training(config):
  """(F, the trainer's ('data', 'fsdp') mesh). With mesh.fsdp > 1, F loads straight into
  the FSDP layout (`sharding.tree_shardings`): a pod-sized model is never whole on one
  device (Llama-2-7B in float32 is 27 GB, a v5e chip has 16 GiB), and the references and
  held-out evaluation run on the sharded params. Otherwise F loads as every job loads it."""
  tc = config.train
  mesh = sharding.make_mesh(int(tc.mesh.data), int(tc.mesh.fsdp))
  if mesh.shape["fsdp"] == 1:
    return common.load(config), mesh
  return common.load(config, shardings_fn=lambda cfg: sharding.tree_shardings(
      mesh, abstract_params(cfg))), mesh


def heldout(config, model, workdir: str) -> tuple[evaluation.HeldOut, dict]:
  """Held-out prompts, F's references (cached) and PPL windows from config.eval."""
  ev = common.build_eval_data(config.eval, model.tokenizer)
  y = common.references(config.eval, model, ev.prompts, workdir)
  return evaluation.HeldOut(
      model.cfg, model.params, ev.prompts, y, batch_size=config.eval.prompts.batch_size,
      alphas=tuple(config.eval.alphas), kl=bool(config.eval.kl),
      ppl_tokens_WT=None if ev.ppl is None else ev.ppl.tokens,
      ppl_ctx_W=None if ev.ppl is None else ev.ppl.ctx_len,
      ppl_batch_size=config.eval.ppl.batch_size), ev.settings


def run(config, workdir: str) -> dict | None:
  os.makedirs(workdir, exist_ok=True)
  validate.validate(config)  # every config error before the slow load
  spec = compress.parse_spec(config.compression)
  model, mesh = load_for_training(config)
  tokens = training_tokens(config, model.tokenizer)
  held, eval_settings = heldout(config, model, workdir)
  identity = {"model": config.model, "model_source": model.source,
              "params": io_utils.params_fingerprint(model.params),
              "tokens": io_utils.array_fingerprint(tokens),
              "config": {k: v for k, v in common.config_json(config).items()
                         if k not in ("cpu_devices",)}}
  start, calib = model.params, None
  windows = common.calibration_for(config, model, spec)
  if windows is not None:
    # wanda / sparsegpt: compressed once with calibration windows; F stays the teacher
    start, _, calib = common.compress_model(config, model, spec, windows)
    identity["calibration"] = calib
  result = trainer.train(model.cfg, start, spec, config.train, tokens=tokens,
                         workdir=workdir, heldout=held, identity=identity,
                         teacher_params=model.params, mesh=mesh)
  if result.interrupted:
    return None
  if jax.process_index() != 0:
    return None
  out = os.path.join(workdir, "model")
  if os.path.isdir(out):  # a finished run rerun: replace the outputs atomically enough
    shutil.rmtree(out)
  checkpoint.save_model(out, model.cfg, result.params, model.tokenizer,
                        source=f"dtm train of {model.source} ({spec.to_string()})")
  if config.export_hf:
    hf = os.path.join(workdir, "hf")
    if os.path.isdir(hf):
      shutil.rmtree(hf)
    convert.export_hf(result.params, model.cfg, hf, model.tokenizer)
  before, after = result.evals.get(0), result.evals.get(result.step)
  results = {
      "job": "train", "model": config.model, "model_source": model.source,
      "compression": compress.parse_spec(spec).to_string(), "steps": result.step,
      "params_fingerprint": io_utils.params_fingerprint(result.params),
      "heldout_before": before, "heldout_after": after, "last_train": result.last.get("train"),
      "eval_settings": eval_settings, "train_tokens": int(tokens.size), "calibration": calib,
      "config": common.config_json(config),
  }
  io_utils.atomic_write_json(os.path.join(workdir, "results.json"), results)
  print(_summary(before, after, config))
  print(f"trained model: {out} (use --config.model={out})")
  return results


def _summary(before: dict | None, after: dict | None, config) -> str:
  if not before or not after:
    return "held-out evaluation: not available"
  rows = [("held-out", "before", "after")]
  keys = [f"fdt_alpha_{a:g}" for a in config.eval.alphas] + ["fdt_mean", "sdt_mean", "dppl"]
  keys += [k for k in ("kl_mean", "top1_agree", "ppl") if k in after]
  for k in keys:
    rows.append((k, f"{before[k]:.4f}", f"{after[k]:.4f}"))
  w = [max(len(r[i]) for r in rows) for i in range(3)]
  return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows)
