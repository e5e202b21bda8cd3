"""Dry-run plans of the evaluation-side jobs (quantize, compare, lm_eval) and of the
allocation jobs (allocate, prune_compare), from `plans`.

Each compiles the jitted functions the job calls with the job's placement (`plans.
loaded_params`: these jobs load F unplaced and run on one device of a remote target)
and counts calls from the config:
  * quantize: the held-out references; per level the ranking probe sweep (the probe job's
    own plan on `jobs.quantize._probe_config`); the held-out DTM pass and the compression
    of every configuration the search may evaluate (an upper bound: stages x components x
    rankings x bounds, or search.max_evals);
  * compare: per domain the references (greedy and, with sampling, sampled), then per
    compression (and the original model) the DTM pass, the perplexity windows and the
    sampled DTMs; the compression of each spec;
  * lm_eval: per spec its compression and the packed lm-eval forward (`packed_hidden`,
    `packed_scores`) on `batch_size` rows of max_length tokens (unset: 256, multiple-choice
    tasks' rows); how many batches a task needs depends on its documents, which the dry
    run does not read, so calls are per batch;
  * allocate: the selection and held-out references; the statistics pass and the probe
    chunks of every component x ladder rate (the probe job's chunks on the selection
    prompts); per candidate (targets x costs x units x bands, an upper bound: shared specs
    are measured once) its solves on the parallel statistics and a selection DTM pass; per
    target the sequential apply and the held-out pass;
  * prune_compare: the FDT-guided rounds (the prune job's plan, to the largest sparsity);
    per sparsity and row (methods, specs, recipes) its compression and the held-out pass,
    and with compare.train its training for the rounds' budget (an upper bound: max_rounds
    x train.steps).
The compression of a spec (`compress_fns`) is one `apply._compress_layers` per (kind,
method) group, as `compress.apply_spec` runs it, plus the calibration layer pass and the
largest solve for calibrated methods (`plans.calibration_fns`).
"""
from __future__ import annotations

import collections

import jax.numpy as jnp

from dtm import compress
from dtm.aot import plans
from dtm.aot.compile import Fn, ceil_div
from dtm.components import get_path, kernel_path


def compress_fns(config, cfg, params_abs, mesh, spec_text: str, calls: int) -> list[Fn]:
  """The jitted functions `common.compress_model` runs for `spec_text`, `calls` times."""
  from dtm.compress import act_quant, apply
  num_layers, shapes = compress.kernel_shapes(params_abs)
  spec = compress.validate(spec_text, num_layers, shapes)
  groups: dict = collections.defaultdict(list)
  calibrated: dict[str, set] = collections.defaultdict(set)
  for comp, method in spec.resolve(num_layers).items():
    if method.name in act_quant.ACTIVATION_METHODS:
      continue  # a mode leaf beside the float kernel: nothing is compiled
    if method.name in compress.CALIBRATED_METHODS:
      calibrated[method.name].add(comp.layer)
    else:
      groups[(comp.kind, method)].append(comp.layer)
  like = plans.like_params(params_abs, mesh)
  fns = []
  for (kind, method), layers in groups.items():
    kernel = get_path(params_abs, kernel_path(kind))
    fns.append(Fn(f"compress {kind} x{len(layers)} {method.name}", apply._compress_layers,
                  (kernel, plans._struct((len(layers),), jnp.int32, like), method, None),
                  calls, 0.0, f"{method.to_string()}, {len(layers)} layers vmapped"))
  for name, layers in sorted(calibrated.items()):
    for f in plans.calibration_fns(config, cfg, params_abs, mesh, name, len(layers),
                                   hessian=name in compress.HESSIAN_METHODS):
      f.calls *= calls
      fns.append(f)
  return fns


def quantize_fns(config, cfg, target, job_plan) -> list[Fn]:
  """`jobs.quantize.run` (module docstring); `job_plan`: `dry_run.job_plan` (the ranking
  probes are the probe job's plan)."""
  from dtm import probe
  from dtm.jobs import quantize
  s = config.search
  mesh = probe.probe_mesh(target.devices)
  loaded = plans.loaded_params(cfg, target)
  num_layers, shapes = compress.kernel_shapes(loaded)
  scope = compress.validate(f"{s.kinds}@{s.layers}:{quantize.method_text(config, s.levels[0])}",
                            num_layers, shapes)
  comps = len(scope.resolve(num_layers))
  evals = len(s.levels) * comps * len(s.rank_by) * len(s.bounds)
  evals = min(evals, int(s.max_evals)) if int(s.max_evals) else evals
  fns = plans.reference_fns(cfg, loaded, mesh, config.prompts)
  for level in s.levels:
    pc = quantize._probe_config(config, level)
    if s.method in quantize.ACT_METHODS:  # ranked by one DTM pass per component
      fns += plans.reference_fns(cfg, loaded, mesh, pc.prompts)
      fns += plans.dtm_fns(cfg, loaded, mesh, pc.prompts, None, True, comps)
    else:
      pc.job = "probe"
      fns += [_renamed(f, f"level {level:g}: ") for f in job_plan(pc, target, cfg)]
  fns += plans.dtm_fns(cfg, loaded, mesh, config.prompts, None, True, evals + 1)
  widest = f"{s.kinds}@{s.layers}:{quantize.method_text(config, s.levels[-1])}"
  fns += compress_fns(config, cfg, loaded, mesh, widest, evals)
  for f in fns[-1:]:
    f.note = (f.note + "; " if f.note else "") + f"<= {evals} configurations (upper bound)"
  return fns


