"""Wanda: pruning by weights and activations (Sun et al. 2023, arXiv 2306.11695).

A pure function of an HF-layout weight w_OI [out, in] and the squared norms of its
input features over the calibration tokens, s_j = sum_t x_tj^2 (`InputStats.sq_norms`
from `dtm.compress.calibration`). Follows locuslab/wanda `prune_wanda` (lib/prune.py):

  score_ij = |W_ij| * sqrt(s_j)                       (float32)
  unstructured (rate): in every output row i, the k = num_pruned(rate, in) lowest
      scores are zeroed (the reference sorts each row with a stable sort and prunes the
      first int(in * rate) indices: ties -> the lower input index is pruned first;
      `num_pruned` equals that int() except where in * rate is an integer up to binary
      rounding, e.g. 0.29 * 100, where it gives 29 and the reference 28).
  n:m: in every run of m consecutive inputs of a row the m - n lowest scores are
      zeroed, i.e. n are KEPT (dtm's `nm(n, m)` convention; the reference's
      `prune_n` is the number pruned, so its "2:4" is our n=2, m=4); ties -> the
      lower input index is pruned first (torch.topk leaves ties unspecified).

No weight is updated. The reference's scaler is s_j / nsamples (nsamples = number of
calibration sequences); a positive factor on s changes no comparison within a row, so
the raw sums are used. Pre-existing zeros and dead inputs (s_j = 0) score 0 and are
pruned first.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dtm.compress.elementwise import nm_rank, num_pruned


def wanda_score(w_OI: jax.Array, sq_norms_I: jax.Array) -> jax.Array:
  """f32 [out, in]: |W_ij| * sqrt(s_j) (the reference's W_metric)."""
  return jnp.abs(w_OI.astype(jnp.float32)) * jnp.sqrt(sq_norms_I.astype(jnp.float32))[None, :]


def wanda_pruned(w_OI: jax.Array, sq_norms_I: jax.Array, rate: float | None = None,
                 n: int | None = None, m: int | None = None) -> jax.Array:
  """bool [out, in]: the weights Wanda zeroes (rate, or n and m; see the module doc)."""
  score = wanda_score(w_OI, sq_norms_I)
  if rate is not None:
    return row_lowest(score, num_pruned(rate, w_OI.shape[1]))
  return nm_rank(score, m) < m - n


def row_lowest(score_OI: jax.Array, k: int) -> jax.Array:
  """bool [out, in]: in every row the k lowest scores (non-negative f32), ties -> lower
  index first: exactly the first k of a stable ascending sort of the row.

  Found without sorting (~10x faster on CPU): non-negative floats order like their
  int32 bit patterns, so a per-row binary search of 31 counting passes finds the k-th
  smallest value v; then all scores below v are pruned, and of the ties at v the first
  k - #{score < v} in index order.
  """
  if k == 0:
    return jnp.zeros(score_OI.shape, bool)
  bits = jax.lax.bitcast_convert_type(score_OI.astype(jnp.float32), jnp.int32)

  def halve(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(bits <= mid[:, None], axis=1, dtype=jnp.int32) >= k
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  rows = score_OI.shape[0]
  start = (jnp.zeros(rows, jnp.int32), jnp.full(rows, 0x7F800000, jnp.int32))  # [0, bits(inf)]
  v, _ = jax.lax.fori_loop(0, 31, halve, start)  # 2^31 > 0x7F800000: lo == hi afterwards
  below = bits < v[:, None]
  ties = bits == v[:, None]
  need = k - jnp.sum(below, axis=1, dtype=jnp.int32)
  ties_before = jnp.cumsum(ties, axis=1, dtype=jnp.int32) - ties
  return below | (ties & (ties_before < need[:, None]))


@functools.partial(jax.jit, static_argnames=("rate", "n", "m"))
def wanda(w_OI: jax.Array, sq_norms_I: jax.Array, rate: float | None = None,
          n: int | None = None, m: int | None = None) -> jax.Array:
  """Wanda-pruned weight, same shape and dtype as w_OI [out, in]; sq_norms_I f32 [in].

  Give either `rate` (unstructured per output row, 0 <= rate < 1) or `n` and `m`
  (keep n of every m consecutive inputs; in % m == 0).
  """
  pruned = wanda_pruned(w_OI, sq_norms_I, rate, n, m)
  return jnp.where(pruned, jnp.zeros_like(w_OI), w_OI)
