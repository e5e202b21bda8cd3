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
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from dtm import data
from dtm.compress import act_quant
from dtm.errors import DtmError
from dtm.model_config import ModelConfig
from dtm.train import masks as masks_lib
from dtm.train import sharding
from dtm.train import step as step_lib
from dtm.train.checkpoints import TrainCheckpoints
from dtm.train.monitor import MetricsLog
from dtm.train.objective import Objective
# the settings' readers and checks, re-exported for the jobs that call them through trainer
from dtm.train.settings import (acdc_of, check_calibrated, check_identity,  # noqa: F401
                                check_trainable, objective_of, optim_of, validate,
                                validate_settings)

log = logging.getLogger("dtm")


@dataclasses.dataclass
class TrainResult:
  params: dict                 # trained compressed params (masked, quantized values)
  masks: dict                  # final masks of the pruned components
  step: int                    # updates done
  interrupted: bool            # stopped by SIGTERM (a checkpoint was saved)
  evals: dict                  # step -> held-out metrics
  last: dict                   # the last train record


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


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Fns:
  """The jitted functions of a run (built once by `_compile`)."""
  step: Callable[[bool], Callable]  # masked -> compiled train step (state, batch, teacher)
  remask: Callable                  # state -> state with masks re-derived (AC/DC)
  effective: Callable               # params -> the params as evaluated (fake-quantized)
  sparsity: Callable                # params -> {kind: fraction of zeros}
  batch_sharding: Any               # sharding of a [B, T + 1] token batch


@dataclasses.dataclass
class _Run:
  """What `train` sets up once (`_setup`) and its loop reads."""
  tc: Any                           # the `train` config block
  plan: masks_lib.CompressionPlan
  obj: Objective
  acdc: masks_lib.AcdcSchedule
  mesh: Any
  tokens: np.ndarray                # int32 training token stream
  seed: int
  state: dict | None                # initial train state (the loop takes it: None after)
  start: int                        # first step to run (the restored step, or 0)
  resumed: bool                     # restored from a checkpoint
  teacher: Any                      # the distillation teacher's params (placed), or None
  ckpts: TrainCheckpoints
  meta: dict                        # checkpoint metadata (the data settings)
  fns: _Fns


def train(cfg: ModelConfig, params, spec, tc, *, tokens: np.ndarray, workdir: str,
          heldout=None, identity: dict | None = None, teacher_params=None,
          mesh=None) -> TrainResult:
  """Continued training (module docstring). `params`: the original model F (also the
  distillation teacher unless `teacher_params` is given); `spec`: compression spec string
  or Spec; `tc`: the `train` config block (configs/train.py); `tokens`: int32 token
  stream; `heldout`: an `evaluation.HeldOut` evaluated at step 0, every
  tc.eval_every steps and at the end; `identity`: settings pinned in train_config.json.

  In order: `_setup` (validate, plan, restore or initialize the state, compile), the
  step-0 evaluation, `_loop` (steps, one-step-late metrics, checkpoints, SIGTERM), and
  `_finish` (the final masks and the params as evaluated)."""
  run = _setup(cfg, params, spec, tc, tokens=tokens, workdir=workdir, identity=identity,
               teacher_params=teacher_params, mesh=mesh)
  report = _Reporter(run, cfg, workdir, heldout)
  try:
    report.initial_eval(run.state)
    report.start_bar()
    s, state, interrupted = _loop(run, report)
  finally:
    report.close()
    run.ckpts.close()
  return _finish(run, report, s, state, interrupted)


def _setup(cfg: ModelConfig, params, spec, tc, *, tokens, workdir: str, identity,
           teacher_params, mesh) -> _Run:
  """Everything before the first step: one DtmError per bad setting before any work, the
  compression plan, the train state (restored from workdir/ckpt or initialized from the
  compressed params), the placed teacher and the compiled functions."""
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh or sharding.make_mesh(int(tc.mesh.data), int(tc.mesh.fsdp))
  tokens = np.asarray(tokens, np.int32)
  validate(tc, mesh, tokens.size)
  plan = masks_lib.make_plan(spec, params)
  if plan.components == 0:
    raise DtmError(f"compression spec {plan.spec.to_string()!r} selects no component: nothing "
                   "to recover; give a spec such as 'mlp@*:magnitude(0.5)'")
  obj, oc, acdc = objective_of(tc), optim_of(tc), acdc_of(tc)
  check_calibrated(plan, params, acdc)
  check_identity(workdir, {**(identity or {}), "spec": plan.spec.to_string()})
  teacher = (teacher_params if teacher_params is not None else params) if obj.needs_teacher else None
  teacher = None if teacher is None else step_lib.teacher_copy(cfg, teacher)
  tx, state, restored, shardings, ckpts = _init_or_restore(plan, params, tc, oc, mesh, workdir,
                                                           tokens.size)
  teacher, teacher_shardings = _place_teacher(mesh, teacher)
  fns = _compile(cfg, tc, obj, oc, plan, tx, mesh, shardings, teacher_shardings)
  meta = {"data": {"seed": int(tc.seed), "batch": int(tc.batch_size), "seq_len": int(tc.seq_len),
                   "num_tokens": int(tokens.size)}}
  return _Run(tc=tc, plan=plan, obj=obj, acdc=acdc, mesh=mesh, tokens=tokens, seed=int(tc.seed),
              state=state, start=restored or 0, resumed=restored is not None, teacher=teacher,
              ckpts=ckpts, meta=meta, fns=fns)


