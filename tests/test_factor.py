"""dtm.compress.factor: the inverse-Hessian factor U (U^T U = H_d^-1) by recursive halves
against float64 NumPy, across the LAPACK leaf size, and its dampening retries."""
import jax.numpy as jnp
import numpy as np
import pytest

from dtm.compress import factor


def _spd(rng, n, uneven=True):
  x = rng.standard_normal((2 * n, n))
  if uneven:
    x[:, 1] *= 30  # uneven scales, as real activations
  return (x.T @ x).astype(np.float32)


@pytest.mark.parametrize("n", [7, factor.LEAF + 1, 450])
def test_cholesky_and_inverse_equal_float64(n):
  a = _spd(np.random.default_rng(n), n)
  low, inv_low = (np.asarray(x, np.float64) for x in factor.cholesky_and_inverse(jnp.asarray(a)))
  want = np.linalg.cholesky(a.astype(np.float64))
  np.testing.assert_allclose(low, want, rtol=0, atol=2e-5 * np.abs(want).max())
  want_inv = np.linalg.inv(want)
  np.testing.assert_allclose(inv_low, want_inv, rtol=0, atol=2e-5 * np.abs(want_inv).max())
  assert np.all(np.triu(low, 1) == 0) and np.all(np.triu(inv_low, 1) == 0)


def test_upper_inverse_factor_is_the_references_factor():
  h = _spd(np.random.default_rng(1), 300)
  h = h + 0.01 * np.mean(np.diag(h)) * np.eye(300, dtype=np.float32)
  u = np.asarray(factor.upper_inverse_factor(jnp.asarray(h)), np.float64)
  # the reference: cholesky(cholesky_inverse(cholesky(H)), upper=True)
  want = np.linalg.cholesky(np.linalg.inv(h.astype(np.float64))).T
  np.testing.assert_allclose(u, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_dampening_retries_and_failure():
  rng = np.random.default_rng(2)
  h = _spd(rng, 250, uneven=False).astype(np.float64)
  evals, evecs = np.linalg.eigh(h)
  m = np.mean(np.diag(h))
  v = evecs[:, -1]
  bad = (h - (evals[-1] + 0.05 * m) * np.outer(v, v)).astype(np.float32)  # needs damp 0.1
  damps = jnp.asarray([0.01, 0.1, 1.0], jnp.float32)
  u, damp = factor.inverse_hessian_factor(jnp.asarray(bad), damps)
  assert float(damp) == pytest.approx(0.1) and np.all(np.isfinite(np.asarray(u)))
  worse = (h - (evals[-1] + 5 * m) * np.outer(v, v)).astype(np.float32)
  _, damp = factor.inverse_hessian_factor(jnp.asarray(worse), damps)
  assert np.isnan(float(damp))
