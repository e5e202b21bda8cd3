"""Allocation from single-component probes (dtm.search.allocation): costs by hand, the
monotone fit, the dynamic program against brute force, the per-layer variant, recipes."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dtm import compress as C
from dtm.components import Component
from dtm.errors import DtmError
from dtm.search import allocation as A


def test_costs_by_hand():
  per = {"fdt": np.array([2, 4]), "sdt": np.array([0.5, 0.25]),
         "nll": np.array([[1.0, 2.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0]]),
         "kl_mean": np.array([0.2, 0.4])}
  assert A.cost_of(per, "kl", 0.0) == pytest.approx(0.3)
  assert A.cost_of(per, "nll", 1.25) == pytest.approx(1.5 - 1.25)
  assert A.cost_of(per, "sdt", 0.0) == pytest.approx(-math.log(1 - 0.375))
  # N = 4, P = 2: S(1) = S(2) = 1, S(3) = S(4) = (1 + 1) / 3
  assert A.cost_of(per, "fdt", 0.0) == pytest.approx(2 * -math.log(2 / 3) / 4)
  none = {"fdt": np.array([4, 4]), "sdt": np.zeros(2), "nll": np.zeros((2, 4))}
  assert A.cost_of(none, "fdt", 0.0) == 0.0 and A.cost_of(none, "sdt", 0.0) == 0.0
  with pytest.raises(DtmError, match="unknown allocation cost"):
    A.cost_of(per, "ppl", 0.0)


def test_monotone_is_the_isotonic_fit():
  np.testing.assert_allclose(A.monotone([0, 2, 1, 3, 2.5, 2.5]), [0, 1.5, 1.5] + [8 / 3] * 3)
  y = np.random.default_rng(0).normal(size=30).cumsum()
  fit = A.monotone(y)
  assert np.all(np.diff(fit) >= -1e-12) and fit.sum() == pytest.approx(y.sum())


def _random_table(seed=0, units=6, rates=(0.25, 0.5, 0.75)):
  rng = np.random.default_rng(seed)
  comps = [Component(l, k) for l in range(units // 2) for k in ("q", "down")]
  numel = {c: (100 if c.kind == "q" else 300) for c in comps}
  costs = {c: np.cumsum(rng.random(len(rates))) for c in comps}
  return A.table(costs, rates, numel)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7])
def test_dynamic_program_equals_brute_force(target):
  t = _random_table()
  levels = A.solve_levels(t, target, grid=4000)
  best = min(sum(t.costs[i, j] for i, j in enumerate(lv))
             for lv in itertools.product(range(len(t.rates)), repeat=len(t.units))
             if sum(t.numel[i] * t.rates[j] for i, j in enumerate(lv)) >= target * t.numel.sum())
  assert sum(t.costs[i, j] for i, j in enumerate(levels)) == pytest.approx(best)
  rates = A.solve(t, target, grid=4000)
  assert np.sum(t.numel * rates) / t.numel.sum() == pytest.approx(target, abs=1e-9)
  assert A.predicted(t, rates) <= best + 1e-12  # the trim only removes pruning


def test_per_layer_units_and_errors():
  t = _random_table()
  layers = A.group_by_layer(t)
  assert layers.names == ["L00", "L01", "L02"] and list(layers.numel) == [400] * 3
  np.testing.assert_allclose(layers.costs[0], t.costs[0] + t.costs[1])
  rates = A.component_rates(layers, A.solve(layers, 0.5, grid=4000))
  assert rates[Component(0, "q")] == rates[Component(0, "down")]
  with pytest.raises(DtmError, match="beyond the ladder's top rate"):
    A.solve(t, 0.8)
  with pytest.raises(DtmError, match="strictly increasing"):
    A.table({Component(0, "q"): [1, 2]}, (0.5, 0.4), {Component(0, "q"): 10})


def test_recipe_round_trips_the_rates():
  rates = {Component(0, "q"): 0.5, Component(2, "q"): 0.5, Component(1, "down"): 1 / 3,
           Component(1, "q"): 0.0}
  text = A.recipe(rates, "sparsegpt")
  resolved = C.parse_spec(text).resolve(3)
  assert {c: m.kwargs["rate"] for c, m in resolved.items()} == {
      c: r for c, r in rates.items() if r > 0}
  assert text.startswith("q@0,2:sparsegpt(rate=0.5")


def test_bands_bound_the_rates_around_the_target():
  rates = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  t = _random_table(3, units=8, rates=rates)
  uniform = A.solve_banded(t, 0.5, 0.0)
  np.testing.assert_allclose(uniform, 0.5)  # band 0: every unit at the target
  big = A.table({Component(l, k): np.cumsum(np.ones(len(rates))) for l in range(30)
                 for k in ("q", "k", "v", "o", "gate", "up", "down")}, rates,
                {Component(l, k): 576 * (1536 if k in ("gate", "up", "down") else 192)
                 for l in range(30) for k in ("q", "k", "v", "o", "gate", "up", "down")})
  np.testing.assert_allclose(A.solve_banded(big, 0.3, 0.0), 0.3)  # 210 units: exact
  for band in (0.1, 0.2):
    got = A.solve_banded(t, 0.5, band)
    assert np.all(np.abs(got - 0.5) <= band + 1e-6)
    assert float(np.sum(t.numel * got) / t.numel.sum()) == pytest.approx(0.5, abs=1e-4)
    # never worse than uniform by the table's own (additive) cost; wider bands no worse
    assert A.predicted(t, got) <= A.predicted(t, uniform) + 1e-9
  assert A.banded(t, 0.5, 1.0) is t
  assert A.predicted(t, A.solve(t, 0.5)) <= A.predicted(t, A.solve(A.banded(t, 0.5, 0.2), 0.5)) + 1e-6
  with pytest.raises(DtmError, match="cannot be met"):
    A.solve(A.banded(t, 0.55, 0.02), 0.55)  # no ladder rate within 0.02 of 0.55
