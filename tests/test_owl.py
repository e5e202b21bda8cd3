"""OWL allocations in the spec grammar (dtm.compress.owl), and SparseGPT at many rates.

The reference comparison on SmolLM2 (rates within 1e-6, masks, perplexity) is in
tests/test_reference_pipelines.py; here: the grammar, hand-computed rates, the refusals,
and both application paths (parallel statistics, sequential) on a tiny random model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtm import compress as C
from dtm.components import Component, all_components, get_path, kernel_path
from dtm.compress import calibration, owl
from dtm.compress import sparsegpt as S
from dtm.errors import DtmError
from dtm.model import init_params
from tiny_model import TINY


def test_owl_grammar_round_trip_and_defaults():
  spec = C.parse_spec("*@*:owl(0.7)")
  method = spec.rules[0].method
  assert method.kwargs == {"rate": 0.7, "method": "wanda", "lamda": 0.08, "m": 5.0}
  assert C.parse_spec(spec.to_string()) == spec
  m2 = C.parse_method("owl(0.6, method=sparsegpt, lamda=0.05, m=7)")
  assert C.needs_hessian(m2) and not C.needs_hessian(method)
  assert "owl" in C.CALIBRATED_METHODS


@pytest.mark.parametrize("text, words", [
    ("owl(1.0)", "rate must be in (0, 1)"),
    ("owl(0)", "rate must be in (0, 1)"),
    ("owl(0.5, method=gptq)", "owl method must be one of wanda, sparsegpt, magnitude"),
    ("owl(0.5, lamda=0.6)", "lamda"),
    ("owl(0.5, m=0)", "outlier threshold"),
])
def test_owl_bad_arguments(text, words):
  with pytest.raises(DtmError, match=words.replace("(", r"\(").replace(")", r"\)")):
    C.parse_method(text)


def test_layer_sparsities_by_hand():
  # ratios 1, 2, 3 %: normalised to 0, 0.08, 0.16 (2 lamda), mean 0.08; density =
  # d - 0.08 + 0.5 -> sparsity 0.58, 0.5, 0.42: more outliers, less pruning
  np.testing.assert_allclose(owl.layer_sparsities(np.array([1.0, 2.0, 3.0]), 0.5, 0.08),
                             [0.58, 0.5, 0.42], atol=1e-12)
  # equal ratios: every layer at the target (upstream would divide by zero)
  np.testing.assert_allclose(owl.layer_sparsities(np.array([2.0, 2.0]), 0.3, 0.08), [0.3, 0.3])
  # a density above 1 gives the upstream floor of 0.01
  assert owl.layer_sparsities(np.array([0.0, 10.0]), 0.05, 0.08)[1] == owl.FLOOR


def _tiny():
  params = init_params(TINY, seed=0)
  windows = np.random.default_rng(0).integers(0, TINY.vocab_size, (8, 16))
  return params, windows


def test_outlier_ratio_counts_entries_above_m_times_mean():
  params, windows = _tiny()
  stats = calibration.collect_statistics(TINY, params, windows, hessian=False)
  comps = [Component(1, k) for k in ("q", "down")]
  metric = []
  for c in comps:
    w = np.asarray(get_path(params, kernel_path(c.kind))[c.layer], np.float64)  # [in, out]
    s = np.asarray(stats[c].sq_norms, np.float64) / stats[c].windows
    metric.append((np.abs(w) * np.sqrt(s)[:, None]).ravel())
  a = np.concatenate(metric)
  expected = 100.0 * np.mean(a > 3.0 * a.mean())
  assert owl.outlier_ratio(params, stats, comps, 3.0) == pytest.approx(expected, abs=1e-9)


def test_owl_apply_spec_parallel_and_sequential():
  params, windows = _tiny()
  stats = calibration.collect_statistics(TINY, params, windows, hessian=False)
  spec = "*@*:owl(0.5,lamda=0.1,m=2)"
  new, report = C.apply_spec(params, spec, calibration=stats)
  rates, _ = owl.allocate(params, stats, all_components(TINY.num_layers),
                          C.parse_method("owl(0.5,lamda=0.1,m=2)"))
  assert np.mean(list(rates.values())) == pytest.approx(0.5)
  for comp in all_components(TINY.num_layers):
    entry = report[comp.name]
    assert entry["allocation"] == "owl(rate=0.5,method=wanda,lamda=0.1,m=2.0)"
    assert C.parse_method(entry["method"]) == C.Method("wanda", {"rate": rates[comp.layer]})
  # the expanded spec applied directly gives the same weights
  recipe = "; ".join(f"{c.kind}@{c.layer}:wanda({rates[c.layer]!r})"
                     for c in all_components(TINY.num_layers))
  same, _ = C.apply_spec(params, recipe, calibration=stats)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(same)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # sequential: the same rates (from the dense model), layer l pruned on compressed inputs
  seq, seq_report = calibration.calibrate_and_compress(TINY, params, spec, windows)
  for comp in all_components(TINY.num_layers):
    assert seq_report[comp.name]["method"] == report[comp.name]["method"]
  first = Component(0, "q")  # layer 0 sees the same inputs in both modes
  np.testing.assert_array_equal(np.asarray(get_path(seq, kernel_path("q"))[0]),
                                np.asarray(get_path(new, kernel_path("q"))[0]))
  assert seq_report[first.name]["sparsity"] == pytest.approx(rates[0], abs=0.02)


def test_owl_needs_calibration_and_refuses_full_layers():
  params, windows = _tiny()
  with pytest.raises(DtmError, match="needs calibration statistics"):
    C.apply_spec(params, "*@*:owl(0.5)")
  stats = calibration.collect_statistics(TINY, params, windows, hessian=False)
  with pytest.raises(DtmError, match=">= 1"):  # rate 0.95 + up to 2 lamda
    C.apply_spec(params, "*@*:owl(0.95,lamda=0.4,m=2)", calibration=stats)


def test_sparsegpt_levels_equal_per_rate_calls():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
  x = rng.standard_normal((200, 40)).astype(np.float32)
  h = jnp.asarray(x.T @ x)
  rates = (0.1, 0.37, 0.5, 0.9)
  out, damp = S.sparsegpt_levels(w, h, rates, blocksize=16)
  for i, r in enumerate(rates):
    ref, ref_damp = S.sparsegpt(w, h, rate=r, blocksize=16)
    np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(ref))
    assert float(damp) == float(ref_damp)
  with pytest.raises(ValueError):
    S.sparsegpt_levels(w, h, (0.0, 0.5))