def compare_fns(config, cfg, target) -> list[Fn]:
  """`jobs.compare.run` (module docstring)."""
  from dtm import probe
  from dtm.jobs import compare
  mesh = probe.probe_mesh(target.devices)
  loaded = plans.loaded_params(cfg, target)
  specs = compare.parse_compressions(config.compressions)
  names = [n.strip() for n in config.domain_names.split(",") if n.strip()]
  d, models = len(names), len(specs) + 1
  fns = [_times(f, d) for f in plans.reference_fns(cfg, loaded, mesh, config.prompts)]
  fns += [_times(f, d) for f in plans.dtm_fns(cfg, loaded, mesh, config.prompts, config.ppl,
                                                True, models)]
  if config.sampling.enabled:
    fns += sampling_fns(config, cfg, loaded, mesh, d, d * models)
  for text in specs:
    fns += compress_fns(config, cfg, loaded, mesh, text, 1)
  return fns


def sampling_fns(config, cfg, params_abs, mesh, references: int, evals: int) -> list[Fn]:
  """F's sampled continuations (`sampling.sample_generate`, per domain) and the sampled
  DTMs of each model (`sampling.sampled_divergence_batch`)."""
  from dtm import sampling
  c = config.sampling
  s = sampling.Sampling(float(c.temperature), int(c.top_k), float(c.top_p), int(c.seed))
  p = config.prompts
  num, length, new, bs = int(p.num), int(p.length), int(p.new_tokens), int(p.batch_size)
  like = plans.like_params(params_abs, mesh)
  rows = plans._struct((bs,), jnp.int32, like)
  batches = ceil_div(num, bs)
  gen = plans.forward_flops(cfg, bs, length, head_rows=1) + sum(
      plans.forward_flops(cfg, bs, 1, cached=length + j) for j in range(new - 1))
  return [
      Fn("sampled references", sampling.sample_generate,
         (cfg, params_abs, plans._struct((bs, length), jnp.int32, like), rows, new, s),
         references * batches, gen, f"{bs} prompts x (c={length} + N={new})"),
      Fn("sampled DTM pass", sampling.sampled_divergence_batch,
         (cfg, params_abs, plans._struct((bs, length + new), jnp.int32, like), rows, length, s),
         evals * batches, plans.forward_flops(cfg, bs, length + new - 1, head_rows=new))]


def lm_eval_fns(config, cfg, target) -> list[Fn]:
  """`jobs.lm_eval.run` (module docstring)."""
  from dtm import probe
  from dtm.generate import bucket
  from dtm.jobs import lm_eval
  from dtm.tasks import lm_eval_model
  mesh = probe.probe_mesh(target.devices)
  loaded = plans.loaded_params(cfg, target)
  like = plans.like_params(loaded, mesh)
  specs = lm_eval.parse_specs(config.compression)
  b = int(config.batch_size)
  # rows are as long as the longest request (>= ROW_MIN), which the dry run cannot see
  # without the task data: max_length when given, else two ROW_MIN (multiple-choice
  # requests such as PIQA's and HellaSwag's typically fit 256 tokens)
  t = max(bucket(int(config.max_length) or 2 * lm_eval_model.ROW_MIN), lm_eval_model.ROW_MIN)
  rows = lambda dtype=jnp.int32: plans._struct((b, t), dtype, like)
  k = b * t  # target positions: at most every token of the batch
  plain = cfg.replace(remat=False)
  note = (f"per batch of {b} rows x {t} tokens (longer requests: set max_length); batches "
          "per task depend on its documents")
  fns = [Fn("lm-eval packed forward", lm_eval_model.packed_hidden,
            (plain, loaded, rows(), rows(), rows(), rows()), len(specs),
            plans.forward_flops(cfg, b, t, head_rows=0), note),
         Fn("lm-eval scores", lm_eval_model.packed_scores,
            (plain, loaded, plans._struct((b, t, cfg.hidden_size), cfg.dtype, like),
             plans._struct((k,), jnp.int32, like), plans._struct((k,), jnp.int32, like)),
            len(specs), 2.0 * k * cfg.hidden_size * cfg.vocab_size, note)]
  for spec in specs:
    if spec.to_string() != "none":
      fns += compress_fns(config, cfg, loaded, mesh, spec.to_string(), 1)
  return fns


