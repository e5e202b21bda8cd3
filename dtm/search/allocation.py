"""Sparsity allocation from single-component probes: costs, a knapsack over components,
and the recipe (SPDY-style, Frantar & Alistarh 2022, with FDT-based costs).

Every component c (layer, kind) of numel n_c was probed alone at the rates of a ladder
r_1 < ... < r_J with a calibrated operator (Wanda, SparseGPT) on selection prompts,
against F's greedy references. A *cost* turns one probe's per-prompt metrics into one
number that should add up over components (rate 0 costs 0):

  kl    mean KL(F || F') over the P x N continuation positions (nats): additive to first
        order for small, independent perturbations of the logits;
  nll   mean NLL of F's continuation under F' minus F's own (nats per token): log DPPL;
  sdt   -log(1 - SDT): the per-position divergence hazard (a flip at each position
        independently with probability SDT; independent components multiply the
        survival, so hazards add);
  fdt   (1/N) sum_t -log S(t), S(t) = (#{prompts with FDT >= t} + 1) / (P + 1): the FDT
        survival curve's cumulative hazard, averaged over t = 1..N (independent
        components multiply S(t), so this adds up too); 0 when no prompt diverges.

Costs are made non-decreasing in the rate (pool-adjacent-violators fit: more pruning
never costs less; the raw probes are noisy), then `solve` picks one rate per component
(0 or a ladder rate) minimising the summed cost with the pruned parameters
sum_c n_c r_c >= target * sum_c n_c: a dynamic program over components with the pruned
parameters on a grid of `grid` units, then the surplus above the target taken back from
the component with the highest marginal cost per parameter (so the allocation meets the
target to within a unit). `group_by_layer` gives the per-layer variant (one rate per
layer for all of its components, a layer's cost the sum of its components').
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from dtm import compress
from dtm.components import KINDS, Component
from dtm.errors import DtmError

COSTS: tuple[str, ...] = ("kl", "nll", "sdt", "fdt")


# ------------------------------------------------------------------------------ costs


def cost_of(per_prompt: Mapping[str, np.ndarray], cost: str, base_nll: float) -> float:
  """One probe's cost (module doc). per_prompt: 'fdt' [P] (0..N), 'sdt' [P], 'nll' [P, N]
  (nats), 'kl_mean' [P] (nats; cost 'kl' only); base_nll: F's own mean NLL of its
  continuation on the same prompts."""
  fdt = np.asarray(per_prompt["fdt"], np.float64).reshape(-1)
  p = fdt.size
  if cost == "kl":
    return float(np.mean(per_prompt["kl_mean"]))
  if cost == "nll":
    return float(np.mean(per_prompt["nll"]) - base_nll)
  nll = np.asarray(per_prompt["nll"])
  n = nll.shape[-1] if nll.ndim == 2 else None
  if cost == "sdt":
    sdt = float(np.mean(per_prompt["sdt"]))
    return -math.log(max(1.0 - sdt, 1.0 / (p * (n or 1) + 1)))
  if cost == "fdt":
    if n is None:
      raise ValueError("cost 'fdt' needs per-position NLL [P, N] to know N")
    t = np.arange(1, n + 1)
    survive = (np.sum(fdt[None, :] >= t[:, None], axis=1) + 1.0) / (p + 1.0)
    return float(np.mean(-np.log(survive)))
  raise DtmError(f"unknown allocation cost {cost!r}; expected one of {', '.join(COSTS)}")


def monotone(y: Sequence[float]) -> np.ndarray:
  """The non-decreasing least-squares fit of y (pool adjacent violators)."""
  blocks: list[list[float]] = []  # [mean, weight]
  for v in map(float, y):
    blocks.append([v, 1.0])
    while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
      m2, w2 = blocks.pop()
      m1, w1 = blocks.pop()
      blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
  return np.concatenate([np.full(int(w), m) for m, w in blocks])


@dataclasses.dataclass(frozen=True)
class Table:
  """Cost per unit (component, or layer) and level. rates [J+1] with rates[0] = 0;
  costs [U, J+1] with costs[:, 0] = 0 (non-decreasing rows); numel [U]; units: the
  components of each unit (one each, or a layer's)."""
  units: tuple[tuple[Component, ...], ...]
  rates: np.ndarray
  costs: np.ndarray
  numel: np.ndarray

  @property
  def names(self) -> list[str]:
    return [u[0].name if len(u) == 1 else f"L{u[0].layer:02d}" for u in self.units]


def table(costs: Mapping[Component, Sequence[float]], rates: Sequence[float],
          numel: Mapping[Component, int]) -> Table:
  """Per-component Table from raw costs at the ladder rates (costs[c][j] at rates[j]);
  rate 0 is added with cost 0 and every row made non-decreasing (`monotone`, which
  may also pull the first rates' costs below 0 never: they are clipped at 0)."""
  comps = sorted(costs)
  r = np.concatenate([[0.0], np.asarray(rates, np.float64)])
  if np.any(np.diff(r) <= 0) or r[-1] >= 1:
    raise DtmError(f"allocation ladder must be strictly increasing rates in (0, 1), got "
                   f"{tuple(rates)}")
  rows = [np.maximum(monotone([0.0] + list(costs[c])), 0.0) for c in comps]
  return Table(tuple((c,) for c in comps), r, np.asarray(rows),
               np.asarray([numel[c] for c in comps], np.int64))


def group_by_layer(t: Table) -> Table:
  """One unit per layer: all of its components at one rate, cost = sum of theirs."""
  by_layer: dict[int, list[int]] = collections.defaultdict(list)
  for i, unit in enumerate(t.units):
    by_layer[unit[0].layer].append(i)
  layers = sorted(by_layer)
  return Table(tuple(tuple(c for i in by_layer[l] for c in t.units[i]) for l in layers),
               t.rates, np.asarray([t.costs[by_layer[l]].sum(0) for l in layers]),
               np.asarray([t.numel[by_layer[l]].sum() for l in layers], np.int64))


# ------------------------------------------------------------------------------ solve


def banded(t: Table, target: float, band: float) -> Table:
  """`t` with every level farther than `band` from `target` made impossible (cost inf):
  a trust region around the uniform allocation (OWL's λ plays this role). band 0 with the
  target on the ladder is the uniform allocation; band >= 1 is `t`. Level 0 (dense) stays
  only where target - band <= 0."""
  if band >= 1:
    return t
  far = np.abs(t.rates - target) > band + 1e-9
  costs = np.where(far[None, :], np.inf, t.costs)
  return dataclasses.replace(t, costs=costs)


def solve_banded(t: Table, target: float, band: float) -> np.ndarray:
  """`solve` within target ± band. Band 0 is the uniform allocation, given directly (the
  dynamic program's grid rounds each unit's count down and can miss an exact target by a
  few grid cells); DtmError when the ladder has no rate that close to the target."""
  if band == 0 and np.isclose(t.rates, target, atol=1e-9).any():
    return np.full(len(t.units), float(target))
  return solve(banded(t, target, band), target)


def solve(t: Table, target: float, grid: int = 200_000) -> np.ndarray:
  """Rates per unit [U] minimising the summed cost with sum(numel * rate) = target *
  sum(numel) (module doc). DtmError if the ladder cannot reach the target."""
  return _trim(t, solve_levels(t, target, grid), target)


def solve_levels(t: Table, target: float, grid: int = 200_000) -> np.ndarray:
  """The dynamic program: a ladder level per unit [U] (0 = unpruned) of least summed
  cost with at least target * sum(numel) pruned parameters (on the grid)."""
  if not 0 < target < 1:
    raise DtmError(f"allocation target sparsity must be in (0, 1), got {target}")
  top = t.rates[-1]
  if target > top + 1e-12:
    raise DtmError(f"allocation target sparsity {target:g} is beyond the ladder's top rate "
                   f"{top:g}: every component at {top:g} prunes only {top:.1%} of the "
                   f"parameters; extend the ladder")
  unit = int(t.numel.sum()) / grid
  w = np.floor(t.numel[:, None] * t.rates[None, :] / unit + 1e-9).astype(np.int64)  # [U, J+1]
  size = int(w[:, -1].sum()) + 1
  dp = np.full(size, np.inf)
  dp[0] = 0.0
  choice = np.zeros((len(t.units), size), np.int8)
  for i in range(len(t.units)):
    new = np.full(size, np.inf)
    for j in range(len(t.rates)):
      cand = np.full(size, np.inf)
      cand[w[i, j]:] = dp[:size - w[i, j]] + t.costs[i, j]
      better = cand < new
      new[better] = cand[better]
      choice[i, better] = j
    dp = new
  need = math.ceil(target * grid - 1e-6)
  if need >= size or not np.isfinite(dp[need:]).any():
    raise DtmError(f"allocation target sparsity {target:g} cannot be met with the ladder "
                   f"{tuple(t.rates[1:])}")
  g = need + int(np.argmin(dp[need:]))
  levels = np.zeros(len(t.units), np.int64)
  for i in range(len(t.units) - 1, -1, -1):
    levels[i] = choice[i, g]
    g -= w[i, levels[i]]
  return levels


def _trim(t: Table, levels: np.ndarray, target: float) -> np.ndarray:
  """Rates of the chosen levels, the surplus above target * total taken back from the
  unit whose last step costs the most per parameter (and can absorb it)."""
  rates = t.rates[levels].astype(np.float64)
  surplus = float(np.sum(t.numel * rates) - target * t.numel.sum())
  if surplus <= 0:
    return rates
  best, best_slope = None, -np.inf
  for i, j in enumerate(levels):
    if j == 0:
      continue
    step = t.numel[i] * (t.rates[j] - t.rates[j - 1])
    slope = (t.costs[i, j] - t.costs[i, j - 1]) / step
    if step >= surplus and slope > best_slope:
      best, best_slope = i, slope
  if best is not None:
    rates[best] -= surplus / t.numel[best]
  return rates


def interpolate(t: Table, unit: int, rate: float) -> float:
  """A unit's cost at any rate in [0, top]: linear between the ladder's rates."""
  return float(np.interp(rate, t.rates, t.costs[unit]))


def predicted(t: Table, rates: np.ndarray) -> float:
  """The additive model's cost of an allocation: sum over units of their probed cost."""
  return float(sum(interpolate(t, i, r) for i, r in enumerate(rates)))


def predicted_cost(t: Table, rates: Mapping[Component, float]) -> float:
  """The additive model's cost of per-component rates, from a per-component Table."""
  return float(sum(interpolate(t, i, rates.get(u[0], 0.0)) for i, u in enumerate(t.units)))


def component_rates(t: Table, rates: np.ndarray) -> dict[Component, float]:
  return {c: float(r) for unit, r in zip(t.units, rates) for c in unit}


def sparsity(rates: Mapping[Component, float], numel: Mapping[Component, int]) -> float:
  total = sum(numel.values())
  return sum(rates.get(c, 0.0) * n for c, n in numel.items()) / total


# ------------------------------------------------------------------------------ recipe


def recipe(rates: Mapping[Component, float], operator: str, options: str = "") -> str:
  """The allocation as a spec: one rule per (kind, rate), layers merged, kinds in KINDS
  order, rates ascending ('q@0-2,5:sparsegpt(rate=0.55)'); rate-0 components left out.
  `options`: the operator's other arguments ('percdamp=0.01'). Round-trips through
  `compress.parse_spec` to exactly these rates."""
  groups: dict[tuple[str, float], list[int]] = collections.defaultdict(list)
  for comp, r in rates.items():
    if r > 0:
      groups[(comp.kind, float(r))].append(comp.layer)
  extra = dict(item.split("=", 1) for item in options.split(",") if item.strip())
  rules = [compress.Rule((kind,), tuple(sorted(layers)),
                         compress.Method(operator, {"rate": r, **extra}))
           for (kind, r), layers in sorted(groups.items(),
                                           key=lambda g: (KINDS.index(g[0][0]), g[0][1]))]
  return compress.Spec(tuple(rules)).to_string()
