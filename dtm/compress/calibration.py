"""Calibration statistics of the inputs of every linear component, and the layer-by-layer
"calibrate and compress" procedure of SparseGPT / Wanda / GPTQ (every method of
`dtm.compress.CALIBRATED_METHODS`; the Hessian is collected when one of HESSIAN_METHODS
needs it).

The model runs one decoder layer at a time on calibration windows (int32 [n, T] token
ids). For every layer it records, at each of the layer's four input *sites*,

  site      components   the input x_t (one row per token t)
  attn_in   q, k, v      the attention-normed hidden state
  o_in      o            the attention output before o (heads concatenated)
  mlp_in    gate, up     the MLP-normed hidden state
  down_in   down         silu(gate(x)) * up(x)

  sq_norms_j = sum_t x_tj^2              f32 [in]      (Wanda's ||X_j||_2^2)
  hessian    = sum_t x_t x_t^T           f32 [in, in]  (SparseGPT / GPTQ's H)

summed over all n * T tokens (`InputStats.tokens`). The references normalise per
calibration *sequence*, not per token: Wanda's scaler_row is sq_norms / n and
SparseGPT's / GPTQ's H is 2 / n * hessian (nsamples counts `add_batch` calls of one
sequence each); `InputStats.wanda_scaler` / `reference_hessian` give those. A positive
factor changes no Wanda mask and no SparseGPT / GPTQ result (their dampening is
relative to mean(diag H)), so the methods take the raw sums.

The inputs are captured without touching the model code: `layer_inputs` runs the
model's own `DecoderLayer` under `flax.linen.intercept_methods` and keeps the first
argument of the `Attention`, `o`, `MLP` and `down` calls. Activations keep the model's
dtype; the statistics accumulate in float32 (HIGHEST precision matmuls).

Modes (`collect_statistics`):
  * parallel: every statistic comes from the original model.
  * sequential (the references' procedure): layer l's statistics come from the hidden
    states produced by the already compressed layers 0..l-1 (layer l itself is still
    the original when its statistics are taken); a `compress_layer` callback compresses
    layer l before its output is fed forward.

Windows are processed in batches of `batch_size` (a `lax.scan` inside one jitted
function per layer pass, compiled once for all layers). With a `mesh`, the window axis
of the activations is sharded over the mesh axis `axis` (NamedSharding): each device
runs its windows' share of every batch and XLA all-reduces the statistics.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dtm import data
from dtm.components import KINDS, Component, kernel_path
from dtm.errors import DtmError
from dtm.compress import act_quant, site
from dtm.compress.apply import (apply_spec, compress_calibrated, compress_kernel,
                                expand_allocations, keep_grid, kernel_shapes, report_entry,
                                set_kernel_layers)
from dtm.compress.spec import Method, Rule, Spec, needs_hessian, validate
from dtm.model import MLP, Attention, DecoderLayer, Linear, Llama
from dtm.model_config import ModelConfig

SITES: tuple[str, ...] = ("attn_in", "o_in", "mlp_in", "down_in")
SITE_OF_KIND: dict[str, str] = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
                                "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}
MODES: tuple[str, ...] = ("parallel", "sequential")
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class InputStats:
  """Statistics of the input x_t [in] of one linear map over the calibration tokens.

  sq_norms: f32 [in], sum_t x_tj^2.
  hessian:  f32 [in, in], sum_t x_t x_t^T, or None if not collected.
  tokens:   number of rows t summed (windows * window length).
  windows:  number of calibration windows (the references' nsamples).
  """
  sq_norms: jax.Array
  hessian: jax.Array | None
  tokens: int
  windows: int

  @property
  def wanda_scaler(self) -> jax.Array:
    """locuslab/wanda's `scaler_row`: sum_t x_tj^2 / windows."""
    return self.sq_norms / self.windows

  @property
  def reference_hessian(self) -> jax.Array:
    """IST-DASLab sparsegpt / gptq's H: 2 / windows * sum_t x_t x_t^T."""
    return self.hessian * (2.0 / self.windows)


# --------------------------------------------------------------------------- windows


def calibration_windows(tokens: np.ndarray, *, samples: int, length: int, seed: int,
                        bos_id: int | None = None) -> np.ndarray:
  """`samples` windows of `length` tokens from one token stream: int32 [samples, length].

  Non-overlapping spans at seeded random offsets (`data.prompt_windows`; with `bos_id`,
  BOS then length - 1 stream tokens). The references draw `nsamples` random windows of
  `seqlen` tokens from C4 / WikiText in the same spirit. A stream with fewer than
  samples * length tokens is a DtmError.
  """
  tokens = np.asarray(tokens, np.int32)
  body = length - (bos_id is not None)
  if samples < 1 or body < 1:
    raise DtmError(f"calibration needs samples >= 1 and length >= {1 + (bos_id is not None)}, "
                   f"got samples={samples}, length={length}")
  if tokens.size < samples * body:
    raise DtmError(f"not enough calibration data: {samples} windows of {length} tokens need "
                   f"{samples * body} stream tokens, the corpus has {tokens.size}; use more "
                   f"documents or fewer / shorter calibration windows")
  return data.prompt_windows(tokens, num=samples, length=length, seed=seed, bos_id=bos_id)


def read_calibration_jsonl(path: str | os.PathLike, *, samples: int, length: int) -> np.ndarray:
  """The first `samples` rows of a JSONL file of `{"ids": [...]}` lines: int32 [samples,
  length]. Every row must have exactly `length` ids (else DtmError naming file:line and
  both lengths); fewer than `samples` rows is a DtmError."""
  windows = data.read_prompt_jsonl(path, length=length, field="calibration")
  if windows.shape[0] < samples:
    raise DtmError(f"not enough calibration data: {path} has {windows.shape[0]} rows of "
                   f"{length} tokens, {samples} are needed ({samples} x {length} tokens)")
  return windows[:samples]


# ------------------------------------------------------------------------------- capture


def layer_inputs(cfg: ModelConfig, layer_params, h_BTD: jax.Array, positions_T: jax.Array,
                 output: bool = True):
  """One decoder layer (params without the L axis) -> (h' [B, T, D], {site: x [B, T, in]}).

  The layer is the model's own `DecoderLayer`; the site inputs are the first arguments
  of its Attention, o, MLP and down calls, recorded by a method interceptor. With
  output=False the down projection is not computed (its input is all the statistics
  need; a quarter of a Llama layer's matmul FLOPs) and h' is None.
  """
  captured: dict[str, jax.Array] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__":
      if isinstance(module, Attention):
        captured["attn_in"] = args[0]
      elif isinstance(module, MLP):
        captured["mlp_in"] = args[0]
      elif isinstance(module, Linear) and module.name in ("o", "down"):
        captured[f"{module.name}_in"] = args[0]
        if module.name == "down" and not output:
          return jnp.zeros(args[0].shape[:-1] + (cfg.hidden_size,), args[0].dtype)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    out, _ = DecoderLayer(cfg).apply({"params": layer_params}, h_BTD, None, (positions_T, None))
  assert set(captured) == set(SITES), sorted(captured)
  return (out if output else None), captured


def _site_stats(x_BTI: jax.Array, hessian: bool) -> dict[str, jax.Array]:
  x = x_BTI.reshape(-1, x_BTI.shape[-1])
  x32 = x.astype(jnp.float32)
  stats = {"sq_norms": jnp.sum(x32 * x32, axis=0)}
  if hessian:
    stats["hessian"] = jnp.dot(x.T, x, precision=_HI, preferred_element_type=jnp.float32)
  return stats


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "stats", "hessian", "sharding",
                                             "output"))