def allocate_fns(config, cfg, target, probe_params) -> list[Fn]:
  """`jobs.allocate.run` (module docstring); `probe_params(cfg, mesh, tp, local)`: the
  probe engine's params (`dry_run._params`)."""
  from dtm import probe
  a = config.allocate
  mesh = probe.probe_mesh(target.devices)
  loaded = plans.loaded_params(cfg, target)
  kinds, layers = selector(a.components)
  ladder = tuple(float(r) for r in a.ladder)
  g = mesh.shape[probe.PROBE_AXIS]
  per_device = len(ladder) if a.operator == "sparsegpt" else ceil_div(len(ladder), g)
  cands = len(a.targets) * len(a.costs) * len(a.units) * len(a.bands)
  sel = lambda fs: [_renamed(f, "selection ") for f in fs]
  fns = sel(plans.reference_fns(cfg, loaded, mesh, config.select.prompts))
  fns += plans.reference_fns(cfg, loaded, mesh, config.prompts)
  fns += plans.probe_fns(config, cfg, probe_params(cfg, mesh, False, target.local), mesh,
                         target.hbm_bytes, family_method=a.operator, levels=ladder,
                         kinds=kinds, layers=layers, per_device=per_device,
                         prompts=config.select.prompts)
  uniform = f"{a.components}:{a.operator}({ladder[-1]:g})"
  fns += [f for f in compress_fns(config, cfg, loaded, mesh, uniform, cands)
          if f.name != "calibration layer pass"]  # candidates: the parallel statistics
  fns += sel(plans.dtm_fns(cfg, loaded, mesh, config.select.prompts, None, True, cands + 1))
  fns += compress_fns(config, cfg, loaded, mesh, uniform, len(a.targets))
  fns += plans.dtm_fns(cfg, loaded, mesh, config.prompts, config.ppl, bool(config.kl),
                       len(a.targets))
  return _merged(fns)


def prune_compare_fns(config, cfg, target, job_plan) -> list[Fn]:
  """`jobs.prune_compare.run` (module docstring); `job_plan`: `dry_run.job_plan` (the
  FDT-guided rounds are the prune job's plan)."""
  from dtm import probe
  from dtm.jobs import prune_compare
  c = config.compare
  sparsities = prune_compare._check(config)
  mesh = probe.probe_mesh(target.devices)
  loaded = plans.loaded_params(cfg, target)
  fns = []
  if c.fdt_guided:
    pc = prune_compare._prune_config(config, sparsities[-1])
    fns += [_renamed(f, "fdt-guided: ") for f in job_plan(pc, target, cfg)]
  rows = [spec for s in sparsities for _, spec in prune_compare._one_shot_rows(config, s)]
  trained = bool(c.fdt_guided and c.train and int(config.train.steps) > 0)
  ev = config.eval
  fns += plans.reference_fns(cfg, loaded, mesh, ev.prompts)
  fns += plans.dtm_fns(cfg, loaded, mesh, ev.prompts, ev.ppl, bool(ev.kl),
                       len(rows) * (2 if trained else 1))
  for spec in rows:
    fns += compress_fns(config, cfg, loaded, mesh, spec, 1)
  if trained:  # each row for the rounds' budget: at most max_rounds x train.steps
    for f in plans.train_fns(config, cfg, target, spec=rows[0],
                             rounds=int(config.prune.max_rounds)):
      f.note += f"; {len(rows)} rows, each <= max_rounds x steps (upper bound)"
      fns.append(_times(f, len(rows)))
  return _merged(fns)


def selector(components: str) -> tuple[str, str]:
  """'KINDS@LAYERS' as the spec grammar reads it (kind groups, '*', ranges)."""
  selector = compress.parse_rule(f"{components}:identity").to_string().rsplit(":", 1)[0]
  kinds, _, layers = selector.partition("@")
  return kinds, layers or "*"


def _merged(fns: list[Fn]) -> list[Fn]:
  """One `Fn` per name and argument shapes (the same jitted function on the same shapes,
  e.g. the held-out pass of every row), its calls summed, in first-seen order: compiled
  once. Static arguments (a method's rate) may differ: their cost does not."""
  import jax
  out: dict = {}
  for f in fns:
    shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(f.args)
                   if isinstance(x, jax.ShapeDtypeStruct))
    key = (f.name, shapes)
    if key in out:
      out[key].calls += f.calls
    else:
      out[key] = f
  return list(out.values())


def _times(f: Fn, n: int) -> Fn:
  f.calls *= n
  return f


def _renamed(f: Fn, prefix: str) -> Fn:
  f.name = prefix + f.name
  return f
