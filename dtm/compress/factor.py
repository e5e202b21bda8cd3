"""The inverse-Hessian factor of SparseGPT and GPTQ, computed with matmuls.

Both methods update weights with U, the upper triangular factor with U^T U = H_d^-1,
H_d = H + damp * mean(diag H) * I (the references: cholesky, cholesky_inverse,
cholesky(upper=True)). With J the reversal permutation, J H_d J = L L^T gives
H_d = R R^T with R = J L J upper, so H_d^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J: one
Cholesky factorization and one triangular inverse (the factor with a positive diagonal
is unique, so this is the references' U up to rounding).

L and L^-1 are built by halves, so that the work sits in matmuls instead of LAPACK's
potrf / trsm (which ran at ~2-5 GFLOP/s on a 2-core Xeon, 3-6x slower than this):

  chol([[A, B^T], [B, C]]) = [[L11, 0], [L21, L22]],  L11 = chol(A),  L21 = B L11^-T,
  L22 = chol(C - L21 L21^T);   L^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]],

down to blocks of at most LEAF rows (LAPACK there). Everything is float32 with
HIGHEST-precision matmuls. A matrix that is not positive definite gives NaN in some
leaf's factor, which spreads to L^-1 (the retry loop below tests finiteness).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

LEAF = 192
_HI = lax.Precision.HIGHEST


def cholesky_and_inverse(a_NN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(L, L^-1) for a symmetric positive definite f32 a [n, n], L lower with L L^T = a
  (recursive halves, module docstring). n is static; the recursion is unrolled."""
  n = a_NN.shape[0]
  if n <= LEAF:
    low = jnp.linalg.cholesky(a_NN)
    eye = jnp.eye(n, dtype=a_NN.dtype)
    return low, jnp.tril(jax.scipy.linalg.solve_triangular(low, eye, lower=True))
  n1 = min(-(-(n // 2) // 64) * 64, n - 1)  # a multiple of 64 near n / 2
  l11, i11 = cholesky_and_inverse(a_NN[:n1, :n1])
  l21 = jnp.dot(a_NN[n1:, :n1], i11.T, precision=_HI)
  l22, i22 = cholesky_and_inverse(a_NN[n1:, n1:] - jnp.dot(l21, l21.T, precision=_HI))
  i21 = -jnp.dot(i22, jnp.dot(l21, i11, precision=_HI), precision=_HI)
  zeros = jnp.zeros((n1, n - n1), a_NN.dtype)
  return jnp.block([[l11, zeros], [l21, l22]]), jnp.block([[i11, zeros], [i21, i22]])


def upper_inverse_factor(h_NN: jax.Array) -> jax.Array:
  """U upper triangular f32 [n, n] with U^T U = h^-1 (h symmetric positive definite):
  J inv(chol(J h J)) J. Not finite if h is not positive definite."""
  _, inv_low = cholesky_and_inverse(h_NN[::-1, ::-1])
  return jnp.triu(inv_low[::-1, ::-1])


def inverse_hessian_factor(h_NN: jax.Array, damps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(U, damp): U = `upper_inverse_factor(h + damp * mean(diag h) * I)` for the first
  relative dampening of `damps` (f32 [tries], traced) whose factor is finite with a
  positive diagonal; (a non-finite U, NaN) if none is. One factorization per try, in a
  while loop (usually one trip)."""
  n = h_NN.shape[0]
  eye = jnp.eye(n, dtype=jnp.float32)
  h = h_NN.astype(jnp.float32)
  mean_diag = jnp.mean(jnp.diagonal(h))

  def body(state):
    k = state[0] + 1
    u = upper_inverse_factor(h + damps[k] * mean_diag * eye)
    return k, u, jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diagonal(u) > 0)

  k, u, ok = lax.while_loop(lambda s: ~s[2] & (s[0] < damps.shape[0] - 1), body,
                            (jnp.int32(-1), jnp.zeros_like(h), jnp.bool_(False)))
  return u, jnp.where(ok, damps[jnp.maximum(k, 0)], jnp.nan)