def _layer_pass(cfg: ModelConfig, layer_params, h_NTD: jax.Array, *, batch_size: int,
                stats: bool, hessian: bool, sharding: NamedSharding | None,
                output: bool = True):
  """h [n, T, D] -> (layer output [n, T, D], or None with output=False (statistics
  only: no down projection), {site: summed stats} or {}).

  Batch i holds windows {b * (n / B) + i : b < B}: with the window axis sharded in
  contiguous blocks, every batch is then spread evenly over the devices (no resharding).
  """
  n, t, d = h_NTD.shape
  h_iBTD = h_NTD.reshape(batch_size, n // batch_size, t, d).swapaxes(0, 1)
  if sharding is not None:
    h_iBTD = jax.lax.with_sharding_constraint(
        h_iBTD, NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec)))
  positions = jnp.arange(t, dtype=jnp.int32)
  dims = {"attn_in": d, "o_in": cfg.num_attention_heads * cfg.head_dim, "mlp_in": d,
          "down_in": cfg.intermediate_size}
  init = {}
  if stats:
    for site, dim in dims.items():
      init[site] = {"sq_norms": jnp.zeros((dim,), jnp.float32)}
      if hessian:
        init[site]["hessian"] = jnp.zeros((dim, dim), jnp.float32)

  def step(acc, h_BTD):
    out, xs = layer_inputs(cfg, layer_params, h_BTD, positions, output=output)
    if stats:
      acc = jax.tree.map(jnp.add, acc, {s: _site_stats(xs[s], hessian) for s in SITES})
    return acc, out

  acc, out_iBTD = jax.lax.scan(step, init, h_iBTD)
  if not output:
    return None, acc
  out = out_iBTD.swapaxes(0, 1).reshape(n, t, d)
  if sharding is not None:
    out = jax.lax.with_sharding_constraint(out, sharding)
  return out, acc


