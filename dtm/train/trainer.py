"""Continued training of a compressed model: the library entry point `train`.

    result = train(cfg, params, spec, config.train, tokens=stream, workdir=DIR,
                   heldout=evaluation.HeldOut(...), identity={...})

starts from `params` (the original model F), compresses them with `spec` (masks for the
pruned components, STE fake quantization for the quantized ones), trains on windows of
the token stream (`dtm.data.train_batch`: a pure function of seed and step, so resuming
needs no iterator state), and returns the trained compressed params. Everything it
writes goes under `workdir`: ckpt/ (orbax), metrics.jsonl, tb/, train_config.json.
Rerunning the same call resumes from the latest committed checkpoint and ends with
bit-identical params; SIGTERM saves and returns with `interrupted=True`. The train job
(`dtm.jobs.train`) is a thin wrapper; the pruning rounds call this between rounds.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from dtm import data, io_utils
from dtm.compress import act_quant
from dtm.errors import DtmError
from dtm.model_config import ModelConfig
from dtm.train import masks as masks_lib
from dtm.train import sharding
from dtm.train import step as step_lib
from dtm.train.checkpoints import TrainCheckpoints
from dtm.train.monitor import MetricsLog
from dtm.train.objective import Objective

log = logging.getLogger("dtm")


@dataclasses.dataclass
class TrainResult:
  params: dict                 # trained compressed params (masked, quantized values)
  masks: dict                  # final masks of the pruned components
  step: int                    # updates done
  interrupted: bool            # stopped by SIGTERM (a checkpoint was saved)
  evals: dict                  # step -> held-out metrics
  last: dict                   # the last train record


def objective_of(tc) -> Objective:
  o = tc.objective
  return Objective(alpha=float(o.alpha), temperature=float(o.temperature),
                   div_weight=float(o.div_weight), div_margin=float(o.div_margin),
                   vocab_chunk=int(o.vocab_chunk))


def optim_of(tc) -> step_lib.OptimConfig:
  o = tc.optim
  return step_lib.OptimConfig(
      lr=float(o.lr), warmup_steps=int(o.warmup_steps), total_steps=int(tc.steps),
      min_lr_ratio=float(o.min_lr_ratio), weight_decay=float(o.weight_decay), b1=float(o.b1),
      b2=float(o.b2), eps=float(o.eps), clip_norm=float(o.clip_norm),
      decay_norms=bool(o.decay_norms), decay_embeddings=bool(o.decay_embeddings))


def acdc_of(tc) -> masks_lib.AcdcSchedule:
  a = tc.acdc
  return masks_lib.AcdcSchedule(total=int(tc.steps), dense_warmup=int(a.dense_warmup),
                                compressed=int(a.compressed), decompressed=int(a.decompressed),
                                final_compressed=int(a.final_compressed))


def _check_calibrated(plan, params, acdc) -> None:
  """Calibrated methods in training: pruned ones (wanda, sparsegpt) must come compressed
  and cannot re-derive masks (AC/DC); quantized ones (gptq) cannot be fake-quantized."""
  check_trainable(plan, acdc)
  masks_lib.check_precompressed(plan, params)


def check_trainable(plan, acdc) -> None:
  """`_check_calibrated`'s checks that need no weights (gptq, AC/DC with calibrated masks)."""
  cal = masks_lib.calibrated(plan)
  if cal["quantized"]:
    raise DtmError(
        f"{cal['quantized'][0]} cannot be trained with fake quantization: its codes come "
        f"from calibration statistics and weight updates a train step cannot redo; train "
        f"with rtn(...) of the same bits and group_size (the same grid, straight-through), "
        f"then apply gptq to the trained model")
  if cal["pruned"] and (acdc.alternating or acdc.dense_warmup):
    raise DtmError(
        f"train.acdc with {cal['pruned'][0]}: AC/DC re-derives the masks from the current "
        f"weights by the spec's method, which for wanda / sparsegpt needs calibration "
        f"statistics of the current model; use magnitude or nm for AC/DC, or no AC/DC")


