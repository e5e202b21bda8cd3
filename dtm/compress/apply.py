"""Applying compression methods: to one matrix (`compress`, `compress_calibrated`) and to a
params tree (`apply_spec`, which resolves a spec, vmaps each (kind, method) over its layers,
hands calibrated methods their statistics and attaches run-time activation modes).

The per-matrix functions take HF-layout weights w_OI [out, in]; the params tree holds
stacked Flax kernels [L, in, out], and this module does the transposes.
"""
from __future__ import annotations

import collections
import functools
import math
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dtm.components import KINDS, Component, get_path, kernel_path
from dtm.compress import act_quant
from dtm.compress import gptq as gptq_lib
from dtm.compress import owl
from dtm.compress import sparsegpt as sparsegpt_lib
from dtm.compress import wanda as wanda_lib
from dtm.compress.elementwise import _dtype_bits, _stats, absmax, identity, magnitude, nm, rtn
from dtm.compress.spec import CALIBRATED_METHODS, HESSIAN_METHODS, Method, Spec, validate
from dtm.errors import DtmError


# ------------------------------------------------------------------------------------ shapes


def kernel_shapes(params) -> tuple[int, dict[str, tuple[int, int]]]:
  """(num_layers, {kind: (out, in)}) from a params tree (arrays or ShapeDtypeStructs)
  whose stacked kernels are [L, in, out]; kinds absent from the tree are left out."""
  num_layers, shapes = None, {}
  for kind in KINDS:
    try:
      shape = tuple(get_path(params, kernel_path(kind)).shape)
    except (KeyError, TypeError):
      continue
    if len(shape) != 3 or (num_layers is not None and shape[0] != num_layers):
      raise DtmError(f"kernel {'/'.join(kernel_path(kind))} has shape {shape}; expected "
                     f"[L, in, out] with the same L for every kind")
    num_layers = shape[0]
    shapes[kind] = (shape[2], shape[1])
  if num_layers is None:
    raise DtmError("params hold no compressible kernels under "
                   f"{'/'.join(kernel_path(KINDS[0])[:2])}/... ; is this a dtm Llama params tree?")
  return num_layers, shapes


# -------------------------------------------------------------------------------- per matrix


def compress(w_OI: jax.Array, method: Method):
  """Apply `method` to one HF-layout weight [out, in] -> (w', stats). Traceable.
  Methods of CALIBRATED_METHODS need statistics: `compress_calibrated` (DtmError here)."""
  if method.name in ("w8a8", "llm_int8"):
    raise DtmError(f"{method.to_string()} quantizes activations at run time and has no weight-only "
                   f"form; apply it with apply_spec (mode leaves read by the model's matmul)")
  if method.name in CALIBRATED_METHODS:
    raise DtmError(f"{method.to_string()} needs calibration statistics of the weight's input, "
                   f"which this path does not have (use apply_spec(..., calibration=...) or a "
                   f"job with a calibration block)")
  fn = {"identity": identity, "magnitude": magnitude, "nm": nm, "absmax": absmax,
        "rtn": rtn}[method.name]
  return fn(w_OI, **method.kwargs)


