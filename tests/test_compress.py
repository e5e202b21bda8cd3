"""Tests for dtm.compress: spec grammar, validation, per-matrix methods, apply_spec."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtm import compress as C
from dtm.components import KINDS, Component, kernel_path
from dtm.errors import DtmError

# ------------------------------------------------------------------------- numpy references


def np_rank(w_OI: np.ndarray) -> np.ndarray:
  """Brute force: rank in ascending (|w|, flat index) order, by explicit sorting of tuples."""
  flat = np.abs(w_OI).reshape(-1)
  order = sorted(range(flat.size), key=lambda i: (flat[i], i))
  rank = np.empty(flat.size, np.int64)
  rank[order] = np.arange(flat.size)
  return rank.reshape(w_OI.shape)


def np_nm_keep(w_OI: np.ndarray, n: int, m: int) -> np.ndarray:
  keep = np.zeros(w_OI.shape, bool)
  for o in range(w_OI.shape[0]):
    for g0 in range(0, w_OI.shape[1], m):
      idx = sorted(range(g0, g0 + m), key=lambda i: (abs(w_OI[o, i]), i))
      keep[o, idx[m - n:]] = True
  return keep


def quantized_like(key, shape, levels=3):
  """Weights with many exactly-equal magnitudes (as in a quantized checkpoint)."""
  return jax.random.randint(key, shape, -levels, levels + 1).astype(jnp.float32) * 0.25


# ---------------------------------------------------------------------------------- grammar


def test_parse_example_and_canonical_round_trip():
  text = "down@*:magnitude(0.5); q@3:absmax(bits=8,granularity=channel); up , gate@7,0-3:nm(2,4)"
  spec = C.parse_spec(text)
  assert spec.rules[0] == C.Rule(("down",), None, C.Method("magnitude", {"rate": 0.5}))
  assert spec.rules[1].method == C.Method("absmax", {"bits": 8})  # channel is the default
  assert spec.rules[2].kinds == ("gate", "up") and spec.rules[2].layers == (0, 1, 2, 3, 7)
  canon = spec.to_string()
  assert canon == ("down@*:magnitude(rate=0.5); q@3:absmax(bits=8,granularity=channel); "
                   "gate,up@0-3,7:nm(n=2,m=4)")
  assert C.parse_spec(canon) == spec and C.parse_spec(canon).to_string() == canon


@pytest.mark.parametrize("text", [
    "*@*:identity", "attn@1:absmax(4,group,16)", "mlp@0,2:absmax(bits=3,granularity=tensor)",
    "q,k@0-2:magnitude(rate=0.25);v@1:nm(4,8);", "o@2:absmax(2, granularity='group', group_size=8)"])
def test_round_trip(text):
  spec = C.parse_spec(text)
  assert C.parse_spec(spec.to_string()) == spec
  assert hash(spec)  # hashable (static jit args)


@pytest.mark.parametrize("text", ["", "  ", "none", "NONE", None])
def test_identity_spec(text):
  spec = C.parse_spec(text)
  assert spec == C.Spec(()) and spec.to_string() == "none" and spec.resolve(4) == {}


def test_kind_aliases_and_multiline():
  spec = C.parse_spec("attn@0:magnitude(0.1)\nmlp@1:nm(2,4)")
  assert spec.rules[0].kinds == ("q", "k", "v", "o")
  assert spec.rules[1].kinds == ("gate", "up", "down")
  assert C.parse_spec("q,k,v,o,gate,up,down@0:identity").rules[0].to_string() == "*@0:identity"


def test_resolve_override_order_and_identity_drop():
  spec = C.parse_spec("*@*:magnitude(0.5); q@0:identity; down@1-2:nm(2,4); down@2:absmax(4)")
  res = spec.resolve(3)
  assert Component(0, "q") not in res
  assert res[Component(1, "q")] == C.Method("magnitude", {"rate": 0.5})
  assert res[Component(0, "down")] == C.Method("magnitude", {"rate": 0.5})
  assert res[Component(1, "down")] == C.Method("nm", {"n": 2, "m": 4})
  assert res[Component(2, "down")] == C.Method("absmax", {"bits": 4})
  assert len(res) == 3 * len(KINDS) - 1
  assert list(res) == [c for l in range(3) for c in (Component(l, k) for k in KINDS) if c in res]


def test_rule_accepts_strings_and_lists():
  assert C.Rule("gate,up", "0-1", "nm(2,4)") == C.parse_rule("gate,up@0-1:nm(2,4)")
  assert C.Rule(["up", "gate"], [1, 0, 1], C.Method("nm", (("n", 2), ("m", 4)))) == \
      C.parse_rule("gate,up@0-1:nm(2,4)")


@pytest.mark.parametrize("text, match", [
    ("down*:magnitude(0.5)", "bad compression rule 'down\\*:magnitude"),
    ("down@*", "bad compression rule"),
    ("foo@*:magnitude(0.5)", "unknown component kind 'foo'"),
    ("down@x:magnitude(0.5)", "bad layer selector 'x'"),
    ("down@5-2:magnitude(0.5)", "start 5 > end 2"),
    ("down@*:prune(0.5)", "unknown compression method 'prune'"),
    ("down@*:magnitude(1.0)", "rate must be in \\[0, 1\\), got 1.0"),
    ("down@*:magnitude(-0.1)", "got -0.1"),
    ("down@*:magnitude(half)", "bad value 'half' for argument 'rate'"),
    ("down@*:magnitude()", "missing argument 'rate'"),
    ("down@*:magnitude(0.5, 2)", "too many arguments"),
    ("down@*:magnitude(frac=0.5)", "unknown argument 'frac'"),
    ("down@*:magnitude(rate=0.5, rate=0.2)", "given twice"),
    ("down@*:nm(n=2, 4)", "positional argument '4' after a keyword"),
    ("down@*:absmax(bits=9)", "bits must be in 2..8, got 9"),
    ("down@*:absmax(1)", "bits must be in 2..8, got 1"),
    ("down@*:absmax(4.5)", "bad value '4.5' for argument 'bits'"),
    ("down@*:absmax(4, row)", "granularity must be one of tensor, channel, group, got 'row'"),
    ("down@*:absmax(4, group)", "needs group_size"),
    ("down@*:absmax(4, group_size=64)", "only applies to granularity=group"),
    ("down@*:nm(4,2)", "n must be <= m"),
    ("down@*:nm(2,0)", "need m >= 1"),
])
def test_parse_errors(text, match):
  with pytest.raises(DtmError, match=match):
    C.parse_spec(text)


SHAPES = {"q": (16, 16), "k": (8, 16), "v": (8, 16), "o": (16, 16),
          "gate": (32, 16), "up": (32, 16), "down": (16, 32)}


@pytest.mark.parametrize("text, match", [
    ("q@3:magnitude(0.5)", "names layer 3, but the model has 3 layers \\(0-2\\)"),
    ("q@0-9:magnitude(0.5)", "names layer 9, but the model has 3 layers"),
    ("q@1:absmax(4,group,12)", "group_size 12 does not divide the input dimension of L01.q "
                               "\\(HF weight \\[out=16, in=16\\]\\)"),
    ("down@2:nm(2,3)", "m=3 does not divide the input dimension of L02.down .*in=32"),
])
def test_validate_errors(text, match):
  with pytest.raises(DtmError, match=match):
    C.validate(text, 3, SHAPES)


def test_validate_missing_kind_and_overridden_ok():
  no_mlp = {k: v for k, v in SHAPES.items() if k in ("q", "k", "v", "o")}
  with pytest.raises(DtmError, match="names kind 'gate', which this model does not have"):
    C.validate("gate@0:nm(2,4)", 3, no_mlp)
  # a bad group size that is overridden by a later rule never applies
  C.validate("q@1:absmax(4,group,12); q@1:absmax(4,group,8)", 3, SHAPES)
  with pytest.raises(DtmError, match="names layer 5"):
    C.parse_spec("q@5:identity").resolve(3)


def test_method_direct_construction_validates():
  with pytest.raises(DtmError, match="bits must be in 2..8"):
    C.Method("absmax", {"bits": 16})
  with pytest.raises(DtmError, match="unknown compression method"):
    C.Method("svd", {})
  assert C.Method("absmax", {"bits": "4"}) == C.Method("absmax", (("bits", 4), ("granularity", "channel")))


# ----------------------------------------------------------------------------- magnitude


def test_num_pruned():
  assert C.num_pruned(0.29, 100) == 29  # float 0.29 * 100 = 28.999999999999996
  assert C.num_pruned(0.5, 7) == 3
  assert C.num_pruned(0.0, 7) == 0
  assert C.num_pruned(0.999, 1000) == 999


def test_tie_break_hand_built():
  # |w| has ties everywhere; HF flat order is row-major over [out=2, in=4]:
  #   flat:  0     1    2    3    4    5     6    7
  w = np.array([[1.0, -2.0, 1.0, 0.0],
                [-1.0, 2.0, 0.0, 1.0]], np.float32)
  # ascending (|w|, idx): 3(0) 6(0) 0(1) 2(1) 4(1) 7(1) 1(2) 5(2)
  expected_rank = np.array([[2, 6, 3, 0], [4, 7, 1, 5]])
  np.testing.assert_array_equal(C.prune_rank(jnp.asarray(w)), expected_rank)
  # rate 0.5 -> k = 4: the two zeros, then the 1s at flat 0 and 2 (lower indices first)
  pruned, stats = C.magnitude(jnp.asarray(w), 0.5)
  expected = np.array([[0.0, -2.0, 0.0, 0.0],
                       [-1.0, 2.0, 0.0, 1.0]], np.float32)
  np.testing.assert_array_equal(pruned, expected)
  assert float(stats["sparsity"]) == 0.5 and int(stats["bits"]) == 32
  # the same matrix as a Flax kernel [in, out]: ranks still follow HF order
  np.testing.assert_array_equal(C.prune_rank_kernel(jnp.asarray(w.T)), expected_rank.T)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.29, 0.5, 0.73, 0.99])
def test_magnitude_exact_k_and_brute_force(rate):
  w = quantized_like(jax.random.PRNGKey(0), (12, 20))  # ~1/7 exact zeros, many ties
  w_np = np.asarray(w)
  k = C.num_pruned(rate, w.size)
  assert k == math.floor(rate * w.size + 1e-9)
  rank = np_rank(w_np)
  np.testing.assert_array_equal(C.prune_rank(w), rank)
  pruned, stats = C.magnitude(w, rate)
  expected = np.where(rank >= k, w_np, 0.0)
  np.testing.assert_array_equal(pruned, expected)
  # exactly k entries are pruned (pre-existing zeros are pruned first and count among k)
  pruned_mask = rank < k
  assert pruned_mask.sum() == k
  np.testing.assert_array_equal(np.asarray(pruned)[~pruned_mask], w_np[~pruned_mask])
  zeros = (w_np == 0).sum()
  assert float(stats["sparsity"]) == pytest.approx(max(k, zeros) / w.size)
  # the probe path: mask from the rank array at traced k agrees exactly
  np.testing.assert_array_equal(jax.jit(C.prune_lowest)(w, k), expected)


def test_magnitude_bf16_keeps_dtype():
  w = jax.random.normal(jax.random.PRNGKey(1), (8, 16)).astype(jnp.bfloat16)
  pruned, stats = C.magnitude(w, 0.5)
  assert pruned.dtype == jnp.bfloat16 and pruned.shape == w.shape
  assert int((pruned == 0).sum()) == 64 and int(stats["bits"]) == 16


# ------------------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (0, 4), (4, 4)])
def test_nm_pattern_and_brute_force(n, m):
  w = quantized_like(jax.random.PRNGKey(2), (6, 16), levels=2)
  pruned, stats = C.nm(w, n, m)
  keep = np_nm_keep(np.asarray(w), n, m)
  np.testing.assert_array_equal(C.nm_rank(w, m) >= m - n, keep)
  np.testing.assert_array_equal(pruned, np.where(keep, np.asarray(w), 0.0))
  # every group of m keeps exactly n positions
  assert (keep.reshape(6, 16 // m, m).sum(-1) == n).all()
  assert (np.asarray(pruned).reshape(6, -1, m) != 0).sum(-1).max() <= n
  assert float(stats["sparsity"]) >= (m - n) / m


def test_nm_ties_hand_built():
  w = jnp.array([[1.0, 1.0, 1.0, 1.0, -3.0, 3.0, 0.5, -3.0]])
  pruned, _ = C.nm(w, 2, 4)
  np.testing.assert_array_equal(pruned, [[0.0, 0.0, 1.0, 1.0, 0.0, 3.0, 0.0, -3.0]])


# ---------------------------------------------------------------------------------- absmax


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity, group_size", [("tensor", None), ("channel", None), ("group", 4)])
def test_absmax_grid_and_error(bits, granularity, group_size):
  w = jax.random.normal(jax.random.PRNGKey(3), (6, 16))
  w = w.at[2].set(0.0)  # an all-zero row (and group) must stay zero
  qw, stats = C.absmax(w, bits, granularity, group_size)
  assert qw.shape == w.shape and qw.dtype == w.dtype and int(stats["bits"]) == bits
  g = 16 if granularity != "group" else group_size
  scale = np.asarray(C.absmax_scale(w, bits, granularity, group_size))
  w_np = np.asarray(w).reshape(6, 16 // g, g)
  qw_np = np.asarray(qw).reshape(6, 16 // g, g)
  qmax = 2 ** (bits - 1) - 1
  # scales: max |w| over the right group
  if granularity == "tensor":
    expected_scale = np.abs(w_np).max().reshape(1, 1, 1) / qmax
  else:
    expected_scale = np.abs(w_np).max(-1, keepdims=True) / qmax
  np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
  safe = np.where(scale == 0, 1.0, scale)
  q = qw_np / safe
  np.testing.assert_allclose(q, np.round(q), atol=1e-4)
  assert np.abs(np.round(q)).max() <= qmax
  assert (np.abs(qw_np - w_np) <= scale / 2 * (1 + 1e-5) + 1e-7).all()
  np.testing.assert_array_equal(np.asarray(qw)[2], 0.0)
  # exact reference: round-half-to-even then rescale
  ref = np.clip(np.round(w_np / safe), -qmax, qmax) * scale
  np.testing.assert_allclose(qw_np, ref, rtol=1e-6, atol=1e-7)


def test_absmax_round_half_even_and_extremes():
  # bits=3: qmax = 3, scale = 3/3 = 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2, 3 stays
  w = jnp.array([[0.5, 1.5, 2.5, -2.5, 3.0, -3.0, 0.49, 1.0]])
  qw, _ = C.absmax(w, 3, "tensor")
  np.testing.assert_array_equal(qw, [[0.0, 2.0, 2.0, -2.0, 3.0, -3.0, 0.0, 1.0]])


# -------------------------------------------------------------------------------- apply_spec


def random_params(L=3, D=16, F=32, Hq=4, Hkv=2, Dh=4, V=11):
  keys = iter(jax.random.split(jax.random.PRNGKey(4), 16))
  dims = {"q": (D, Hq * Dh), "k": (D, Hkv * Dh), "v": (D, Hkv * Dh), "o": (Hq * Dh, D),
          "gate": (D, F), "up": (D, F), "down": (F, D)}
  layers = {"attn": {}, "mlp": {}, "attn_norm": {"scale": jnp.ones((L, D))},
            "mlp_norm": {"scale": jnp.ones((L, D))}}
  for kind, (i, o) in dims.items():
    layers[kernel_path(kind)[1]][kind] = {"kernel": jax.random.normal(next(keys), (L, i, o))}
  return {"embed": {"embedding": jax.random.normal(next(keys), (V, D))},
          "final_norm": {"scale": jnp.ones((D,))},
          "lm_head": {"kernel": jax.random.normal(next(keys), (D, V))}, "layers": layers}


def test_kernel_shapes():
  L, shapes = C.kernel_shapes(jax.eval_shape(random_params))
  assert L == 3 and shapes == SHAPES


@pytest.mark.parametrize("batch_size", [None, 2])
def test_apply_spec_changes_exactly_selected(batch_size):
  params = random_params()
  before = jax.tree.map(np.array, params)
  spec = "down@*:magnitude(0.5); q@1:absmax(bits=4,granularity=group,group_size=8); gate,up@0,2:nm(2,4)"
  new, report = C.apply_spec(params, spec, batch_size=batch_size)
  # input untouched
  jax.tree.map(np.testing.assert_array_equal, params, before)
  resolved = C.parse_spec(spec).resolve(3)
  assert list(report) == sorted(c.name for c in resolved)
  for kind in KINDS:
    path = kernel_path(kind)
    old_k, new_k = before["layers"][path[1]][kind]["kernel"], new["layers"][path[1]][kind]["kernel"]
    assert new_k.shape == old_k.shape and new_k.dtype == old_k.dtype
    for l in range(3):
      comp = Component(l, kind)
      if comp not in resolved:
        np.testing.assert_array_equal(new_k[l], old_k[l])
        continue
      # the per-matrix function on the HF weight, transposed back, is what was written
      expected, _ = C.compress(jnp.asarray(old_k[l].T), resolved[comp])
      np.testing.assert_array_equal(new_k[l], np.asarray(expected).T)
      assert not np.array_equal(new_k[l], old_k[l])
  for name in ("embed", "final_norm", "lm_head"):
    jax.tree.map(np.testing.assert_array_equal, new[name], before[name])
  jax.tree.map(np.testing.assert_array_equal, new["layers"]["attn_norm"], before["layers"]["attn_norm"])
  assert report["L00.down"] == {"method": "magnitude(rate=0.5)", "sparsity": 0.5, "bits": 32}
  assert report["L01.q"]["method"] == "absmax(bits=4,granularity=group,group_size=8)"
  assert report["L01.q"]["bits"] == 4
  assert report["L02.gate"] == {"method": "nm(n=2,m=4)", "sparsity": 0.5, "bits": 32}
  assert "L01.gate" not in report


def test_apply_spec_identity_and_errors():
  params = random_params()
  new, report = C.apply_spec(params, "none")
  assert report == {}
  jax.tree.map(np.testing.assert_array_equal, new, params)
  with pytest.raises(DtmError, match="names layer 7, but the model has 3 layers"):
    C.apply_spec(params, "q@7:magnitude(0.5)")
  with pytest.raises(DtmError, match="does not divide the input dimension of L00.down"):
    C.apply_spec(params, "down@0:nm(2,5)")


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 64)])
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_absmax_bit_exact_against_numpy_ieee_division(bits, granularity, group_size):
  """q = round_half_even(w / scale) with true IEEE division (XLA must not use 1/scale)."""
  w = np.random.default_rng(bits).standard_normal((96, 192)).astype(np.float32) * 0.05
  got, _ = C.absmax(jnp.asarray(w), bits, granularity, group_size)
  g = group_size or w.shape[1]
  wg = w.reshape(w.shape[0], -1, g)
  axes = (0, 1, 2) if granularity == "tensor" else (2,)
  qmax = np.float32(2 ** (bits - 1) - 1)
  scale = np.abs(wg).max(axis=axes, keepdims=True) / qmax
  ref = (np.clip(np.round(wg / scale), -qmax, qmax) * scale).reshape(w.shape)
  np.testing.assert_array_equal(np.asarray(got), ref.astype(np.float32))


def test_counting_threshold_equals_sorted_rank_on_ties():
  """magnitude_pruned (binary search, no sort) == prune_rank < k for every k tried."""
  rng = np.random.default_rng(7)
  w = rng.integers(-3, 4, (24, 40)).astype(np.float32) * 0.25  # many equal magnitudes, zeros
  rank = np.asarray(C.prune_rank(jnp.asarray(w)))
  idx = np.arange(w.size, dtype=np.int32).reshape(w.shape)
  for k in [0, 1, 2, 37, 311, 480, 900, w.size - 1, w.size]:
    got = np.asarray(C.magnitude_pruned(jnp.abs(jnp.asarray(w)), jnp.asarray(idx), k))
    np.testing.assert_array_equal(got, rank < k, err_msg=f"k={k}")


@pytest.mark.parametrize("spec_args", ["4", "4,granularity=tensor", "3,granularity=group,group_size=16"])
def test_absmax_in_apply_spec_equals_direct_call_bit_for_bit(spec_args):
  """apply_spec vmaps absmax over layers; its scales must be the unbatched division's
  (a divisor broadcast after the barrier let XLA use a reciprocal: one ulp off)."""
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 48))
  method = C.parse_method(f"absmax({spec_args})")
  direct = jnp.stack([C.absmax(w[i].T, **method.kwargs)[0].T for i in range(3)])
  new, _ = C.apply_spec({"layers": {"attn": {"q": {"kernel": w}}}}, f"q@*:{method.to_string()}")
  np.testing.assert_array_equal(np.asarray(new["layers"]["attn"]["q"]["kernel"]), np.asarray(direct))