def _init_or_restore(plan, params, tc, oc: step_lib.OptimConfig, mesh, workdir: str,
                     num_tokens: int):
  """(optimizer, state, restored step, state shardings, checkpoints): the latest committed
  checkpoint of workdir/ckpt restored into the sharded abstract state, or else a new
  state from the compressed params (restored step None)."""
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
    return tx, state, None, shardings, ckpts
  start, state, meta = restored
  ckpts.set_aside(start)
  if int(meta["data"]["num_tokens"]) != num_tokens:
    raise DtmError(f"the training data changed since the checkpoint: it had "
                   f"{meta['data']['num_tokens']} tokens, now {num_tokens}")
  print(f"resuming from checkpoint step {start} in {ckpts.directory}", flush=True)
  return tx, state, start, shardings, ckpts


def _place_teacher(mesh, teacher):
  """(teacher params placed by the FSDP rules, their shardings); (None, None) without a
  teacher."""
  if teacher is None:
    return None, None
  teacher_shardings = sharding.tree_shardings(mesh, teacher)
  return sharding.place(teacher, teacher_shardings), teacher_shardings


def _compile(cfg: ModelConfig, tc, obj: Objective, oc: step_lib.OptimConfig, plan, tx, mesh,
             shardings, teacher_shardings) -> _Fns:
  """The run's jitted functions; the train step is compiled on first use, once per phase
  kind (masked or not)."""
  tcfg = cfg.replace(remat=bool(tc.remat), attention_chunk=int(tc.attention_chunk))
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
  return _Fns(step=step_fn, remask=remask, effective=effective,
              sparsity=jax.jit(masks_lib.sparsity_by_kind),
              batch_sharding=sharding.batch_sharding(mesh))


def _loop(run: _Run, report: "_Reporter") -> tuple[int, dict, bool]:
  """Steps run.start .. tc.steps -> (steps done, final state, interrupted). Each step's
  metrics are read after the next step is dispatched (the host never waits for the step
  it just queued), except before a checkpoint, a logged or evaluated step, or SIGTERM."""
  tc, fns = run.tc, run.fns
  state, run.state = run.state, None  # the steps donate it
  s = run.start
  with _Sigterm() as term:
    while s < tc.steps:
      if run.acdc.remask_at(s):
        state = fns.remask(state)
      masked = run.acdc.is_compressed(s)
      batch = data.train_batch(run.tokens, batch=int(tc.batch_size), seq_len=int(tc.seq_len),
                               seed=run.seed, step=s)
      state, m_dev = fns.step(masked)(state, sharding.put_batch(batch, fns.batch_sharding),
                                      run.teacher)
      report.flush(state)  # the previous step's metrics
      s += 1
      report.push(s, m_dev, masked)
      due = s % int(tc.checkpoint.every) == 0 or s == tc.steps
      logging_now = s == tc.steps or any(e and s % e == 0 for e in (tc.eval_every, tc.log_every))
      if due or logging_now or term.flag:
        report.flush(state)  # metrics (and a finite loss) before anything is saved
      if due or term.flag:
        run.ckpts.save(s, state, {**run.meta, "step": s}, force=True)
      if term.flag and s < tc.steps:
        run.ckpts.wait()
        report.bar.close()
        print(f"SIGTERM: saved a checkpoint at step {s} in {run.ckpts.directory}; rerun the same "
              "command to resume", file=sys.stderr, flush=True)
        return s, state, True
    report.flush(state)
  return s, state, False