def compress_calibrated(w_OI: jax.Array, method: Method, stats, component: Component | None = None,
                        *, kernel: bool = False, keep_grid: bool = False):
  """Apply a method of CALIBRATED_METHODS to one HF weight [out, in] -> (w', stats dict).

  `stats` holds the statistics of the weight's input over the calibration tokens
  (`calibration.InputStats` or anything with the same attributes): `sq_norms` f32 [in]
  (Wanda) and `hessian` f32 [in, in] (SparseGPT, GPTQ). The stats dict is `compress`'s
  (for gptq 'bits' = bits) plus, for sparsegpt and gptq, 'damp' (f32 [], the relative
  dampening used). kernel=True: `w_OI` is
  a Flax kernel [in, out] instead, and so is w'. keep_grid=True: a gptq stats dict also
  holds 'grid', its `gptq.Grid` (device arrays, HF layout whatever `kernel` is).
  Not traceable: a Hessian that SparseGPT or GPTQ cannot factorize even with their
  increased dampening (`sparsegpt.inverse_hessian_factor`, gptq's retries up to
  `gptq.MAX_DAMP`) raises DtmError naming `component` and the dampenings tried.
  """
  what = component.name if component is not None else f"a weight of shape {tuple(w_OI.shape)}"
  in_dim = w_OI.shape[0 if kernel else 1]
  if method.name not in CALIBRATED_METHODS:
    raise ValueError(f"{method.name} is not a calibrated method")
  needs_hessian = method.name in HESSIAN_METHODS
  if needs_hessian:
    _check_stat(stats, "hessian", (in_dim, in_dim), what, method)
  else:
    _check_stat(stats, "sq_norms", (in_dim,), what, method)
  # (transposes outside the jit: inside, they double XLA:CPU's compile time of wanda)
  if method.name == "sparsegpt" and "rate" in method.kwargs and method.kwargs["rate"] > 0:
    # the rate as traced block counts: one compile per shape serves every rate (an
    # allocation or OWL names dozens of rates); the same numbers as the static-rate jit
    a = method.kwargs
    new_K, damp = sparsegpt_lib.sparsegpt_levels(
        w_OI.T if kernel else w_OI, stats.hessian, (a["rate"],), a["percdamp"], a["blocksize"])
    w, out = new_K[0], {**_sparsity_stats(new_K[0]), "damp": damp}
  else:
    w, out = _calibrated(w_OI.T if kernel else w_OI,
                         stats.hessian if needs_hessian else stats.sq_norms, method,
                         keep_grid=keep_grid and method.name == "gptq")
  w = w.T if kernel else w
  if "damp" in out and not math.isfinite(float(out["damp"])):
    if method.name == "gptq":
      tried = ", ".join(f"{d:g}" for d in gptq_lib._damp_schedule(method.kwargs["damp"]))
      raise DtmError(
          f"gptq: the input Hessian of {what} is not positive definite even after dampening "
          f"(tried H + d * mean(diag H) * I for d = {tried}); the calibration activations may "
          f"hold inf/NaN, or too few calibration tokens; quantize {what} with rtn instead")
    tried = ", ".join(f"{d:g}" for d in sparsegpt_lib.damp_schedule(method.kwargs["percdamp"]))
    raise DtmError(
        f"sparsegpt: the input Hessian of {what} is not positive definite even after "
        f"dampening (tried H + d * mean(diag H) * I for d = {tried}, each followed by "
        f"Cholesky factorizations of the matrix and its inverse); the calibration "
        f"activations may hold inf/NaN, or the statistics are not a Gram matrix "
        f"sum_t x_t x_t^T")
  return w, out


@jax.jit
def _sparsity_stats(w_OI):
  return _stats(w_OI, _dtype_bits(w_OI.dtype))


@functools.partial(jax.jit, static_argnames=("method", "keep_grid"))
def _calibrated(w_OI, stat, method: Method, keep_grid: bool = False):
  """One jit per (shape, method): (w', stats) of a calibrated method; `stat` is the
  Hessian for HESSIAN_METHODS, the squared norms otherwise; keep_grid: gptq's
  stats also hold its `gptq.Grid` under 'grid'."""
  extra = {}
  if method.name == "wanda":
    new = wanda_lib.wanda(w_OI, stat, **method.kwargs)
  elif method.name == "gptq":
    res = gptq_lib.gptq(w_OI, stat, **method.kwargs)
    new, extra["damp"] = res.w, res.damp
    if keep_grid:
      extra["grid"] = gptq_lib.grid_of(res)
    return new, {**_stats(new, method.kwargs["bits"]), **extra}
  else:
    new, extra["damp"] = sparsegpt_lib.sparsegpt(w_OI, stat, **method.kwargs)
  return new, {**_stats(new, _dtype_bits(new.dtype)), **extra}


@functools.partial(jax.jit, static_argnames=("method",))
def compress_kernel(kernel_IO: jax.Array, method: Method):
  """`compress` of a Flax kernel [in, out] -> (kernel' [in, out], stats); one jit."""
  new_OI, stats = compress(kernel_IO.T, method)
  return new_OI.T, stats


def _check_stat(stats, name: str, shape: tuple[int, ...], what: str, method: Method) -> None:
  value = getattr(stats, name, None)
  if value is None:
    raise DtmError(f"{method.to_string()} on {what} needs the calibration statistic {name!r}, "
                   f"which was not collected (collect_statistics(..., hessian=True) collects "
                   f"the Hessian)")
  if tuple(value.shape) != shape:
    raise DtmError(f"calibration statistic {name!r} for {what} has shape {tuple(value.shape)}, "
                   f"expected {shape}; were the statistics collected on this model?")


# ------------------------------------------------------------------------------ params tree