@functools.partial(jax.jit, static_argnames=("cfg",))
def _embed(cfg: ModelConfig, embed_params, tokens_NT: jax.Array) -> jax.Array:
  return Llama(cfg).apply({"params": {"embed": embed_params}}, tokens_NT,
                          method=lambda model, t: model.embed(t))


def layer_params(params, layer: int):
  """Params of one decoder layer (the stacked 'layers' subtree indexed at `layer`)."""
  return _index_layer(params["layers"], layer)


@jax.jit
def _index_layer(layers, layer):
  return jax.tree.map(lambda x: x[layer], layers)


def _sharding(mesh: Mesh | None, axis: str) -> NamedSharding | None:
  return None if mesh is None else NamedSharding(mesh, PartitionSpec(axis))


def _check_windows(cfg: ModelConfig, windows, batch_size: int, mesh: Mesh | None,
                   axis: str) -> np.ndarray:
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
    raise DtmError(f"calibration windows must be int [n, T] token ids, got shape {windows.shape}")
  n, t = windows.shape
  if t > cfg.max_position_embeddings:
    raise DtmError(f"calibration windows of {t} tokens exceed the model's context of "
                   f"{cfg.max_position_embeddings} tokens")
  if windows.min() < 0 or windows.max() >= cfg.vocab_size:
    raise DtmError(f"calibration token ids must be in [0, {cfg.vocab_size}) (the model's "
                   f"vocabulary), got ids from {windows.min()} to {windows.max()}")
  if batch_size < 1 or n % batch_size:
    raise DtmError(f"calibration batch_size={batch_size} must divide the number of "
                   f"calibration windows ({n})")
  if mesh is not None and batch_size % mesh.shape[axis]:
    raise DtmError(f"calibration batch_size={batch_size} must be a multiple of the "
                   f"{mesh.shape[axis]} devices of mesh axis {axis!r}")
  return windows.astype(np.int32)


def _input_stats(acc: Mapping[str, Mapping[str, jax.Array]], layer: int, tokens: int,
                 windows: int) -> dict[Component, InputStats]:
  per_site = {site: InputStats(a["sq_norms"], a.get("hessian"), tokens, windows)
              for site, a in acc.items()}
  return {Component(layer, kind): per_site[SITE_OF_KIND[kind]] for kind in KINDS}


# compress_layer(layer, layer_params, {Component: InputStats} of that layer) -> layer_params
LayerFn = Callable[[int, Any, Mapping[Component, InputStats]], Any]


def collect_statistics(cfg: ModelConfig, params, windows, *, mode: str = "parallel",
                       compress_layer: LayerFn | None = None, batch_size: int = 8,
                       hessian: bool = True, layers: set[int] | None = None,
                       mesh: Mesh | None = None, axis: str = "data", progress: bool = False
                       ) -> dict[Component, InputStats]:
  """Input statistics of every component -> {Component: InputStats} (layer-major; q, k, v
  share one InputStats object, as do gate and up).

  windows: int [n, T] token ids (n a multiple of batch_size). mode 'parallel': all
  statistics from `params`. mode 'sequential': after layer l's statistics are taken,
  `compress_layer(l, layer_params, {Component: InputStats})` returns that layer's params
  (compressed, or the same object to keep it), and layer l + 1 sees the output of the
  returned layer. hessian=False collects only sq_norms (Wanda). `layers`: only these
  layers' statistics (the forward pass still runs every layer below the last one).
  mesh / axis: shard the window axis of the activations over mesh axis `axis`.
  progress: a tqdm bar over the layers.
  """
  if mode not in MODES:
    raise DtmError(f"calibration mode must be one of {', '.join(MODES)}, got {mode!r}")
  if mode == "sequential" and compress_layer is None:
    raise DtmError("sequential calibration needs a compress_layer callback (or use "
                   "calibrate_and_compress)")
  result: dict[Component, InputStats] = {}

  def visit(layer, lp, stats):
    result.update(stats)
    return compress_layer(layer, lp, stats) if mode == "sequential" else lp

  run_layers(cfg, params, windows, visit, batch_size=batch_size, hessian=hessian,
             stats_layers=layers, mesh=mesh, axis=axis, output=False, progress=progress)
  return result


