"""The functions each job runs, as `compile.Fn`s with abstract arguments and call counts.

Every plan builds the same jitted functions the job calls (`probe.chunk_fn`,
`evaluation.dtm_batch`, `step.compile_step`, ...), never look-alikes, with the job's own
shardings on the target's devices, and counts calls from the config (components x levels
/ groups, steps, rounds, windows). Shapes: P prompts, c prompt length, N new tokens,
S = c + N - 1 fed positions, B batch, T window length.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as PS, SingleDeviceSharding

from dtm import compress, evaluation, probe
from dtm.aot.compile import Fn, ceil_div
from dtm.components import get_path, kernel_path
from dtm.errors import DtmError
from dtm.generate import greedy_generate
from dtm.model import abstract_params
from dtm.model_config import ModelConfig


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _struct(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def matmul_params(cfg: ModelConfig) -> int:
  """Decoder linear weights (all layers) plus the LM head."""
  d, f, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  per_layer = d * k * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2) + 3 * d * f
  return cfg.num_layers * per_layer + cfg.vocab_size * d


def forward_flops(cfg: ModelConfig, batch: int, length: int, head_rows: int | None = None,
                  cached: int = 0) -> float:
  """Useful forward FLOPs of `batch` sequences of `length` new tokens (after `cached`
  cached ones): 2 x decoder matmul params per token, causal attention (QK^T and PV over
  the keys each query sees) and the LM head at `head_rows` rows per sequence."""
  d, v = cfg.hidden_size, cfg.vocab_size
  decoder = matmul_params(cfg) - v * d
  keys = sum(cached + j + 1 for j in range(length))
  attn = 2 * 2 * cfg.num_attention_heads * cfg.head_dim * keys * cfg.num_layers
  rows = length if head_rows is None else head_rows
  return float(batch * (2 * decoder * length + attn + 2 * d * v * rows))


def loaded_params(cfg: ModelConfig, target):
  """Abstract params as a job loads them (`load_model` without shardings): on this
  process's devices unplaced (sharding None, the job's uncommitted arrays, so the
  preflight compiles the job's exact program and the job finds it in the persistent
  compilation cache); on a remote target, on its first device."""
  params = abstract_params(cfg)
  if target.local:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  one = SingleDeviceSharding(target.devices[0])
  return _abstract(params, jax.tree.map(lambda _: one, params))


def like_params(params_abs, mesh):
  """The sharding of a job's other inputs next to these params: none (unplaced params),
  their device (params on one device), else replicated on `mesh`."""
  sh = jax.tree.leaves(params_abs)[0].sharding
  if sh is None or isinstance(sh, SingleDeviceSharding):
    return sh
  return NamedSharding(mesh, PS())


# ----------------------------------------------------------------------------- pieces

def reference_fns(cfg, params_abs, mesh, prompts) -> list[Fn]:
  """Greedy generation of the references (`evaluation.generate_references`: batches of
  `evaluation.batch_rows`, the last padded), the prompts placed as the params
  (`like_params`)."""
  rep = like_params(params_abs, mesh)
  p, c, n = int(prompts.num), int(prompts.length), int(prompts.new_tokens)
  bs = evaluation.batch_rows(p, int(prompts.batch_size))
  rows = p / ceil_div(p, bs)  # real rows per batch (useful); the rest is padding
  useful = forward_flops(cfg, rows, c, head_rows=1) + sum(
      forward_flops(cfg, rows, 1, cached=c + j) for j in range(n - 1))
  return [Fn("reference generation", greedy_generate,
             (cfg, params_abs, _struct((bs, c), jnp.int32, rep), n),
             ceil_div(p, bs), useful, f"{bs} prompts x (c={c} + N={n})")]


def dtm_fns(cfg, params_abs, mesh, prompts, ppl=None, kl=True, evals: int = 1,
            base_params_abs=None) -> list[Fn]:
  """The evaluate pass (`evaluation.HeldOut`, remat off): base head statistics (of
  `base_params_abs`, default `params_abs`), teacher-forced DTM pass, windowed PPL; the
  jitted functions the job calls, with their static arguments."""
  cfg = cfg.replace(remat=False)
  base_params_abs = params_abs if base_params_abs is None else base_params_abs
  local = jax.tree.leaves(base_params_abs)[0].sharding is None  # this process's devices
  rep = None if local else like_params(params_abs, mesh)  # the job's jnp.asarray inputs
  p, c, n = int(prompts.num), int(prompts.length), int(prompts.new_tokens)
  bs = evaluation.batch_rows(p, int(prompts.batch_size))
  rows = p / ceil_div(p, bs)  # real rows per batch (useful); the rest is padding
  fns = []
  base_abs = None
  if kl:
    bseq = _struct((bs, c + n), jnp.int32, None if local else like_params(base_params_abs, mesh))
    base_abs = jax.eval_shape(functools.partial(evaluation.continuation_base, cfg, c=c),
                              base_params_abs, bseq)
    # the job's base statistics: uncommitted (unplaced) or where the DTM pass runs
    bsh = None if bseq.sharding is None else rep
    base_abs = _abstract(base_abs, jax.tree.map(lambda _: bsh, base_abs))
    fns.append(Fn("base head statistics", evaluation.continuation_base,
                  (cfg, base_params_abs, bseq, c), ceil_div(p, bs),
                  forward_flops(cfg, rows, c + n - 1, head_rows=n)))
  seq = _struct((bs, c + n), jnp.int32, rep)
  fns.append(Fn("teacher-forced DTM pass", evaluation.dtm_batch, (cfg, params_abs, seq, c, base_abs),
                evals * ceil_div(p, bs), forward_flops(cfg, rows, c + n - 1, head_rows=n)))
  if ppl is not None:
    windows = int(ppl.max_windows) or 64
    wb, w = evaluation.batch_rows(windows, int(ppl.batch_size)), int(ppl.window)
    fns.append(Fn("perplexity windows", evaluation.ppl_batch,
                  (cfg, params_abs, _struct((wb, w), jnp.int32, rep), _struct((wb,), jnp.int32, rep)),
                  evals * ceil_div(windows, wb), forward_flops(cfg, windows / ceil_div(windows, wb), w),
                  "" if ppl.max_windows else "64 windows assumed (max_windows=0: all)"))
  return fns


def probe_fns(config, cfg, params_abs, mesh, hbm_bytes: int, family_method: str | None = None,
              levels=None, kinds=None, layers="*", rounds: int = 1, per_device: int | None = None,
              prompts=None) -> list[Fn]:
  """The base pass and one probe chunk per method family (and kind, for the precomputed
  families), with the job's slot schedule; calibration when the method needs it."""
  from dtm.jobs import probe as probe_job
  pc = config.probe if family_method is None else None
  prompts = prompts or config.prompts
  p, c, n = int(prompts.num), int(prompts.length), int(prompts.new_tokens)
  s = c + n - 1
  rep = NamedSharding(mesh, PS())
  g = mesh.shape[probe.PROBE_AXIS]
  num_layers, shapes = compress.kernel_shapes(params_abs)
  method = pc.method if pc else family_method
  method_args = pc.method_args if pc else ""
  levels = tuple(pc.levels if pc else levels)
  kinds = pc.kinds if pc else kinds
  layers = pc.layers if pc else layers

  class _P:  # the fields probe_job.plan reads
    probe = type("probe", (), dict(method=method, method_args=method_args, levels=levels,
                                   kinds=kinds, layers=layers))
  probes = probe_job.plan(_P, num_layers, shapes)
  seq = _struct((p, c + n), jnp.int32, NamedSharding(mesh, PS(probe.PROBE_AXIS)) if p % g == 0 else rep)
  base_fn = probe.base_pass_fn(cfg, c, mesh)
  h_in, base = jax.eval_shape(base_fn, params_abs, seq)
  h_in = _struct(h_in.shape, h_in.dtype, rep)
  base = _abstract(base, jax.tree.map(lambda _: rep, base))
  fns = [Fn("probe base pass", base_fn, (params_abs, seq), rounds,
            forward_flops(cfg, p, s, head_rows=n))]
  if per_device is None:
    per_device = (pc.chunk_size if pc else 0) or _auto_chunk(cfg, p, s, len(levels), hbm_bytes)
  numel = lambda kind: int(np.prod(shapes[kind]))
  in_dim = lambda kind: int(shapes[kind][1])  # shapes: {kind: (out, in)}
  uniform = mesh.shape[probe.MODEL_AXIS] > 1
  calls = list(probe_job._calls(probes, per_device, g, numel, in_dim, uniform))
  by_key: dict = {}
  for family, slots in calls:
    kinds_of = tuple(sorted({q.component.kind for q in probes}))
    key = (family, slots[0].component.kind if family.precomputed else None)
    entry = by_key.setdefault(key, [0, 0, kinds_of, max(len(sl.args) for sl in slots)])
    entry[0] += 1
    entry[1] += sum(len(sl.args) for sl in slots)
    entry[3] = max(entry[3], max(len(sl.args) for sl in slots))
  dev = NamedSharding(mesh, PS(probe.PROBE_AXIS))
  targets = _struct((p, n), jnp.int32, rep)
  mean_layer = (num_layers - 1) / 2
  for (family, kind), (ncalls, nprobes, kinds_of, k) in by_key.items():
    chunk_kinds = (kind,) if kind else kinds_of
    fn = probe.chunk_fn(cfg, mesh, chunk_kinds, family, c)
    sq = None
    if family.name == "wanda":
      sq = {kd: _struct((num_layers, shapes[kd][1]), jnp.float32, rep) for kd in chunk_kinds}
    kernels = None
    if family.precomputed:
      kernels = _struct((g, k, shapes[kind][1], shapes[kind][0]), jnp.dtype(cfg.param_dtype), dev)
    args = (params_abs, h_in, _struct((g,), jnp.int32, dev), _struct((g,), jnp.int32, dev),
            _struct((g, k), jnp.float32, dev), targets, base, sq, kernels)
    useful = g * k * probe.useful_flops(cfg, int(mean_layer), p, s, n)
    label = f"probe chunk {family.name}" + (f" {kind}" if kind else "")
    fns.append(Fn(label, fn, args, ncalls * rounds, useful,
                  f"{g} groups x {k} probes, {nprobes} probes per round",
                  loop_trips=num_layers - 2 - int(mean_layer)))  # layers l+1..L-2
  if method in compress.CALIBRATED_METHODS:
    fns += calibration_fns(config, cfg, params_abs, mesh, method, len(levels) * len(
        {q.component.layer for q in probes}), hessian=method in compress.HESSIAN_METHODS)
  return fns