def validate(tc, mesh, num_tokens: int) -> None:
  """One DtmError per bad training setting, before anything is compiled or written."""
  validate_settings(tc)
  dp = sharding.data_parallel_size(mesh)
  if (tc.batch_size // tc.microbatches) % dp:
    raise DtmError(f"train.batch_size={tc.batch_size} / microbatches={tc.microbatches} = "
                   f"{tc.batch_size // tc.microbatches} rows per microbatch is not divisible by "
                   f"the {dp} data-parallel devices (mesh data={mesh.shape['data']} x "
                   f"fsdp={mesh.shape['fsdp']})")
  if data.train_windows(num_tokens, tc.seq_len) < tc.batch_size:
    raise DtmError(f"not enough training data: {num_tokens} tokens give "
                   f"{data.train_windows(num_tokens, tc.seq_len)} windows of {tc.seq_len + 1} "
                   f"tokens, one batch needs {tc.batch_size}; use more data or a smaller "
                   "batch_size/seq_len")


def validate_settings(tc) -> None:
  """The checks of `validate` that need neither devices nor data (run by every job that
  trains before its first model pass: `dtm.jobs.validate`)."""
  if tc.steps < 1:
    raise DtmError(f"train.steps must be >= 1, got {tc.steps}")
  if not tc.optim.lr > 0:
    raise DtmError(f"train.optim.lr must be > 0, got {tc.optim.lr}")
  if tc.optim.warmup_steps < 0 or not 0 <= tc.optim.min_lr_ratio <= 1:
    raise DtmError("train.optim.warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
  if tc.batch_size < 1 or tc.seq_len < 1 or tc.microbatches < 1:
    raise DtmError(f"train.batch_size, seq_len and microbatches must be >= 1, got "
                   f"{tc.batch_size}, {tc.seq_len}, {tc.microbatches}")
  if tc.batch_size % tc.microbatches:
    raise DtmError(f"train.batch_size={tc.batch_size} is not divisible by "
                   f"train.microbatches={tc.microbatches}")
  o = tc.objective
  if not 0 <= o.alpha <= 1 or not o.temperature > 0 or o.div_weight < 0 or not o.div_margin > 0:
    raise DtmError("train.objective needs 0 <= alpha <= 1, temperature > 0, div_weight >= 0, "
                   f"div_margin > 0; got alpha={o.alpha}, temperature={o.temperature}, "
                   f"div_weight={o.div_weight}, div_margin={o.div_margin}")
  if tc.attention_chunk < 0:
    raise DtmError(f"train.attention_chunk must be >= 0 (0 = all query rows at once), got "
                   f"{tc.attention_chunk}")
  if o.vocab_chunk < 0:
    raise DtmError(f"train.objective.vocab_chunk must be >= 0 (0 = whole vocabulary), got "
                   f"{o.vocab_chunk}")
  a = tc.acdc
  if min(a.dense_warmup, a.compressed, a.decompressed, a.final_compressed) < 0:
    raise DtmError("train.acdc phase lengths must be >= 0")
  if (a.compressed > 0) != (a.decompressed > 0):
    raise DtmError("train.acdc: set both compressed and decompressed (> 0) to alternate, or "
                   "neither")
  if a.dense_warmup >= tc.steps:
    raise DtmError(f"train.acdc.dense_warmup={a.dense_warmup} leaves no compressed step of "
                   f"train.steps={tc.steps}")


def check_identity(workdir: str, identity: dict) -> None:
  """Pin the run's settings in train_config.json; a workdir holding a run with other
  settings is refused, naming the differing fields."""
  path = os.path.join(workdir, "train_config.json")
  identity = json.loads(json.dumps(identity))
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = _diff(old, identity)
    if diff:
      shown = ", ".join(f"{k} ({_short(old_v)} -> {_short(new_v)})" for k, old_v, new_v in diff[:8])
      raise DtmError(f"workdir {workdir} holds a training run with a different config: "
                     f"{shown}{' ...' if len(diff) > 8 else ''}; use another --workdir, or the "
                     "same settings to resume")
  else:
    io_utils.atomic_write_json(path, identity)


def _short(v) -> str:
  s = json.dumps(v)
  return s if len(s) <= 60 else s[:57] + "..."


def _diff(a, b, prefix="") -> list[tuple[str, object, object]]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [(prefix[:-1], a, b)]


class _Sigterm:
  """Sets a flag on SIGTERM (preemption); restores the previous handler on exit."""

  def __enter__(self):
    self.flag = False
    self.previous = None
    try:
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler (callers own signals)
      pass
    return self

  def _handle(self, signum, frame):
    self.flag = True

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def _abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def train(cfg: ModelConfig, params, spec, tc, *, tokens: np.ndarray, workdir: str,
          heldout=None, identity: dict | None = None, teacher_params=None,
          mesh=None) -> TrainResult:
  """Continued training (module docstring). `params`: the original model F (also the
  distillation teacher unless `teacher_params` is given); `spec`: compression spec string
  or Spec; `tc`: the `train` config block (configs/train.py); `tokens`: int32 token
  stream; `heldout`: an `evaluation.HeldOut` evaluated at step 0, every
  tc.eval_every steps and at the end; `identity`: settings pinned in train_config.json."""
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh or sharding.make_mesh(int(tc.mesh.data), int(tc.mesh.fsdp))
  tokens = np.asarray(tokens, np.int32)
  validate(tc, mesh, tokens.size)
  plan = masks_lib.make_plan(spec, params)
  if plan.components == 0:
    raise DtmError(f"compression spec {plan.spec.to_string()!r} selects no component: nothing "
                   "to recover; give a spec such as 'mlp@*:magnitude(0.5)'")
  obj, oc, acdc = objective_of(tc), optim_of(tc), acdc_of(tc)
  _check_calibrated(plan, params, acdc)
  check_identity(workdir, {**(identity or {}), "spec": plan.spec.to_string()})
  tcfg = cfg.replace(remat=bool(tc.remat), attention_chunk=int(tc.attention_chunk))
  teacher = (teacher_params if teacher_params is not None else params) if obj.needs_teacher else None
  teacher = None if teacher is None else step_lib.teacher_copy(cfg, teacher)

  compressed, masks = jax.jit(lambda p: masks_lib.prune(plan, p))(params)
  tx = step_lib.make_optimizer(oc, compressed)
  seed = int(tc.seed)
  abstract = jax.eval_shape(lambda p, m: step_lib.init_state(p, m, tx, seed), compressed, masks)
  shardings = step_lib.state_shardings(mesh, abstract)
  ckpts = TrainCheckpoints(os.path.join(workdir, "ckpt"), every=int(tc.checkpoint.every),
                           keep=int(tc.checkpoint.keep), use_async=bool(tc.checkpoint.use_async))
  restored = ckpts.restore_latest(_abstract_with_shardings(abstract, shardings))
  if restored is None:
    state = jax.jit(lambda p, m: step_lib.init_state(p, m, tx, seed),
                    out_shardings=shardings)(compressed, masks)
    start = 0
  else:
    start, state, meta = restored
    ckpts.set_aside(start)
    if int(meta["data"]["num_tokens"]) != tokens.size:
      raise DtmError(f"the training data changed since the checkpoint: it had "
                     f"{meta['data']['num_tokens']} tokens, now {tokens.size}")
    print(f"resuming from checkpoint step {start} in {ckpts.directory}", flush=True)
  del compressed, masks
  teacher_shardings = None
  if teacher is not None:
    teacher_shardings = sharding.tree_shardings(mesh, teacher)
    teacher = sharding.place(teacher, teacher_shardings)

  schedule = step_lib.lr_schedule(oc)
  steps_fn = {}

  def step_fn(masked: bool):
    if masked not in steps_fn:
      steps_fn[masked] = step_lib.compile_step(
          tcfg, obj, plan, tx, mesh, shardings, teacher_shardings,
          microbatches=int(tc.microbatches), masked=masked, schedule=schedule,
          clip_norm=oc.clip_norm)
    return steps_fn[masked]

  remask = jax.jit(lambda s: {**s, **dict(zip(("params", "masks"),
                                             masks_lib.prune(plan, s["params"])))},
                   out_shardings=shardings, donate_argnums=(0,))
  # (activation modes add leaves: that tree has no sharding tree here, jit places it)
  effective = jax.jit(lambda p: masks_lib.quantize(plan, p, ste=False),
                      out_shardings=None if plan.activation else shardings["params"])
  sparsity = jax.jit(masks_lib.sparsity_by_kind)
  batch_sharding = sharding.batch_sharding(mesh)
  tokens_per_step = tc.batch_size * tc.seq_len
  flops_per_token = step_lib.train_flops_per_token(cfg, int(tc.seq_len), obj.needs_teacher)
  peak = float(tc.peak_flops) * mesh.size
  is_writer = jax.process_index() == 0
  mlog = MetricsLog(workdir, None if restored is None else start,
                    tensorboard=bool(tc.tensorboard), enabled=is_writer)
  evals = {r["step"]: r["eval"] for r in mlog.records if "eval" in r}
  meta = {"data": {"seed": seed, "batch": int(tc.batch_size), "seq_len": int(tc.seq_len),
                   "num_tokens": int(tokens.size)}}

  def run_eval(s: int, st) -> dict | None:
    if heldout is None:
      return None
    result = heldout.evaluate(effective(st["params"]))  # as trained: masked in C phases
    evals[s] = result
    return result

  if start == 0 and not mlog.records and heldout is not None:
    ev0 = run_eval(0, state)
    mlog.write({"step": 0, "eval": ev0})
    print(f"step 0 (untrained compressed model): {_eval_line(ev0)}", flush=True)

  last: dict = {}
  pending = None  # (step, device metrics, t_dispatch)
  t_prev = time.perf_counter()

  def flush(st) -> None:
    nonlocal pending, t_prev, last
    if pending is None:
      return
    s, m_dev, masked = pending
    pending = None
    m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
    now = time.perf_counter()
    dt, t_prev = now - t_prev, now
    if not m.pop("finite"):
      raise DtmError(f"non-finite training loss or gradient norm at step {s} (loss={m['loss']}, "
                     f"grad_norm={m['grad_norm']}); stopped before saving any later state. Last "
                     f"good checkpoint: {_last_good(ckpts)}. Lower train.optim.lr or check the "
                     "data")
    m["tokens_per_s"] = tokens_per_step / dt
    m["flops_per_s"] = m["tokens_per_s"] * flops_per_token
    if peak > 0:
      m["mfu"] = m["flops_per_s"] / peak
    m["compressed_phase"] = float(masked)
    record = {"step": s, "train": m}
    if tc.log_every and (s % tc.log_every == 0 or s == tc.steps):
      record["sparsity"] = {k: float(v) for k, v in jax.device_get(sparsity(st["params"])).items()}
    if s == tc.steps or (tc.eval_every and s % tc.eval_every == 0):
      record["eval"] = run_eval(s, st)
    mlog.write(record)
    last = record
    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
    if "eval" in record and record["eval"] is not None:
      bar.write(f"step {s}: {_eval_line(record['eval'])}")

  bar = tqdm(total=int(tc.steps), initial=start, unit="step", desc="train", smoothing=0.1,
             mininterval=0.5 if sys.stderr.isatty() else 10, dynamic_ncols=True)
  s = start
  interrupted = False
  try:
    with _Sigterm() as term:
      while s < tc.steps:
        if acdc.remask_at(s):
          state = remask(state)
        masked = acdc.is_compressed(s)
        batch = data.train_batch(tokens, batch=int(tc.batch_size), seq_len=int(tc.seq_len),
                                 seed=seed, step=s)
        state, m_dev = step_fn(masked)(state, sharding.put_batch(batch, batch_sharding), teacher)
        flush(state)  # the previous step's metrics: the host never waits for this step
        s += 1
        pending = (s, m_dev, masked)
        bar.update(1)
        due = s % int(tc.checkpoint.every) == 0 or s == tc.steps
        logging_now = s == tc.steps or any(e and s % e == 0 for e in (tc.eval_every, tc.log_every))
        if due or logging_now or term.flag:
          flush(state)  # metrics (and a finite loss) before anything is saved
        if due or term.flag:
          ckpts.save(s, state, {**meta, "step": s}, force=True)
        if term.flag and s < tc.steps:
          ckpts.wait()
          interrupted = True
          bar.close()
          print(f"SIGTERM: saved a checkpoint at step {s} in {ckpts.directory}; rerun the same "
                "command to resume", file=sys.stderr, flush=True)
          break
      flush(state)
  finally:
    bar.close()
    ckpts.close()
    mlog.close()
  final_params, final_masks = state["params"], state["masks"]
  if not interrupted and not acdc.is_compressed(int(tc.steps) - 1):
    final_params, final_masks = jax.jit(lambda p: masks_lib.prune(plan, p))(final_params)
  # w8a8 / llm_int8 run at inference from the spec: the saved model holds float kernels
  return TrainResult(params=act_quant.strip(effective(final_params)), masks=final_masks, step=s,
                     interrupted=interrupted, evals=evals, last=last)


def _last_good(ckpts: TrainCheckpoints) -> str:
  ckpts.wait()
  steps = ckpts.steps()
  return f"step {steps[-1]} in {ckpts.directory} (intact)" if steps else "none written yet"


def _eval_line(ev: dict | None) -> str:
  if not ev:
    return ""
  parts = [f"{k}={ev[k]:.3f}" for k in ev if k.startswith("fdt_alpha")]
  parts += [f"fdt_mean={ev['fdt_mean']:.2f}", f"sdt={ev['sdt_mean']:.3f}",
            f"dppl={ev['dppl']:.4f}"]
  if "ppl" in ev:
    parts.append(f"ppl={ev['ppl']:.3f}")
  return " ".join(parts)