def run_layers(cfg: ModelConfig, params, windows, visit, *, batch_size: int = 8,
               hessian: bool = True, stats_layers: set[int] | None = None,
               mesh: Mesh | None = None, axis: str = "data",
               output: bool = True, progress: bool = False,
               replaces: bool = False) -> jax.Array | None:
  """The layer loop shared by every calibration procedure.

  For each layer l: if l is in stats_layers (None: all), one pass of the original layer
  gives its output and statistics, and `visit(l, layer_params, {Component: InputStats})`
  returns the params to continue with; when they are not the same object, a second pass
  recomputes the output with them. Layers without statistics make one pass and are
  not visited. Stops after the last layer that is visited. Returns that layer's output
  h [n, T, D] (sharded like the windows), or None with output=False, which also skips
  the last layer's second pass. replaces=True says `visit` returns new params for every
  layer, so the statistics pass skips the original layer's output (its down projection)
  that would be discarded. progress: a tqdm bar over the layers run.
  """
  windows = _check_windows(cfg, windows, batch_size, mesh, axis)
  sharding = _sharding(mesh, axis)
  n, t = windows.shape
  tokens = jnp.asarray(windows) if sharding is None else jax.device_put(windows, sharding)
  h = _embed(cfg, params["embed"], tokens)
  num_layers = cfg.num_layers
  last = num_layers - 1 if stats_layers is None else max(stats_layers, default=-1)
  run = functools.partial(_layer_pass, cfg, batch_size=batch_size, sharding=sharding)
  bar = tqdm(range(last + 1), unit="layer", desc="calibration", disable=not progress,
             smoothing=0.1)
  for layer in bar:
    lp = layer_params(params, layer)
    if stats_layers is not None and layer not in stats_layers:
      h, _ = run(lp, h, stats=False, hessian=False)
      continue
    out, acc = run(lp, h, stats=True, hessian=hessian,
                   output=not (replaces or (layer == last and not output)))
    new_lp = visit(layer, lp, _input_stats(acc, layer, n * t, n))
    if new_lp is lp and out is not None:
      h = out
    elif output or layer < last:
      h = run(new_lp, h, stats=False, hessian=False)[0]
  return h if output else None


# ------------------------------------------------------------------ calibrate and compress


def calibrate_and_compress(cfg: ModelConfig, params, spec: str | Spec, windows, *,
                           batch_size: int = 8, mesh: Mesh | None = None, axis: str = "data",
                           progress: bool = False, grids: dict | None = None):
  """Apply `spec` layer by layer as the reference implementations do -> (new_params, report).

  For l = 0..L-1: the statistics of layer l's inputs are taken on the hidden states of the
  already compressed layers < l (sequential mode), every component of layer l that the
  spec names is compressed (calibrated methods with those statistics, the others as
  `apply_spec` does), and the compressed layer's output is fed to layer l + 1. The
  Hessian is collected only if a method needs it; layers past the last one the spec
  names are not run. `report` is `apply_spec`'s, and so is `grids` (a dict that receives
  every gptq component's `gptq.Grid`). Raises DtmError like `apply_spec` (and for a
  Hessian SparseGPT cannot factorize).
  """
  num_layers, shapes = kernel_shapes(params)
  spec = validate(spec, num_layers, shapes)
  resolved, origin = _expand_allocations(cfg, params, spec.resolve(num_layers), windows,
                                         batch_size, mesh, axis, progress)
  by_layer: dict[int, dict[str, Method]] = {}
  for comp, method in resolved.items():
    by_layer.setdefault(comp.layer, {})[comp.kind] = method
  hessian = any(needs_hessian(m) for m in resolved.values())
  new_kernels: dict[str, list[tuple[int, jax.Array]]] = {}
  report: dict[str, dict] = {}
  activation: dict[Component, Method] = {}

  def visit(layer, lp, stats):
    lp, news, entries, acts = _compress_layer(layer, lp, by_layer[layer], stats, grids)
    for kind, new in news.items():
      new_kernels.setdefault(kind, []).append((layer, new))
    report.update(entries)
    activation.update(acts)
    return lp

  if by_layer:
    run_layers(cfg, params, windows, visit, batch_size=batch_size, hessian=hessian,
               stats_layers=set(by_layer), mesh=mesh, axis=axis, output=False, progress=progress,
               replaces=True)  # _compress_layer returns a new dict for every layer
  new_params = params
  for kind in list(new_kernels):  # each kind's layer kernels are freed once stacked
    new_params = set_kernel_layers(new_params, kind, new_kernels.pop(kind))
  if activation:  # w8a8 / llm_int8: the mode leaves and report entries apply_spec gives
    new_params, act_report = apply_spec(new_params, Spec(tuple(
        Rule((c.kind,), (c.layer,), m) for c, m in activation.items())))
    report.update(act_report)
  for comp, allocation in origin.items():
    report[comp.name]["allocation"] = allocation
  return new_params, dict(sorted(report.items()))