def _auto_chunk(cfg, p: int, s: int, levels: int, hbm_bytes: int) -> int:
  """`jobs.probe.auto_chunk`'s rule with the target's memory."""
  per_probe = 12 * p * s * max(cfg.hidden_size, cfg.intermediate_size) * 4
  return max(1, min(levels, int(hbm_bytes // 4 // per_probe)))


def calibration_fns(config, cfg, params_abs, mesh, method: str, solves_per_kind: int,
                    hessian: bool) -> list[Fn]:
  """One calibration layer pass (activations and statistics of every window) per layer
  and the per-matrix solve of the method on the largest matrix (down: in = F)."""
  from dtm.compress import calibration, gptq, sparsegpt
  cal = config.calibration
  n, t, b = int(cal.samples), int(cal.length), int(cal.batch_size)
  rep = NamedSharding(mesh, PS())
  lp = jax.tree.map(lambda a: _struct(a.shape[1:], a.dtype, rep), params_abs["layers"])
  h = _struct((n, t, cfg.hidden_size), cfg.dtype, rep)
  fn = functools.partial(calibration._layer_pass, cfg, batch_size=b, stats=True,
                         hessian=hessian, sharding=None)
  per_layer = forward_flops(cfg.replace(num_hidden_layers=1), n, t) - 2 * n * t * cfg.hidden_size * cfg.vocab_size
  fns = [Fn("calibration layer pass", jax.jit(fn), (lp, h), cfg.num_layers, per_layer,
            f"{n} windows x {t} tokens, batch {b}")]
  kind = max(("q", "k", "v", "o", "gate", "up", "down"),
             key=lambda kd: get_path(params_abs, kernel_path(kd)).shape[1])
  in_dim, out_dim = get_path(params_abs, kernel_path(kind)).shape[1:]
  w = _struct((out_dim, in_dim), jnp.float32, rep)
  hess = _struct((in_dim, in_dim), jnp.float32, rep)
  if method == "gptq":
    f = functools.partial(gptq._gptq, group_size=None, block_size=128)
    args = (w, hess, _struct((), jnp.int32, rep), _struct((), jnp.bool_, rep),
            _struct((), jnp.bool_, rep), _struct((), jnp.bool_, rep), _struct((5,), jnp.float32, rep))
    fns.append(Fn(f"gptq solve {kind} [{out_dim}x{in_dim}]", jax.jit(f), args, solves_per_kind * 7,
                  2.0 * out_dim * in_dim * in_dim, "upper bound: every matrix as the largest"))
  elif method == "sparsegpt":
    f = functools.partial(sparsegpt.sparsegpt.__wrapped__, rate=0.5)
    fns.append(Fn(f"sparsegpt solve {kind} [{out_dim}x{in_dim}]", jax.jit(f), (w, hess),
                  solves_per_kind * 7, 2.0 * out_dim * in_dim * in_dim,
                  "upper bound: every matrix as the largest"))
  return fns


def train_fns(config, cfg, target, tc=None, spec: str | None = None, rounds: int = 1
              ) -> list[Fn]:
  """The train step (with its teacher) on the job's ('data', 'fsdp') mesh."""
  from dtm.train import masks as masks_lib
  from dtm.train import sharding
  from dtm.train import step as step_lib
  from dtm.train import trainer
  tc = tc or config.train
  mesh = sharding.make_mesh(int(tc.mesh.data), int(tc.mesh.fsdp), devices=target.devices)
  params = abstract_params(cfg)
  plan = masks_lib.make_plan(spec if spec is not None else config.compression, params)
  obj, oc = trainer.objective_of(tc), trainer.optim_of(tc)
  compressed, masks = jax.eval_shape(lambda p: masks_lib.prune(plan, p), params)
  tx = step_lib.make_optimizer(oc, compressed)
  state = jax.eval_shape(lambda p, m: step_lib.init_state(p, m, tx, 0), compressed, masks)
  shardings = step_lib.state_shardings(mesh, state)
  teacher, teacher_sh = None, None
  if obj.needs_teacher:
    teacher = jax.eval_shape(functools.partial(step_lib.teacher_copy, cfg), params)
    teacher_sh = sharding.tree_shardings(mesh, teacher)
    teacher = _abstract(teacher, teacher_sh)
  tcfg = cfg.replace(remat=bool(tc.remat), attention_chunk=int(tc.attention_chunk))
  step = step_lib.compile_step(tcfg, obj, plan, tx, mesh, shardings, teacher_sh,
                               microbatches=int(tc.microbatches), masked=True,
                               schedule=step_lib.lr_schedule(oc), clip_norm=oc.clip_norm)
  b, t = int(tc.batch_size), int(tc.seq_len)
  dp = sharding.data_parallel_size(mesh)
  if (b // int(tc.microbatches)) % dp:
    raise DtmError(f"train.batch_size={b} / microbatches={tc.microbatches} rows per microbatch "
                   f"is not divisible by the {dp} data-parallel devices of {target.name}")
  batch = _struct((b, t + 1), jnp.int32, sharding.batch_sharding(mesh))
  useful = step_lib.train_flops_per_token(cfg, t, obj.needs_teacher) * b * t
  return [Fn("train step" + (" + teacher" if obj.needs_teacher else ""), step,
             (_abstract(state, shardings), batch, teacher), int(tc.steps) * rounds, useful,
             f"batch {b} x {t}, {tc.microbatches} microbatches, mesh data="
             f"{mesh.shape['data']} x fsdp={mesh.shape['fsdp']}")]
