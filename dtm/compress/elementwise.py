"""The uncalibrated per-matrix methods: magnitude, N:M, AbsMax, RTN (and identity).

Layout convention: every per-matrix function takes and returns an HF-layout weight
`w_OI` of shape [out, in] (the transpose of a Flax kernel [in, out]); all orders and
groups are defined on that layout in row-major order: N:M groups and AbsMax groups are
runs of consecutive *input* columns of one output row, and magnitude ties are broken
by the lower flat index `o * in + i`. `apply_spec` does the Flax <-> HF transposes.

All take an HF-layout weight w_OI [out, in] and return (w'_OI same shape/dtype, stats),
stats = {'sparsity': f32 [] fraction of exactly-zero entries of w', 'bits': i32 [] bits per
stored weight: b for absmax and rtn, the dtype's width otherwise}; the rank and mask helpers
(prune_rank, magnitude_cut, nm_rank, ...) are shared with the probes and the calibrated
methods (dtm.compress.wanda, dtm.compress.sparsegpt).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dtm.compress import gptq as gptq_lib


def _stats(w_OI: jax.Array, bits: int) -> dict[str, jax.Array]:
  return {"sparsity": jnp.mean(w_OI == 0, dtype=jnp.float32), "bits": jnp.asarray(bits, jnp.int32)}


def _dtype_bits(dtype) -> int:
  return jnp.finfo(dtype).bits


def num_pruned(rate: float, numel: int) -> int:
  """k = floor(rate * numel), the number of weights magnitude pruning zeroes. A 1e-12
  relative tolerance absorbs binary rounding of decimal rates (0.29 * 100 -> 29, not 28)."""
  return math.floor(rate * numel * (1 + 1e-12))


def prune_rank(w_OI: jax.Array) -> jax.Array:
  """int32 [out, in]: rank of each weight in ascending (|w|, flat HF index o*in+i) order.

  rank 0 is pruned first: magnitude pruning at k keeps exactly `rank >= k`, so a probe
  at any rate r can build its mask from one rank array without re-sorting. Pre-existing
  zeros have the smallest |w| and therefore the lowest ranks.
  """
  order = jnp.argsort(jnp.abs(w_OI).reshape(-1), stable=True)
  rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  return rank.reshape(w_OI.shape)


def prune_rank_kernel(kernel_IO: jax.Array) -> jax.Array:
  """prune_rank of a Flax kernel [in, out] (ranks in HF order), returned as [in, out]."""
  return prune_rank(kernel_IO.T).T


def prune_lowest(w_OI: jax.Array, k) -> jax.Array:
  """Zero the k weights of lowest prune_rank; k may be traced."""
  return jnp.where(magnitude_pruned(jnp.abs(w_OI), _flat_index(w_OI.shape), k),
                   jnp.zeros_like(w_OI), w_OI)


def _flat_index(shape_OI) -> jax.Array:
  out_dim, in_dim = shape_OI
  return jnp.arange(out_dim * in_dim, dtype=jnp.int32).reshape(out_dim, in_dim)


def magnitude_cut(abs_w: jax.Array, flat_index: jax.Array, k) -> tuple[jax.Array, jax.Array]:
  """The k-th smallest weight in (|w|, HF flat index) order, found without sorting.

  abs_w: |w| (any layout, float); flat_index: int32, same shape, each weight's HF
  row-major index o*in+i; k: int (may be traced), 1 <= k <= numel. Returns
  (v_bits, last) such that the first k weights in that order are exactly those with
  bits(|w|) < v_bits, or bits(|w|) == v_bits and flat_index <= last. Non-negative
  floats order like their int32 bit patterns, so two binary searches of counting
  passes (31 over values; over indices only when just some of the ties at the k-th
  value are pruned) replace an O(n log n) sort that is slow on CPU; the result equals
  `prune_rank(w) < k` exactly.
  """
  bits = jax.lax.bitcast_convert_type(abs_w.astype(jnp.float32), jnp.int32)
  k = jnp.asarray(k, jnp.int32)

  def search(count_ge, lo, hi):
    # smallest t in [lo, hi] with count_ge(t) true (non-decreasing in t); a while loop,
    # so an empty range (lo == hi) costs no pass
    def body(lohi):
      lo, hi = lohi
      mid = lo + (hi - lo) // 2
      ok = count_ge(mid)
      return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
    return jax.lax.while_loop(lambda lohi: lohi[0] < lohi[1], body,
                              (jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)))[0]

  v = search(lambda t: jnp.sum(bits <= t, dtype=jnp.int32) >= k, 0, 0x7F800000)
  ties = bits == v
  need = k - jnp.sum(bits < v, dtype=jnp.int32)  # how many ties at v are pruned
  # Usually every tie at v is pruned (often there is just one): then no index search.
  all_ties = need >= jnp.sum(ties, dtype=jnp.int32)
  top = jnp.max(flat_index)
  last = search(lambda j: jnp.sum(ties & (flat_index <= j), dtype=jnp.int32) >= need,
                jnp.where(all_ties, top, 0), top)
  return v, last


def magnitude_pruned(abs_w: jax.Array, flat_index: jax.Array, k) -> jax.Array:
  """bool mask of the k weights magnitude pruning zeroes (see `magnitude_cut`); k traced ok."""
  v, last = magnitude_cut(abs_w, flat_index, jnp.maximum(k, 1))
  bits = jax.lax.bitcast_convert_type(abs_w.astype(jnp.float32), jnp.int32)
  return ((bits < v) | ((bits == v) & (flat_index <= last))) & (k > 0)


@functools.partial(jax.jit, static_argnames=("rate",))
def magnitude(w_OI: jax.Array, rate: float):
  """Unstructured magnitude pruning: zero exactly k = num_pruned(rate, numel) weights,
  the smallest |w|, ties -> lower HF flat index pruned first. Pre-existing zeros count
  among the k (they are pruned first), so achieved sparsity = max(k, #zeros) / numel."""
  w = prune_lowest(w_OI, num_pruned(rate, w_OI.size))
  return w, _stats(w, _dtype_bits(w.dtype))


@functools.partial(jax.jit, static_argnames=("n", "m"))
def nm(w_OI: jax.Array, n: int, m: int):
  """N:M pruning: in each group of m consecutive input weights of every output row keep
  the n largest |w|, zero the other m - n (ties -> lower index pruned first). in % m == 0."""
  keep = nm_rank(w_OI, m) >= m - n
  w = jnp.where(keep, w_OI, jnp.zeros_like(w_OI))
  return w, _stats(w, _dtype_bits(w.dtype))


def nm_rank(w_OI: jax.Array, m: int) -> jax.Array:
  """int32 [out, in]: rank of each weight inside its group of m consecutive input weights,
  ascending (|w|, index) order: rank_i = #{j : |w_j| < |w_i| or (|w_j| == |w_i| and j < i)}.
  N:M keeps `rank >= m - n`. Pairwise counting (m^2 work, fused), far faster than sorting."""
  out_dim, in_dim = w_OI.shape
  a_OGm = jnp.abs(w_OI).reshape(out_dim, in_dim // m, m)
  a_i, a_j = a_OGm[..., :, None], a_OGm[..., None, :]
  j_before_i = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [i, j]
  rank = jnp.sum((a_j < a_i) | ((a_j == a_i) & j_before_i), axis=-1, dtype=jnp.int32)
  return rank.reshape(out_dim, in_dim)


def _group_width(in_dim: int, granularity: str, group_size: int | None) -> int:
  return group_size if granularity == "group" else in_dim


def absmax_scale(w_OI: jax.Array, bits: int, granularity: str = "channel",
                 group_size: int | None = None) -> jax.Array:
  """f32 AbsMax scale = max|w| / (2^(bits-1) - 1) over each quantization group.

  Shape broadcasts against w reshaped to [out, in // g, g] (g = in unless 'group'):
  tensor [1, 1, 1], channel [out, 1, 1], group [out, in // group_size, 1].
  """
  return _absmax_scale(w_OI, jnp.float32(2 ** (bits - 1) - 1), granularity, group_size)


def _absmax_scale(w_OI: jax.Array, qmax, granularity: str, group_size: int | None) -> jax.Array:
  out_dim, in_dim = w_OI.shape
  g = _group_width(in_dim, granularity, group_size)
  absw_OGg = jnp.abs(w_OI.astype(jnp.float32)).reshape(out_dim, in_dim // g, g)
  axes = (0, 1, 2) if granularity == "tensor" else (2,)
  amax = jnp.max(absw_OGg, axis=axes, keepdims=True)
  # XLA rewrites x / broadcast(s) as x * (1/s), which is not IEEE division and moves
  # some weights to the neighbouring grid point; materialising the divisors behind an
  # optimization barrier keeps the divisions exact (as numpy / torch compute them).
  # The divisor is made a function of amax so that under vmap it is batched like amax
  # (an unbatched one is broadcast after the barrier and XLA turns the division into a
  # reciprocal multiply again: one ulp off on ~40 % of the scales inside apply_spec).
  qmax_full = jnp.full(amax.shape, qmax, jnp.float32)
  return amax / jax.lax.optimization_barrier(jnp.where(amax == amax, qmax_full, qmax_full))


@functools.partial(jax.jit, static_argnames=("bits", "granularity", "group_size"))
def absmax(w_OI: jax.Array, bits: int, granularity: str = "channel", group_size: int | None = None):
  """Symmetric weight-only AbsMax fake quantization to `bits` bits:
  q = clip(round_half_even(w / scale), ±(2^(bits-1) - 1)), w' = q * scale (computed in f32,
  cast back to w's dtype); an all-zero group (scale 0) stays zero."""
  w = absmax_values(w_OI, jnp.float32(2 ** (bits - 1) - 1), granularity, group_size)
  return w, _stats(w, bits)


def absmax_values(w_OI: jax.Array, qmax, granularity: str = "channel",
                  group_size: int | None = None) -> jax.Array:
  """The AbsMax fake-quantized weight for a (possibly traced) f32 qmax = 2^(bits-1) - 1;
  shared by `absmax` and the vmapped probes so both give bit-identical weights."""
  out_dim, in_dim = w_OI.shape
  g = _group_width(in_dim, granularity, group_size)
  scale = _absmax_scale(w_OI, qmax, granularity, group_size)
  w_OGg = w_OI.astype(jnp.float32).reshape(out_dim, in_dim // g, g)
  divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(scale == 0, 1.0, scale),
                                                          w_OGg.shape))
  q = jnp.clip(jnp.round(w_OGg / divisor), -qmax, qmax)
  return (q * scale).reshape(out_dim, in_dim).astype(w_OI.dtype)


@jax.jit
def identity(w_OI: jax.Array):
  return w_OI, _stats(w_OI, _dtype_bits(w_OI.dtype))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym"))
def rtn(w_OI: jax.Array, bits: int, group_size: int | None = None, sym: bool = False):
  """Round-to-nearest on GPTQ's min-max grid (`dtm.compress.gptq.rtn`: per output row, or
  per group of group_size consecutive inputs; asymmetric unless sym) -> (w', stats)."""
  w = gptq_lib.rtn(w_OI, bits, group_size, sym).w
  return w, _stats(w, bits)
