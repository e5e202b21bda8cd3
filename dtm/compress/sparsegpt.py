"""SparseGPT: one-shot pruning with OBS weight updates (Frantar & Alistarh 2023,
arXiv 2301.00774), following IST-DASLab/sparsegpt `SparseGPT.fasterprune`.

A pure function of an HF-layout weight w_OI [out, in] and the Hessian of its input,
H = sum_t x_t x_t^T [in, in] (`InputStats.hessian` from `dtm.compress.calibration`).
The reference accumulates 2/nsamples * sum_t x_t x_t^T (nsamples = calibration
sequences); any positive factor on H leaves the result unchanged up to rounding: the
dampening is relative (percdamp * mean diag H), the scores w^2 / d^2 scale by the
factor uniformly, and the updates use ratios of entries of U = chol(H^-1).

Steps (all float32, as the reference):
  1. dead inputs (H_jj == 0): H_jj = 1 and W[:, j] = 0.
  2. H += percdamp * mean(diag H) * I; U = upper Cholesky factor of H^-1 (the
     reference: cholesky, cholesky_inverse, cholesky(upper=True); here one
     factorization and a triangular inverse, `dtm.compress.factor`).
  3. columns in blocks of `blocksize` (for n:m rounded up to a multiple of m, so N:M
     groups never straddle blocks; the same blocks as the reference when m divides it).
     Unstructured: at the start of a block, with the block's weights as updated by the
     earlier blocks, score = W_ij^2 / U_jj^2 over the whole block [out, count]; the
     mask is score <= the value at position k = num_pruned(rate, out * count) of the
     sorted scores, exactly the reference's `tmp <= sort(tmp.flatten())[k]`: so k + 1
     weights per block (more on exact ties; no tie-breaking is needed). rate == 0
     prunes nothing (the reference would still prune each block's minimum).
     n:m: at every m-th column of a block, from the current (updated) weights, the m - n
     lowest scores of each row's group of m are pruned (n are kept: dtm's convention;
     the reference's prunen is the number pruned); ties -> lower index pruned first.
  4. column by column: q = w with the masked entries zeroed, err = (w - q) / U_ii,
     W[:, i:] -= err U[i, i:] inside the block; after the block the lazy batch update
     W[:, later] -= Err U[block, later]. (Computed on the kernel layout W^T, where a
     column is a contiguous row, `obs_prune_kernel`.)

Failure: if a Cholesky factor is not finite (H not positive definite after dampening:
NaN/inf activations, or a matrix that is not a Gram matrix), the relative dampening is
retried x10 while it stays <= MAX_DAMP (percdamp 0 retries from 0.01). `sparsegpt`
returns the dampening used, NaN if every try failed; the caller raises (see
`dtm.compress.apply.compress_calibrated`), since a jitted function cannot.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from dtm.compress import factor
from dtm.compress.elementwise import magnitude_cut, nm_rank, num_pruned

PERCDAMP = 0.01    # the reference's default relative dampening
BLOCKSIZE = 128    # the reference's default block of columns
MAX_DAMP = 1.0     # largest relative dampening tried after a failed factorization
_HI = lax.Precision.HIGHEST


def damp_schedule(percdamp: float) -> tuple[float, ...]:
  """Relative dampenings tried in order: percdamp, then x10 while <= MAX_DAMP."""
  damps, d = [percdamp], (percdamp if percdamp > 0 else 0.001)
  while d * 10 <= MAX_DAMP * (1 + 1e-9):
    d *= 10
    damps.append(d)
  return tuple(damps)


def prepare_hessian(w_OI: jax.Array, hessian_II: jax.Array):
  """Dead-input handling: (W with dead columns zeroed f32, H with H_jj = 1 there f32)."""
  h = hessian_II.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[None, :], 0.0, w_OI.astype(jnp.float32))
  return w, h


def inverse_hessian_factor(h_II: jax.Array, percdamp: float) -> tuple[jax.Array, jax.Array]:
  """(U f32 [in, in] upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1,
  damp used); damp is NaN (and U not finite) if no dampening of `damp_schedule` works.
  One factorization per try (`dtm.compress.factor`: the reference's three LAPACK steps
  give the same U up to rounding, at several times the cost on CPU)."""
  return factor.inverse_hessian_factor(h_II, jnp.asarray(damp_schedule(percdamp), jnp.float32))


def _block_width(in_dim: int, blocksize: int, m: int | None) -> int:
  bs = blocksize if m is None else -(-blocksize // m) * m
  return min(bs, in_dim)


def _sorted_at(score: jax.Array, k) -> jax.Array:
  """sort(score.ravel())[k] for non-negative f32 scores (+inf allowed), k traced: the
  value of the (k+1)-th smallest, found by `magnitude_cut`'s counting binary search
  over the float bit patterns (far cheaper than sorting on CPU)."""
  index = jnp.arange(score.size, dtype=jnp.int32).reshape(score.shape)
  bits, _ = magnitude_cut(score, index, k + 1)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _nm_group_pruned(score_Om: jax.Array, n: int, m: int) -> jax.Array:
  return nm_rank(score_Om, m) < m - n


def block_counts(rate: float, out_dim: int, in_dim: int, blocksize: int) -> tuple[int, int]:
  """(k of a full block, k of the last block): the scores at or below the k-th smallest
  of each block of `blocksize` columns are pruned (unstructured; rate > 0)."""
  bs = _block_width(in_dim, blocksize, None)
  last_count = in_dim - (math.ceil(in_dim / bs) - 1) * bs
  return num_pruned(rate, out_dim * bs), num_pruned(rate, out_dim * last_count)


def obs_prune(w_OI: jax.Array, u_II: jax.Array, rate: float | None, n: int | None,
              m: int | None, blocksize: int, ks: tuple[jax.Array, jax.Array] | None = None
              ) -> jax.Array:
  """Steps 3-4 of the module doc on f32 W [out, in] (dead columns already zeroed) and
  U [in, in]; returns the pruned, updated f32 W. ks: (k_full, k_last) int32 scalars that
  may be traced, replacing `rate` (unstructured; `block_counts(rate, ...)`), so one
  compiled solve serves every rate (`sparsegpt_levels`). Runs `obs_prune_kernel`."""
  out_dim, in_dim = w_OI.shape
  if ks is not None:
    ks_S2 = jnp.stack([jnp.asarray(ks[0], jnp.int32), jnp.asarray(ks[1], jnp.int32)])[None]
  elif rate:
    ks_S2 = jnp.asarray([block_counts(rate, out_dim, in_dim, blocksize)], jnp.int32)
  else:
    ks_S2 = None
  return obs_prune_kernel(w_OI.T, u_II, (out_dim,), ks_S2, n, m, blocksize).T


def obs_prune_kernel(k_IO: jax.Array, u_II: jax.Array, segments: tuple[int, ...],
                     ks_S2: jax.Array | None, n: int | None, m: int | None,
                     blocksize: int) -> jax.Array:
  """Steps 3-4 on the kernel layout K = W^T f32 [in, out] (input column j of W is row j
  of K, contiguous; dead inputs already zeroed) -> the pruned, updated K.

  The output columns are `segments` (static widths summing to out): matrices that
  share this input and H (q, k, v; gate, up) side by side. Every OBS step is per output
  row of W, so the segments do not interact, except for the unstructured block
  threshold, which is taken per segment with its own (k_full, k_last) = ks_S2[s]
  (int32 [S, 2], may be traced; `block_counts`). ks_S2 None: n:m (n, m given) or no
  pruning. Equal to one call per segment (tested)."""
  in_dim, out_dim = k_IO.shape
  bs = _block_width(in_dim, blocksize, m)
  num_blocks = math.ceil(in_dim / bs)
  padded = num_blocks * bs
  pad = padded - in_dim
  # Padding inputs: K = 0, U = identity there; they neither change nor are changed by
  # the real inputs (U is block-diagonal across the pad) and never enter a mask.
  k = jnp.pad(k_IO, ((0, pad), (0, 0)))
  u = jnp.pad(u_II, ((0, pad), (0, pad))) + jnp.diag(
      (jnp.arange(padded) >= in_dim).astype(jnp.float32))
  starts = [sum(segments[:i]) for i in range(len(segments))]

  def block(b, k):
    i1 = b * bs
    k1 = lax.dynamic_slice_in_dim(k, i1, bs, axis=0)              # [bs, out]
    u1 = lax.dynamic_slice(u, (i1, i1), (bs, bs))                 # [bs, bs]
    d1 = jnp.diagonal(u1)
    if ks_S2 is not None:
      valid = i1 + jnp.arange(bs) < in_dim
      score = jnp.where(valid[:, None], k1 * k1 / (d1 * d1)[:, None], jnp.inf)
      masks = []
      for seg, (start, width) in enumerate(zip(starts, segments)):
        sc = score[:, start:start + width]
        kk = jnp.where(b == num_blocks - 1, ks_S2[seg, 1], ks_S2[seg, 0])
        masks.append(sc <= _sorted_at(sc, kk))
      mask1 = masks[0] if len(masks) == 1 else jnp.concatenate(masks, axis=1)
    else:
      mask1 = jnp.zeros((bs, out_dim), bool)

    def column(i, carry):
      k1, q1, err1, mask1 = carry
      if n is not None:
        def select(mask1):
          group = lax.dynamic_slice_in_dim(k1, i, m, axis=0)      # [m, out]
          dg = lax.dynamic_slice_in_dim(d1, i, m)
          pruned = _nm_group_pruned((group * group / (dg * dg)[:, None]).T, n, m)
          return lax.dynamic_update_slice_in_dim(mask1, pruned.T, i, axis=0)
        mask1 = lax.cond(i % m == 0, select, lambda x: x, mask1)
      wi = k1[i]                                                   # input i's weights [out]
      q = jnp.where(mask1[i], 0.0, wi)
      err = (wi - q) / u1[i, i]
      # U is upper triangular: U[i, :i] == 0, so this only changes inputs >= i.
      k1 = k1 - u1[i][:, None] * err[None, :]
      return k1, q1.at[i].set(q), err1.at[i].set(err), mask1

    zeros = jnp.zeros((bs, out_dim), jnp.float32)
    _, q1, err1, _ = lax.fori_loop(0, bs, column, (k1, zeros, zeros, mask1))
    rows = lax.dynamic_slice_in_dim(u, i1, bs, axis=0)             # [bs, padded]
    later = jnp.arange(padded) >= i1 + bs
    k = jnp.where(later[:, None], k - jnp.dot(rows.T, err1, precision=_HI), k)
    return lax.dynamic_update_slice_in_dim(k, q1, i1, axis=0)

  k = lax.fori_loop(0, num_blocks, block, k)
  return k[:in_dim]


@functools.partial(jax.jit, static_argnames=("rate", "n", "m", "percdamp", "blocksize"))
def sparsegpt(w_OI: jax.Array, hessian_II: jax.Array, rate: float | None = None,
              n: int | None = None, m: int | None = None, percdamp: float = PERCDAMP,
              blocksize: int = BLOCKSIZE) -> tuple[jax.Array, jax.Array]:
  """SparseGPT -> (pruned, OBS-updated weight like w_OI [out, in], f32 [] relative
  dampening used, NaN if H could not be factorized: then the weight is not finite).

  hessian_II: f32 [in, in], sum_t x_t x_t^T of the layer input (any positive scale).
  Give either `rate` (0 <= rate < 1, per block as the reference) or `n` and `m` (keep
  n of every m consecutive inputs; in % m == 0).
  """
  w, h = prepare_hessian(w_OI, hessian_II)
  u, damp = inverse_hessian_factor(h, percdamp)
  w = obs_prune(w, u, rate, n, m, blocksize)
  return w.astype(w_OI.dtype), damp


@functools.partial(jax.jit, static_argnames=("percdamp", "blocksize"))
def _levels(w_OI, hessian_II, k_full_K, k_last_K, percdamp: float, blocksize: int):
  w, h = prepare_hessian(w_OI, hessian_II)
  u, damp = inverse_hessian_factor(h, percdamp)
  # lax.map, not vmap: K column loops side by side move K times the block through the
  # cache at every column and ran 2x slower than one after another (measured on CPU)
  prune = lambda ks: obs_prune(w, u, None, None, None, blocksize, ks=ks)
  return lax.map(prune, (k_full_K, k_last_K)).astype(w_OI.dtype), damp


def sparsegpt_levels(w_OI: jax.Array, hessian_II: jax.Array, rates: tuple[float, ...],
                     percdamp: float = PERCDAMP, blocksize: int = BLOCKSIZE
                     ) -> tuple[jax.Array, jax.Array]:
  """`sparsegpt(w_OI, hessian_II, rate=r)` for every r of `rates` (each in (0, 1)) ->
  (pruned weights [K, out, in], damp f32 []): one Hessian factorization, then the K
  column loops in one compiled call (one compile per weight shape and K: the rates
  enter as traced block counts). Equal to the per-rate calls (tested)."""
  out_dim, in_dim = w_OI.shape
  if not rates or any(not 0 < r < 1 for r in rates):
    raise ValueError(f"sparsegpt_levels takes rates in (0, 1), got {rates}")
  ks = [block_counts(r, out_dim, in_dim, blocksize) for r in rates]
  return _levels(w_OI, hessian_II, jnp.asarray([k[0] for k in ks], jnp.int32),
                 jnp.asarray([k[1] for k in ks], jnp.int32), percdamp, blocksize)
