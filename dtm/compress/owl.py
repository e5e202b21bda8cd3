"""OWL: outlier-weighted layerwise sparsity (Yin et al., ICML 2024, arXiv 2310.05175).

A rule `KINDS@LAYERS:owl(rate, method=wanda, lamda=0.08, m=5)` is an *allocation*: it sets
one sparsity per layer so that the layers average `rate`, then prunes each of the rule's
components with `method(rate_l)` (wanda, sparsegpt or magnitude). Follows luuyin/OWL
`lib/prune_all.py` (`prune_wanda_outlier`, `prune_sparsegpt_outlier`, `prune_mag_outlier`):

  1. per layer l, the Wanda metric of every selected component of the DENSE model,
     A_ij = |W_ij| * sqrt(s_j / windows)   (s: `InputStats.sq_norms`, the reference's
     scaler_row), all of the layer's components flattened and concatenated;
  2. outlier ratio D_l = 100 * #{A > m * mean(A)} / numel(A)   (`check_outlier_mean`);
  3. D <- (D - min D) / (max D - min D) * 2 lamda;   density_l = D_l - mean(D) + (1 - rate);
  4. sparsity_l = 1 - density_l, replaced by 0.01 where it is <= 0 (as upstream).

So layers with more outliers are pruned less; the sparsities span at most 2 lamda and
average `rate` (exactly, where no layer hits the 0.01 floor). A layer whose sparsity
reaches 1 is a DtmError (upstream would prune every weight). The statistics are those
of the original model (upstream runs the dense layers for step 1), so `expand` takes
parallel statistics; `calibration.calibrate_and_compress` collects them in a first pass
before its sequential pruning pass, as upstream does.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dtm.components import Component, get_path, kernel_path
from dtm.compress.spec import Method
from dtm.errors import DtmError

FLOOR = 0.01  # upstream's sparsity where step 3 gives <= 0


@jax.jit
def _metric_sum_and_max(kernel_IO: jax.Array, sq_norms_I: jax.Array):
  """(sum of A, A as f32 [in, out]) of one Flax kernel [in, out]: A = |W| * sqrt(s)."""
  a = jnp.abs(kernel_IO.astype(jnp.float32)) * jnp.sqrt(sq_norms_I.astype(jnp.float32))[:, None]
  return jnp.sum(a, dtype=jnp.float32), a


@jax.jit
def _count_above(a: jax.Array, threshold: jax.Array) -> jax.Array:
  return jnp.sum(a > threshold, dtype=jnp.int32)


def outlier_ratio(params, stats: Mapping[Component, object], comps: list[Component],
                  m: float) -> float:
  """D_l of step 2 (percent) for the components `comps` of one layer: entries of the
  concatenated Wanda metric above m times its mean."""
  parts, total, numel = [], 0.0, 0
  for comp in comps:
    st = stats[comp]
    kernel = get_path(params, kernel_path(comp.kind))[comp.layer]
    s, a = _metric_sum_and_max(kernel, jnp.asarray(st.sq_norms) / st.windows)
    parts.append(a)
    total += float(s)
    numel += a.size
  threshold = jnp.float32(total / numel * m)
  count = sum(int(_count_above(a, threshold)) for a in parts)
  return 100.0 * count / numel


def layer_sparsities(ratios: np.ndarray, rate: float, lamda: float) -> np.ndarray:
  """Steps 3-4: outlier ratios D [L'] (percent) -> sparsity per layer [L'] (float64)."""
  d = np.asarray(ratios, np.float64)
  spread = d.max() - d.min()
  if spread > 0:
    d = (d - d.min()) * (1.0 / spread * lamda * 2)
  else:  # all layers alike: upstream divides 0 by 0 (NaN); every layer gets the target
    d = np.zeros_like(d)
  density = d - np.mean(d) + (1 - rate)
  sparsity = 1.0 - density
  return np.where(sparsity <= 0, FLOOR, sparsity)


def allocate(params, stats: Mapping[Component, object], comps: list[Component], method: Method
             ) -> tuple[dict[int, float], dict[int, float]]:
  """({layer: sparsity}, {layer: outlier ratio %}) of one owl rule over its components."""
  a = method.kwargs
  by_layer: dict[int, list[Component]] = {}
  for comp in comps:
    by_layer.setdefault(comp.layer, []).append(comp)
  missing = [c.name for c in comps if c not in stats]
  if missing:
    raise DtmError(f"{method.to_string()} needs calibration statistics of {missing[0]} (the "
                   f"dense model's input norms)")
  layers = sorted(by_layer)
  ratios = np.asarray([outlier_ratio(params, stats, by_layer[l], a["m"]) for l in layers])
  sparsity = layer_sparsities(ratios, a["rate"], a["lamda"])
  full = [l for l, s in zip(layers, sparsity) if s >= 1]
  if full:
    raise DtmError(f"{method.to_string()}: layer {full[0]} gets sparsity "
                   f"{sparsity[layers.index(full[0])]:.3f} >= 1; lower the rate or lamda "
                   f"(the per-layer rates span up to 2 * lamda around the rate)")
  return dict(zip(layers, sparsity.tolist())), dict(zip(layers, ratios.tolist()))


def is_allocation(method: Method) -> bool:
  return method.name == "owl"


def operator(method: Method, rate: float) -> Method:
  """The per-layer method an owl rule applies: `method(rate=rate)`."""
  return Method(method.kwargs["method"], {"rate": rate})


def expand(resolved: Mapping[Component, Method], params, stats: Mapping[Component, object]
           ) -> tuple[dict[Component, Method], dict]:
  """Resolved spec with every owl method replaced by its per-layer operator ->
  (component -> concrete method, info {owl method string: {'sparsity': {layer: rate},
  'outlier_ratio': {layer: percent}}}). Components sharing one owl method (one rule, or
  rules with the same arguments) form one allocation."""
  groups: dict[Method, list[Component]] = {}
  for comp, method in resolved.items():
    if is_allocation(method):
      groups.setdefault(method, []).append(comp)
  out, info = dict(resolved), {}
  for method, comps in groups.items():
    rates, ratios = allocate(params, stats, comps, method)
    for comp in comps:
      out[comp] = operator(method, rates[comp.layer])
    info[method.to_string()] = {"sparsity": {str(l): r for l, r in rates.items()},
                                "outlier_ratio": {str(l): r for l, r in ratios.items()}}
  return out, info