@functools.partial(jax.jit, static_argnames=("method", "batch_size"))
def _compress_layers(kernel_LIO: jax.Array, layers_N: jax.Array, method: Method,
                     batch_size: int | None):
  """Compress kernel_LIO[layers_N] (each transposed to HF [out, in]) with one method;
  vmapped over the N layers, or lax.map in chunks of batch_size to bound memory."""
  w_NOI = jnp.swapaxes(kernel_LIO[layers_N], -1, -2)
  fn = functools.partial(compress, method=method)
  if batch_size is None:
    new_NOI, stats = jax.vmap(fn)(w_NOI)
  else:
    new_NOI, stats = jax.lax.map(fn, w_NOI, batch_size=batch_size)
  return kernel_LIO.at[layers_N].set(jnp.swapaxes(new_NOI, -1, -2)), stats


def _set_path(tree, path: tuple[str, ...], value):
  """Copy of `tree` with tree[path] = value; only the dicts along the path are copied."""
  if not path:
    return value
  frozen = isinstance(tree, flax.core.FrozenDict)
  new = dict(tree)
  new[path[0]] = _set_path(tree[path[0]], path[1:], value)
  return flax.core.FrozenDict(new) if frozen else new


def apply_spec(params, spec: str | Spec, *, batch_size: int | None = None,
               calibration: Mapping[Component, Any] | None = None,
               grids: dict[Component, gptq_lib.Grid] | None = None):
  """Compress the components selected by `spec` -> (new_params, report).

  Pure: the input tree is not modified; untouched leaves are the same arrays. Components
  sharing (kind, method) are compressed by one jitted call vmapped over their layers
  (`batch_size` switches to lax.map over chunks of that many layers, to bound memory on
  large models). report[Component.name] = {'method': canonical method string,
  'sparsity': achieved fraction of exact zeros, 'bits': bits per weight}, ordered by name.
  Raises DtmError if the spec does not fit the model (see `validate`).

  Methods of CALIBRATED_METHODS (wanda, sparsegpt, gptq, owl) need `calibration`: a mapping
  Component -> input statistics (`calibration.collect_statistics(cfg, params, windows)`,
  every statistic from the original model); they are applied one component at a time
  and sparsegpt's and gptq's report entries also hold 'damp'. An owl allocation becomes
  its per-layer operator (`dtm.compress.owl`, from the same statistics); those entries
  name it under 'allocation'. For the reference procedure, where
  layer l's statistics come from the already compressed layers < l, use
  `calibration.calibrate_and_compress`. `grids`: a dict that receives, for every gptq
  component, its `gptq.Grid` (integer codes, scales, zero points, group of each input
  column; host arrays), which an integer export (`dtm.export.compressed_tensors`) writes;
  None keeps none. The params tree is the same either way.

  w8a8 / llm_int8 components keep their float kernel; their kinds get int32 mode and f32
  threshold leaves [L] beside the kernel (`act_quant.attach`), which the model's matmul
  reads, so the returned tree works with every `Llama.apply({'params': ...})` caller.
  """
  num_layers, shapes = kernel_shapes(params)
  spec = validate(spec, num_layers, shapes)
  resolved, origin = expand_allocations(spec.resolve(num_layers), params, calibration)
  groups: dict[tuple[str, Method], list[int]] = collections.defaultdict(list)
  calibrated: dict[Component, Method] = {}
  activation: dict[Component, Method] = {}
  for comp, method in resolved.items():
    if method.name in ("w8a8", "llm_int8"):  # activation methods: dtm.compress.act_quant
      activation[comp] = method
    elif method.name in CALIBRATED_METHODS:
      calibrated[comp] = method
    else:
      groups[(comp.kind, method)].append(comp.layer)
  _check_calibration(calibrated, calibration)
  new_params, device_stats = params, {}
  for (kind, method), layers in groups.items():
    path = kernel_path(kind)
    kernel, stats = _compress_layers(get_path(new_params, path), jnp.asarray(layers, jnp.int32),
                                     method=method, batch_size=batch_size)
    new_params = _set_path(new_params, path, kernel)
    device_stats[(kind, method, tuple(layers))] = stats
  # one transfer for the whole report (a list: pytree dict keys must sort, Methods do not)
  host_stats = zip(device_stats, jax.device_get(list(device_stats.values())))
  report = {}
  for (kind, method, layers), stats in host_stats:
    for i, layer in enumerate(layers):
      report[Component(layer, kind).name] = {"method": method.to_string(),
                                             "sparsity": float(stats["sparsity"][i]),
                                             "bits": int(stats["bits"][i])}
  new_params, calibrated_report = _apply_calibrated(new_params, calibrated, calibration, grids)
  report.update(calibrated_report)
  if activation:
    new_params = act_quant.attach(new_params, activation)
    zeros = jax.device_get({c: jnp.mean(get_path(new_params, kernel_path(c.kind))[c.layer] == 0,
                                        dtype=jnp.float32) for c in activation})
    report.update({c.name: {"method": m.to_string(), "sparsity": float(zeros[c]), "bits": 8}
                   for c, m in activation.items()})
  for comp, allocation in origin.items():
    report[comp.name]["allocation"] = allocation
  return new_params, dict(sorted(report.items()))


