"""Wanda and SparseGPT against NumPy transcriptions of the published reference code.

The references below follow locuslab/wanda `prune_wanda` (lib/prune.py) and
IST-DASLab/sparsegpt `SparseGPT.fasterprune` (sparsegpt.py) line by line, with the
reference's argument conventions (`prune_n` / `prunen` = weights PRUNED per group of m;
dtm's n is the number kept, so prunen = m - n). Wanda's reference computes its score in
float32 (as torch does), so masks must be identical bit for bit; SparseGPT's reference
runs in float64 here against dtm's float32 on well-conditioned Hessians (cond(H) < 10):
identical masks, updated weights within 1e-5 absolute (weights ~ N(0, 1)).
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtm import compress as C
from dtm.components import Component
from dtm.compress import sparsegpt as S
from dtm.compress import wanda as W
from dtm.errors import DtmError

# ------------------------------------------------------------------------ NumPy references


def ref_wanda(w, scaler_row, sparsity_ratio=0.0, prune_n=0, prune_m=0):
  """prune_wanda's per-layer body (float32 like the reference's torch tensors).
  torch.topk(largest=False) ties are resolved as the lower index (a stable argsort)."""
  w = np.array(w, np.float32)
  w_metric = np.abs(w) * np.sqrt(np.asarray(scaler_row, np.float32).reshape(1, -1))
  w_mask = np.zeros(w.shape, bool)
  rows = np.arange(w.shape[0])[:, None]
  if prune_n != 0:
    for ii in range(w_metric.shape[1]):
      if ii % prune_m == 0:
        tmp = w_metric[:, ii:ii + prune_m]
        w_mask[rows, ii + np.argsort(tmp, axis=1, kind="stable")[:, :prune_n]] = True
  else:
    sort_res = np.argsort(w_metric, axis=-1, kind="stable")
    indices = sort_res[:, :int(w_metric.shape[1] * sparsity_ratio)]
    w_mask[rows, indices] = True
  w[w_mask] = 0
  return w


def ref_fasterprune(w, h, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
  """SparseGPT.fasterprune in float64 NumPy (quantizer and debug paths left out)."""
  w = np.array(w, np.float64)
  h = np.array(h, np.float64)
  rows, columns = w.shape
  dead = np.diag(h) == 0
  h[np.flatnonzero(dead), np.flatnonzero(dead)] = 1
  w[:, dead] = 0
  damp = percdamp * np.mean(np.diag(h))
  diag = np.arange(columns)
  h[diag, diag] += damp
  lower = np.linalg.cholesky(h)
  h = np.linalg.inv(lower @ lower.T)           # torch.cholesky_inverse
  hinv = np.linalg.cholesky(h).T               # torch.linalg.cholesky(upper=True)
  all_rows = np.arange(rows)[:, None]
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1
    w1 = w[:, i1:i2].copy()
    q1 = np.zeros_like(w1)
    err1 = np.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]
    if prunen == 0:
      tmp = w1 ** 2 / (np.diag(hinv1).reshape((1, -1))) ** 2
      thresh = np.sort(tmp.flatten())[int(tmp.size * sparsity)]
      mask1 = tmp <= thresh
    else:
      mask1 = np.zeros(w1.shape, bool)
    for i in range(count):
      col = w1[:, i]
      d = hinv1[i, i]
      if prunen != 0 and i % prunem == 0:
        tmp = w1[:, i:(i + prunem)] ** 2 / (np.diag(hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
        mask1[all_rows, i + np.argsort(tmp, axis=1, kind="stable")[:, :prunen]] = True
      q = col.copy()
      q[mask1[:, i]] = 0
      q1[:, i] = q
      e = (col - q) / d
      w1[:, i:] -= np.outer(e, hinv1[i, i:])
      err1[:, i] = e
    w[:, i1:i2] = q1
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
  return w


def gram(rng, tokens: int, dim: int, dead: tuple[int, ...] = ()) -> np.ndarray:
  """H = X^T X of Gaussian activations [tokens, dim] (cond ~ ((1+r)/(1-r))^2, r =
  sqrt(dim/tokens)); columns in `dead` are all-zero inputs."""
  x = rng.standard_normal((tokens, dim))
  x[:, list(dead)] = 0
  return (x.T @ x).astype(np.float32)


# ------------------------------------------------------------------------------------ Wanda


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.75])
def test_wanda_unstructured_equals_reference(rate):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((24, 64)).astype(np.float32)
  s = (rng.random(64) * 10).astype(np.float32)
  s[5] = 0  # a dead input
  got = np.asarray(W.wanda(jnp.asarray(w), jnp.asarray(s), rate=rate))
  np.testing.assert_array_equal(got, ref_wanda(w, s, sparsity_ratio=rate))
  assert np.all(np.sum(got == 0, axis=1) == int(64 * rate))  # per output row


@pytest.mark.parametrize("rate", [0.3, 0.5])
def test_wanda_many_ties_equals_stable_sort(rate):
  """Scores with many exact ties (quantized weights, equal norms): lower index first."""
  rng = np.random.default_rng(8)
  w = (rng.integers(-2, 3, (24, 64)) * 0.5).astype(np.float32)
  s = np.repeat(np.float32([1.0, 4.0]), 32)
  got = np.asarray(W.wanda(jnp.asarray(w), jnp.asarray(s), rate=rate))
  np.testing.assert_array_equal(got, ref_wanda(w, s, sparsity_ratio=rate))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (4, 8), (0, 2), (2, 2)])
def test_wanda_nm_equals_reference(n, m):
  rng = np.random.default_rng(1)
  w = rng.standard_normal((16, 32)).astype(np.float32)
  s = (rng.random(32) * 3).astype(np.float32)
  got = np.asarray(W.wanda(jnp.asarray(w), jnp.asarray(s), n=n, m=m))
  np.testing.assert_array_equal(got, ref_wanda(w, s, prune_n=m - n, prune_m=m))
  kept = np.sum(got.reshape(16, -1, m) != 0, axis=-1)
  assert np.all(kept == n)


def test_wanda_uses_activations_and_breaks_ties_by_lower_index():
  # |w| alone would prune column 0; the activation norm makes column 1 the weakest.
  w = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
  s = np.array([100.0, 0.01, 1.0, 1.0], np.float32)
  np.testing.assert_array_equal(np.asarray(W.wanda(jnp.asarray(w), jnp.asarray(s), rate=0.25)),
                                [[1, 0, 3, 4]])
  # all scores equal: the lower input index is pruned first (stable sort), in both modes
  w, s = np.ones((2, 4), np.float32), np.ones(4, np.float32)
  np.testing.assert_array_equal(np.asarray(W.wanda(jnp.asarray(w), jnp.asarray(s), rate=0.5)),
                                [[0, 0, 1, 1]] * 2)
  np.testing.assert_array_equal(np.asarray(W.wanda(jnp.asarray(w), jnp.asarray(s), n=1, m=2)),
                                [[0, 1, 0, 1]] * 2)


def test_wanda_bf16_keeps_dtype():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.standard_normal((8, 16)), jnp.bfloat16)
  got = W.wanda(w, jnp.ones(16), rate=0.5)
  assert got.dtype == jnp.bfloat16
  ref = ref_wanda(np.asarray(w.astype(jnp.float32)), np.ones(16), sparsity_ratio=0.5)
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), ref)


# -------------------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("out_dim, in_dim, rate, blocksize", [
    (16, 64, 0.5, 128),   # one block, smaller than blocksize (as in the reference)
    (12, 72, 0.25, 32),   # blocks of 32, 32 and a partial 8
    (8, 96, 0.75, 32),
])
def test_sparsegpt_unstructured_equals_reference(out_dim, in_dim, rate, blocksize):
  rng = np.random.default_rng(3)
  w = rng.standard_normal((out_dim, in_dim)).astype(np.float32)
  h = gram(rng, 1024, in_dim, dead=(3,))
  got, damp = S.sparsegpt(jnp.asarray(w), jnp.asarray(h), rate=rate, blocksize=blocksize)
  want = ref_fasterprune(w, h, rate, blocksize=blocksize)
  got = np.asarray(got)
  np.testing.assert_array_equal(got == 0, want == 0)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert float(damp) == pytest.approx(0.01)
  assert np.all(got[:, 3] == 0)  # the dead input


@pytest.mark.parametrize("n, m, blocksize", [(2, 4, 128), (1, 4, 16), (4, 8, 32), (3, 4, 8)])
def test_sparsegpt_nm_equals_reference(n, m, blocksize):
  rng = np.random.default_rng(4)
  w = rng.standard_normal((10, 48)).astype(np.float32)
  h = gram(rng, 1024, 48)
  got, _ = S.sparsegpt(jnp.asarray(w), jnp.asarray(h), n=n, m=m, blocksize=blocksize)
  want = ref_fasterprune(w, h, 0.0, prunen=m - n, prunem=m, blocksize=blocksize)
  got = np.asarray(got)
  np.testing.assert_array_equal(got == 0, want == 0)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert np.all(np.sum(got.reshape(10, -1, m) != 0, axis=-1) == n)


def test_sparsegpt_scale_of_hessian_does_not_matter_and_rate_zero_is_identity():
  rng = np.random.default_rng(5)
  w = rng.standard_normal((8, 32)).astype(np.float32)
  h = gram(rng, 512, 32)
  a, _ = S.sparsegpt(jnp.asarray(w), jnp.asarray(h), rate=0.5)
  b, _ = S.sparsegpt(jnp.asarray(w), jnp.asarray(h * (2 / 7)), rate=0.5)  # the reference's 2/n
  np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  same, _ = S.sparsegpt(jnp.asarray(w), jnp.asarray(h), rate=0.0)
  np.testing.assert_array_equal(np.asarray(same), w)


def test_sparsegpt_reduces_the_layer_output_error_versus_wanda_mask():
  """The OBS update is what SparseGPT adds: with the same mask, ||(W - W')X|| is smaller."""
  rng = np.random.default_rng(6)
  # correlated inputs (rank 8 plus noise): what pruned columns carry, others can carry
  x = rng.standard_normal((256, 8)) @ rng.standard_normal((8, 32))
  x += 0.1 * rng.standard_normal((256, 32))
  w = rng.standard_normal((8, 32)).astype(np.float32)
  h = (x.T @ x).astype(np.float32)
  pruned, _ = S.sparsegpt(jnp.asarray(w), jnp.asarray(h), rate=0.5)
  pruned = np.asarray(pruned)
  masked = np.where(pruned == 0, 0, w)
  assert np.linalg.norm(x @ (w - pruned).T) < 0.5 * np.linalg.norm(x @ (w - masked).T)


def test_block_threshold_equals_sorting():
  """The counting search that replaces the reference's torch.sort(...)[k]: ties, zeros, inf."""
  rng = np.random.default_rng(7)
  score = jnp.asarray(rng.random((16, 40)) ** 2, jnp.float32)
  score = score.at[3, :5].set(jnp.inf).at[0, :7].set(0.25).at[1, :3].set(0.0)
  sorted_at = jax.jit(S._sorted_at)  # k traced, as in the block loop
  for k in (0, 1, 2, 5, 9, 100, 320, 634):
    assert float(sorted_at(score, k)) == float(jnp.sort(score.ravel())[k]), k


def test_damp_schedule():
  assert S.damp_schedule(0.01) == pytest.approx((0.01, 0.1, 1.0))
  assert S.damp_schedule(0.0) == pytest.approx((0.0, 0.01, 0.1, 1.0))
  assert S.damp_schedule(2.0) == (2.0,)


def test_sparsegpt_retries_dampening_then_fails_cleanly():
  w = jnp.ones((2, 2), jnp.float32)
  # indefinite: eigenvalues -2 and 4; H + d*I is PD only for d > 2 (mean diag is 1)
  bad = jnp.asarray([[1.0, 3.0], [3.0, 1.0]])
  _, damp = S.sparsegpt(w, bad, rate=0.5)
  assert np.isnan(float(damp))
  # eigenvalues -0.05 and 2.05: fails at d = 0.01, works at 0.1
  h = jnp.asarray([[1.0, 1.05], [1.05, 1.0]])
  _, damp = S.sparsegpt(w, h, rate=0.5)
  assert float(damp) == pytest.approx(0.1)
  stats = types.SimpleNamespace(hessian=bad, sq_norms=jnp.ones(2))
  with pytest.raises(DtmError, match=r"Hessian of L01\.up is not positive definite even after "
                                     r"dampening \(tried .* d = 0\.01, 0\.1, 1, each"):
    C.compress_calibrated(w, C.parse_method("sparsegpt(0.5)"), stats, Component(1, "up"))
  stats = types.SimpleNamespace(hessian=jnp.full((2, 2), jnp.nan), sq_norms=jnp.ones(2))
  with pytest.raises(DtmError, match="not positive definite"):
    C.compress_calibrated(w, C.parse_method("sparsegpt(0.5)"), stats, Component(1, "up"))


# ------------------------------------------------------------------------ grammar and errors


@pytest.mark.parametrize("text, canonical", [
    ("wanda(0.5)", "wanda(rate=0.5)"), ("wanda(rate=0.5)", "wanda(rate=0.5)"),
    ("wanda(2,4)", "wanda(n=2,m=4)"), ("wanda(n=2, m=4)", "wanda(n=2,m=4)"),
    ("sparsegpt(0.5)", "sparsegpt(rate=0.5,percdamp=0.01,blocksize=128)"),
    ("sparsegpt(2,4,percdamp=0.1)", "sparsegpt(n=2,m=4,percdamp=0.1,blocksize=128)"),
])
def test_grammar_round_trip(text, canonical):
  method = C.parse_method(text)
  assert method.to_string() == canonical and C.parse_method(canonical) == method
  assert C.Method(method.name, method.kwargs) == method


@pytest.mark.parametrize("text, match", [
    ("q@*:wanda(1.0)", r"wanda sparsity rate must be in \[0, 1\), got 1.0"),
    ("q@*:sparsegpt(-0.1)", r"sparsegpt sparsity rate must be in \[0, 1\), got -0.1"),
    ("q@*:wanda()", "wanda takes either a sparsity rate or n and m"),
    ("q@*:wanda(0.5,n=2)", "wanda takes either a sparsity rate or n and m"),
    ("q@*:sparsegpt(m=4)", "sparsegpt takes either a sparsity rate or n and m"),
    ("q@*:wanda(5,4)", "n must be <= m"),
    ("q@*:wanda(1,2,3)", "too many arguments; signature is wanda"),
    ("q@*:sparsegpt(0.5,percdamp=-1)", "percdamp"),
    ("q@*:sparsegpt(0.5,blocksize=0)", "blocksize must be >= 1"),
])
def test_grammar_errors(text, match):
  with pytest.raises(DtmError, match=match):
    C.parse_spec(text)


def test_nm_not_dividing_input_dim_names_the_component():
  shapes = {"q": (64, 32), "down": (32, 96)}
  for method in ("wanda(2,5)", "sparsegpt(n=2,m=5)"):
    with pytest.raises(DtmError, match=r"m=5 does not divide the input dimension of L01\.down "
                                       r"\(HF weight \[out=32, in=96\]\)"):
      C.validate(f"down@1:{method}", 2, shapes)
  C.validate("down@1:wanda(2,4); q@0:sparsegpt(0.5)", 2, shapes)