def _compress_layer(layer: int, lp, methods: Mapping[str, Method],
                    stats: Mapping[Component, InputStats], grids: dict | None):
  """Compress the kinds of one layer's params `lp` (without the L axis) -> (new lp,
  {kind: new kernel [in, out]}, {component name: report entry}, {Component: activation
  method}). Calibrated methods run once per (input site, method) (`site.compress_site`:
  q, k, v together, gate and up together); the stats come to the host once per layer.
  A Hessian that cannot be factorized is re-run alone by `compress_calibrated`, which
  raises its DtmError."""
  lp = dict(lp)
  groups: dict[tuple[str, Method], list[str]] = {}
  pending: dict[Component, tuple[Method, Any]] = {}
  news, activation = {}, {}
  for kind, method in methods.items():
    _, module, _, leaf = kernel_path(kind)
    if method.name in act_quant.ACTIVATION_METHODS:  # run-time modes: the kernel stays
      activation[Component(layer, kind)] = method    # float, the layer output sees them
      lp[module] = {**lp[module], kind: act_quant.layer_leaves(lp[module][kind], method)}
    elif method.name in site.METHODS:
      groups.setdefault((SITE_OF_KIND[kind], method), []).append(kind)
    else:
      news[kind], st = compress_kernel(lp[module][kind][leaf], method)
      pending[Component(layer, kind)] = (method, st)
  original = {}
  for (_, method), kinds in groups.items():
    kernels = {kind: _kernel(lp, kind) for kind in kinds}
    original.update(kernels)
    new, st = site.compress_site(kernels, method, stats[Component(layer, kinds[0])],
                                 keep_grid=grids is not None)
    news.update(new)
    pending.update({Component(layer, kind): (method, st[kind]) for kind in kinds})
  host = jax.device_get({comp: st for comp, (_, st) in pending.items()})
  entries = {}
  for comp, (method, _) in pending.items():
    if site.failed({comp.kind: host[comp]}):
      compress_calibrated(original[comp.kind], method, stats[comp], comp, kernel=True)
    keep_grid(grids, comp, host[comp])
    entries[comp.name] = report_entry(method, host[comp])
  for kind, new in news.items():
    _, module, _, leaf = kernel_path(kind)
    lp[module] = {**lp[module], kind: {**lp[module][kind], leaf: new}}
  return lp, news, entries, activation


def _kernel(lp, kind: str) -> jax.Array:
  _, module, _, leaf = kernel_path(kind)
  return lp[module][kind][leaf]


def _expand_allocations(cfg, params, resolved, windows, batch_size, mesh, axis, progress):
  """owl rules -> per-layer operators, from a first pass of the DENSE model over the
  windows (sq_norms of the allocated layers only), as upstream OWL does before its
  sequential pruning pass; `apply.expand_allocations`' outputs."""
  layers = {c.layer for c, m in resolved.items() if m.name == "owl"}
  if not layers:
    return dict(resolved), {}
  stats = collect_statistics(cfg, params, windows, batch_size=batch_size, hessian=False,
                             layers=layers, mesh=mesh, axis=axis, progress=progress)
  return expand_allocations(resolved, params, stats)