def _finish(run: _Run, report: "_Reporter", s: int, state, interrupted: bool) -> TrainResult:
  """The result: a run that ends in a decompressed phase (AC/DC) is compressed once more;
  the params are those evaluated (fake-quantized values, masks applied)."""
  final_params, final_masks = state["params"], state["masks"]
  if not interrupted and not run.acdc.is_compressed(int(run.tc.steps) - 1):
    final_params, final_masks = jax.jit(lambda p: masks_lib.prune(run.plan, p))(final_params)
  # w8a8 / llm_int8 run at inference from the spec: the saved model holds float kernels
  return TrainResult(params=act_quant.strip(run.fns.effective(final_params)), masks=final_masks,
                     step=s, interrupted=interrupted, evals=report.evals, last=report.last)


class _Reporter:
  """The host side of a run: metrics read one step late (`push`, then `flush`), a
  non-finite loss raised before anything later is saved, records (train metrics, sparsity
  and held-out evaluations on their steps) to metrics.jsonl / TensorBoard, the bar."""

  def __init__(self, run: _Run, cfg: ModelConfig, workdir: str, heldout):
    tc = run.tc
    self.run, self.heldout = run, heldout
    self.mlog = MetricsLog(workdir, run.start if run.resumed else None,
                           tensorboard=bool(tc.tensorboard), enabled=jax.process_index() == 0)
    self.evals = {r["step"]: r["eval"] for r in self.mlog.records if "eval" in r}
    self.tokens_per_step = tc.batch_size * tc.seq_len
    self.flops_per_token = step_lib.train_flops_per_token(cfg, int(tc.seq_len),
                                                          run.obj.needs_teacher)
    self.peak = float(tc.peak_flops) * run.mesh.size
    self.last: dict = {}
    self.pending = None  # (step, device metrics, compressed phase)
    self.bar = None
    self.t_prev = None

  def evaluate(self, s: int, state) -> dict | None:
    if self.heldout is None:
      return None
    result = self.heldout.evaluate(self.run.fns.effective(state["params"]))  # masked in C phases
    self.evals[s] = result
    return result

  def initial_eval(self, state) -> None:
    """Step 0 (the untrained compressed model), unless resuming."""
    if self.run.start == 0 and not self.mlog.records and self.heldout is not None:
      ev0 = self.evaluate(0, state)
      self.mlog.write({"step": 0, "eval": ev0})
      print(f"step 0 (untrained compressed model): {_eval_line(ev0)}", flush=True)

  def start_bar(self) -> None:
    self.t_prev = time.perf_counter()
    self.bar = tqdm(total=int(self.run.tc.steps), initial=self.run.start, unit="step",
                    desc="train", smoothing=0.1,
                    mininterval=0.5 if sys.stderr.isatty() else 10, dynamic_ncols=True)

  def push(self, s: int, m_dev, masked: bool) -> None:
    """Step s was dispatched (its metrics m_dev still on the device)."""
    self.pending = (s, m_dev, masked)
    self.bar.update(1)

  def flush(self, state) -> None:
    """Read and write the pending step's record (the train state after it: `state`)."""
    if self.pending is None:
      return
    s, m_dev, masked = self.pending
    self.pending = None
    tc = self.run.tc
    record = {"step": s, "train": self._train_metrics(s, jax.device_get(m_dev), masked)}
    if tc.log_every and (s % tc.log_every == 0 or s == tc.steps):
      record["sparsity"] = {k: float(v) for k, v in
                            jax.device_get(self.run.fns.sparsity(state["params"])).items()}
    if s == tc.steps or (tc.eval_every and s % tc.eval_every == 0):
      record["eval"] = self.evaluate(s, state)
    self.mlog.write(record)
    self.last = record
    m = record["train"]
    self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
    if record.get("eval") is not None:
      self.bar.write(f"step {s}: {_eval_line(record['eval'])}")

  def _train_metrics(self, s: int, m_host: dict, masked: bool) -> dict:
    """Host floats of a step's metrics, with throughput; DtmError if not finite."""
    m = {k: float(v) for k, v in m_host.items()}
    now = time.perf_counter()
    dt, self.t_prev = now - self.t_prev, now
    if not m.pop("finite"):
      raise DtmError(f"non-finite training loss or gradient norm at step {s} (loss={m['loss']}, "
                     f"grad_norm={m['grad_norm']}); stopped before saving any later state. Last "
                     f"good checkpoint: {_last_good(self.run.ckpts)}. Lower train.optim.lr or "
                     "check the data")
    m["tokens_per_s"] = self.tokens_per_step / dt
    m["flops_per_s"] = m["tokens_per_s"] * self.flops_per_token
    if self.peak > 0:
      m["mfu"] = m["flops_per_s"] / self.peak
    m["compressed_phase"] = float(masked)
    return m

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    self.mlog.close()


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