def expand_allocations(resolved: Mapping[Component, Method], params, calibration
                       ) -> tuple[dict[Component, Method], dict[Component, str]]:
  """Resolved spec with allocation methods (owl) replaced by their per-layer operators,
  from `calibration` (statistics of the original model) -> (component -> method,
  component -> the allocation's canonical string, for the report)."""
  alloc = {c: m for c, m in resolved.items() if owl.is_allocation(m)}
  if not alloc:
    return dict(resolved), {}
  _check_calibration(alloc, calibration)
  expanded, _ = owl.expand(resolved, params, calibration)
  return expanded, {c: m.to_string() for c, m in alloc.items()}


def _check_calibration(calibrated: Mapping[Component, Method], calibration) -> None:
  if not calibrated:
    return
  first = next(iter(calibrated))
  if calibration is None:
    raise DtmError(
        f"compression method {calibrated[first].name} ({first.name}, ...) needs calibration "
        f"statistics: pass apply_spec(..., calibration=dtm.compress.calibration."
        f"collect_statistics(cfg, params, windows)), or run dtm.compress.calibration."
        f"calibrate_and_compress(cfg, params, spec, windows) (layer by layer, as the "
        f"reference implementations)")
  missing = [c.name for c in calibrated if c not in calibration]
  if missing:
    raise DtmError(f"calibration statistics are missing for {', '.join(missing[:5])}"
                   f"{' ...' if len(missing) > 5 else ''} (needed by {calibrated[first].name}); "
                   f"collect them for every layer the spec prunes")


def report_entry(method: Method, stats) -> dict[str, Any]:
  """One report record from a (host) stats dict of `compress` / `compress_calibrated`."""
  entry = {"method": method.to_string(), "sparsity": float(stats["sparsity"]),
           "bits": int(stats["bits"])}
  if "damp" in stats:  # the f32 value's shortest repr: 0.01, not 0.009999999776
    entry["damp"] = float(str(np.float32(stats["damp"])))
  return entry


def set_kernel_layers(params, kind: str, items: list[tuple[int, jax.Array]]):
  """Copy of `params` whose stacked `kind` kernel has kernel[l] = k for (l, k [in, out]) in
  items (one jitted update); the other leaves are the same arrays."""
  path = kernel_path(kind)
  kernel = _set_layers(get_path(params, path), jnp.asarray([l for l, _ in items], jnp.int32),
                       tuple(k for _, k in items))
  return _set_path(params, path, kernel)


@jax.jit
def _set_layers(kernel_LIO, layers_N, new_IO: tuple[jax.Array, ...]):
  return kernel_LIO.at[layers_N].set(jnp.stack(new_IO).astype(kernel_LIO.dtype))


@jax.jit
def _layer_kernel(kernel_LIO: jax.Array, layer) -> jax.Array:
  return kernel_LIO[layer]


def keep_grid(grids: dict | None, comp: Component, stats: dict) -> None:
  """Move a `compress_calibrated(..., keep_grid=True)` stats dict's 'grid' to the host
  dict `grids` (apply_spec's argument), under `comp`."""
  grid = stats.pop("grid", None)
  if grids is not None and grid is not None:
    grids[comp] = gptq_lib.Grid(*jax.device_get(tuple(grid)))


def _apply_calibrated(params, calibrated: Mapping[Component, Method], calibration,
                      grids: dict | None = None):
  """Compress each component of `calibrated` with its statistics; one update per kind;
  gptq grids go to `grids` unless it is None."""
  by_kind: dict[str, list[tuple[int, jax.Array]]] = collections.defaultdict(list)
  report = {}
  for comp, method in calibrated.items():
    kernel = _layer_kernel(get_path(params, kernel_path(comp.kind)), comp.layer)
    new, stats = compress_calibrated(kernel, method, calibration[comp], comp, kernel=True,
                                     keep_grid=grids is not None)
    keep_grid(grids, comp, stats)
    by_kind[comp.kind].append((comp.layer, new))
    report[comp.name] = report_entry(method, jax.device_get(stats))
  for kind, items in by_kind.items():
    params = set_kernel_layers(params, kind, items)
  return params, report
