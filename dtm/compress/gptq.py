"""GPTQ (Frantar et al. 2023, arXiv 2210.17323) and round-to-nearest weight quantization.

Pure functions of an HF-layout weight w_OI [out, in] (and, for GPTQ, the layer-input
Hessian H [in, in]); they follow IST-DASLab/gptq (`GPTQ.fasterquant` in gptq.py and
`Quantizer` in quant.py). Both return a `QuantResult`.

Grid (the reference's min-max `Quantizer`, per output row, or per (row, group) of
`group_size` consecutive input columns), with maxq = 2^bits - 1:

  xmin = min(min x, 0), xmax = max(max x, 0)
  sym:  xmax = max(|xmin|, xmax); xmin = -xmax where xmin < 0
  xmin == xmax == 0 (an all-zero row/group): xmin, xmax = -1, +1
  scale = (xmax - xmin) / maxq
  zero  = 2^(bits-1) = (maxq + 1) / 2 if sym else round(-xmin / scale)
  code  = clip(round(w / scale) + zero, 0, maxq),   w' = scale * (code - zero)

`round` is round-half-to-even (as torch.round) and every division is an IEEE division.
As in the reference, a sym row/group with no negative entry keeps xmin = 0, so its grid
spans only [-2^(bits-1), 2^(bits-1) - 1] * xmax / maxq (about +-xmax / 2); we keep that
quirk for agreement with the reference.

GPTQ specifics (all as the reference, unless noted):
  * H is sum_t x_t x_t^T of the layer input (the reference accumulates 2/n sum_t x_t x_t^T);
    a positive factor on H leaves the result unchanged (bit for bit for a power of two,
    up to float32 rounding otherwise), because dampening is relative (damp * mean(diag H))
    and the updates use ratios of entries of chol(H^-1). The one exception, also in the
    reference: a dead input's H_jj = 1 is not scaled, and it enters mean(diag H) and the
    act order.
  * per-channel grids come from the original weights; dead inputs (H_jj == 0) get
    H_jj = 1 and W[:, j] = 0.
  * act_order: columns in descending diag(H) order (ties: lower index first; torch's
    argsort does not promise an order for ties).
  * groups: without static groups (the default unless act_order) a group's grid is
    computed when the loop reaches its first column, from the weights as updated by
    the lazy batch updates of the finished blocks (not by the earlier columns of the
    current block), exactly as the reference reads W[:, i:i+group_size]. With static
    groups (the default with act_order, the reference's static_groups=True) every
    group's grid is computed up front on the original column order (after dead-input
    zeroing), so groups stay runs of consecutive input columns under act_order.
  * U = upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (the reference's factor,
    from one Cholesky factorization and a triangular inverse instead of its three steps);
    columns are processed in blocks of block_size with the reference's lazy batch updates.
  * if a Cholesky factor is not finite, the dampening is retried x10 while it stays
    <= MAX_DAMP (from damp = 0 the first retry is 0.01); `damp` in the result is the
    relative dampening used. If every try fails, `gptq` raises DtmError (under an
    outer trace it cannot: then result.damp is NaN and the caller must check it).

Everything runs in float32. bits, sym, act_order, static_groups and the dampening are
traced: one compilation per (shapes, group_size, block_size).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dtm.compress import factor
from dtm.errors import DtmError

MIN_BITS, MAX_BITS = 2, 8
MAX_DAMP = 1.0  # largest relative dampening tried after a failed Cholesky factorization
_HI = lax.Precision.HIGHEST


class QuantResult(NamedTuple):
  """Output of `gptq` / `rtn` for a weight [out, in] with G groups per row.

  w:      [out, in] dequantized weights w' = scale[:, g_idx] * (codes - zero[:, g_idx]),
          in the input dtype
  codes:  int32 [out, in], in 0..2^bits - 1
  scale:  float32 [out, G], grid step
  zero:   int32 [out, G], the code of w' = 0
  g_idx:  int32 [in], the group of each input column (all 0 per channel)
  perm:   int32 [in], the order GPTQ processed the columns in (arange without act_order)
  damp:   float32 [], relative dampening used (0 for rtn; NaN when every Cholesky failed)
  """
  w: jax.Array
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  g_idx: jax.Array
  perm: jax.Array
  damp: jax.Array


class Grid(NamedTuple):
  """The integer form of one GPTQ-quantized weight [out, in] with G groups per row, kept
  (on the host) for an integer export: w' = scale[:, g_idx] * (codes - zero[:, g_idx]).

  codes: uint8 [out, in], in 0..2^bits - 1
  scale: float32 [out, G]
  zero:  int32 [out, G], the code of w' = 0 (2^(bits-1) everywhere when sym)
  g_idx: int32 [in], the group of each input column (input column j // group_size unless
         act_order ran with dynamic groups, static_groups=False)
  """
  codes: np.ndarray
  scale: np.ndarray
  zero: np.ndarray
  g_idx: np.ndarray


def grid_of(res: QuantResult) -> Grid:
  """`Grid` of a `QuantResult` as device arrays (codes narrowed to uint8); traceable."""
  return Grid(res.codes.astype(jnp.uint8), res.scale, res.zero, res.g_idx)


# ------------------------------------------------------------------------------------- grid


def _exact_div(a: jax.Array, b) -> jax.Array:
  """a / b with IEEE division. XLA rewrites division by a constant or a broadcast as a
  multiplication by the reciprocal; a full-shape divisor behind an optimization barrier
  keeps the division exact (as torch / numpy compute it). The divisor is selected by a
  predicate on `a`, so under vmap it is batched like `a` and no broadcast is inserted after
  the barrier (XLA would again turn that into a reciprocal multiplication)."""
  b = jnp.asarray(b, a.dtype)
  b = jnp.broadcast_to(b, jnp.broadcast_shapes(a.shape, b.shape))
  return a / lax.optimization_barrier(jnp.where(a == a, b, b))


def minmax_grid(x: jax.Array, bits, sym, axis: int = -1):
  """The reference `Quantizer.find_params` over `axis`: (scale, zero) float32 with that
  axis removed; zero holds integer values (module docstring). bits and sym may be traced."""
  maxq = _maxq(bits)
  x = x.astype(jnp.float32)
  xmin = jnp.minimum(jnp.min(x, axis=axis), 0.0)
  xmax = jnp.maximum(jnp.max(x, axis=axis), 0.0)
  xmax = jnp.where(sym, jnp.maximum(jnp.abs(xmin), xmax), xmax)
  xmin = jnp.where(sym & (xmin < 0), -xmax, xmin)
  flat = (xmin == 0) & (xmax == 0)
  xmin = jnp.where(flat, -1.0, xmin)
  xmax = jnp.where(flat, 1.0, xmax)
  scale = _exact_div(xmax - xmin, maxq)
  zero = jnp.where(sym, (maxq + 1) / 2, jnp.round(_exact_div(-xmin, scale)))
  return scale, zero


def quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, bits):
  """(code, w') on the grid (scale, zero), all float32 and broadcasting:
  code = clip(round(w / scale) + zero, 0, 2^bits - 1), w' = scale * (code - zero)."""
  code = jnp.clip(jnp.round(_exact_div(w, scale)) + zero, 0.0, _maxq(bits))
  return code, scale * (code - zero)


def _maxq(bits) -> jax.Array:
  """float32 2^bits - 1 (exact, by an integer shift)."""
  return (jnp.left_shift(jnp.int32(1), jnp.asarray(bits, jnp.int32)) - 1).astype(jnp.float32)


# ------------------------------------------------------------------------------- arguments


def _group_width(in_dim: int, group_size: int | None) -> int:
  return in_dim if group_size in (None, -1) else group_size


def _check_args(w_OI, bits: int, group_size: int | None, name: str) -> None:
  if getattr(w_OI, "ndim", None) != 2:
    raise DtmError(f"quantization of {name}: expected a 2-D HF weight [out, in], got shape "
                   f"{tuple(getattr(w_OI, 'shape', ()))}")
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise DtmError(f"quantization of {name}: bits must be an integer in {MIN_BITS}..{MAX_BITS}, "
                   f"got {bits!r}")
  in_dim = w_OI.shape[1]
  if group_size not in (None, -1):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
      raise DtmError(f"quantization of {name}: group_size must be a positive integer, or None / -1 "
                     f"for one grid per output channel, got {group_size!r}")
    if in_dim % group_size:
      raise DtmError(f"quantization of {name}: group_size {group_size} does not divide the input "
                     f"dimension (HF weight [out={w_OI.shape[0]}, in={in_dim}])")


def _damp_schedule(damp: float) -> tuple[float, ...]:
  """damp, then x10 (0 -> 0.01) while <= MAX_DAMP."""
  tries = [float(damp)]
  while True:
    nxt = 0.01 if tries[-1] == 0 else tries[-1] * 10
    if nxt > MAX_DAMP * (1 + 1e-9):
      return tuple(tries)
    tries.append(nxt)


# -------------------------------------------------------------------------------------- RTN


@functools.partial(jax.jit, static_argnames=("group_size",))
def _rtn(w_OI, bits, sym, *, group_size: int | None) -> QuantResult:
  out_dim, in_dim = w_OI.shape
  g = _group_width(in_dim, group_size)
  w_OGg = w_OI.astype(jnp.float32).reshape(out_dim, in_dim // g, g)
  scale_OG, zero_OG = minmax_grid(w_OGg, bits, sym)
  code, deq = quantize(w_OGg, scale_OG[..., None], zero_OG[..., None], bits)
  idx = jnp.arange(in_dim, dtype=jnp.int32)
  return QuantResult(deq.reshape(out_dim, in_dim).astype(w_OI.dtype),
                     code.reshape(out_dim, in_dim).astype(jnp.int32), scale_OG,
                     zero_OG.astype(jnp.int32), idx // g, idx, jnp.float32(0.0))


def rtn(w_OI: jax.Array, bits: int, group_size: int | None = None, sym: bool = False,
        name: str = "the weight") -> QuantResult:
  """Round-to-nearest on the min-max grid (module docstring) of every output row, or of
  every (row, group of group_size consecutive input columns): the GPTQ baseline."""
  _check_args(w_OI, bits, group_size, name)
  return _rtn(w_OI, jnp.int32(bits), jnp.bool_(sym),
              group_size=None if group_size == -1 else group_size)


# ------------------------------------------------------------------------------------- GPTQ


def _inverse_hessian_factor(H: jax.Array, damps: jax.Array):
  """(U, damp): U upper with U^T U = (H + damp * mean(diag H) * I)^-1, for the first damp of
  `damps` whose factor is finite; (non-finite U, NaN) if none is. U is the reference's
  cholesky(cholesky_inverse(cholesky(H)), upper=True), computed with one factorization
  and a triangular inverse in matmuls (`dtm.compress.factor`)."""
  return factor.inverse_hessian_factor(H, damps)


def _gptq_columns(Wt, U, scale_GO, zero_GO, gidx, bits, sym, dynamic, *, n: int,
                  group: int | None, block: int):
  """The GPTQ loop over the (permuted, padded) columns.

  Wt: [N, out] weights, one row per input column, N a multiple of `block`, rows >= n zero
  padding; U: [N, N] upper Cholesky factor of H^-1 (identity on the padding); scale_GO,
  zero_GO: [G, out] grids (recomputed at each group's first column when `dynamic`, a
  traced bool; group=None: one fixed grid); gidx: int32 [N] the group of each processed
  column. Returns (codes float32 [N, out], scale_GO, zero_GO).
  """
  N, out_dim = Wt.shape
  rows = jnp.arange(N)

  def block_step(b, carry):
    Wt, codes, scale_GO, zero_GO = carry
    i1 = b * block
    W1 = lax.dynamic_slice(Wt, (i1, 0), (block, out_dim))
    U1 = lax.dynamic_slice(U, (i1, i1), (block, block))

    def new_grid(k, grids):
      # the reference's find_params(W[:, k:k+group]): W as of the start of this block
      s, z = minmax_grid(lax.dynamic_slice(Wt, (k, 0), (group, out_dim)), bits, sym, axis=0)
      return grids[0].at[k // group].set(s), grids[1].at[k // group].set(z)

    def column_step(i, inner):
      W1, Err1, Q1, scale_GO, zero_GO = inner
      k = i1 + i
      if group is not None:
        scale_GO, zero_GO = lax.cond(dynamic & (k % group == 0) & (k < n),
                                     functools.partial(new_grid, k), lambda grids: grids,
                                     (scale_GO, zero_GO))
      w = W1[i]
      code, q = quantize(w, scale_GO[gidx[k]], zero_GO[gidx[k]], bits)
      err = (w - q) / U1[i, i]
      W1 = W1 - U1[i][:, None] * err[None, :]  # U1[i, :i] == 0: only columns >= i move
      return W1, Err1.at[i].set(err), Q1.at[i].set(code), scale_GO, zero_GO

    zeros_BO = jnp.zeros((block, out_dim), jnp.float32)
    _, Err1, Q1, scale_GO, zero_GO = lax.fori_loop(
        0, block, column_step, (W1, zeros_BO, zeros_BO, scale_GO, zero_GO))
    codes = lax.dynamic_update_slice(codes, Q1, (i1, 0))
    # lazy batch update of the later columns: W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    update = jnp.matmul(lax.dynamic_slice(U, (i1, 0), (block, N)).T, Err1, precision=_HI)
    Wt = Wt - jnp.where((rows >= i1 + block)[:, None], update, 0.0)
    return Wt, codes, scale_GO, zero_GO

  codes = jnp.zeros((N, out_dim), jnp.float32)
  _, codes, scale_GO, zero_GO = lax.fori_loop(0, N // block, block_step,
                                              (Wt, codes, scale_GO, zero_GO))
  return codes, scale_GO, zero_GO


@functools.partial(jax.jit, static_argnames=("group_size", "block_size"))
def _gptq(w_OI, H, bits, sym, act_order, static_groups, damps, *, group_size: int | None,
          block_size: int) -> QuantResult:
  """bits (int32), sym, act_order, static_groups (bool) and damps (float32 [tries]) are
  traced, so one compilation serves every level of a shape."""
  out_dim, n = w_OI.shape
  W = w_OI.astype(jnp.float32)
  H = H.astype(jnp.float32)
  g = _group_width(n, group_size)
  G = n // g
  dynamic = jnp.bool_(False) if group_size is None else ~static_groups
  idx = jnp.arange(n, dtype=jnp.int32)

  if group_size is None:  # per-channel grid from the original weights
    scale, zero = minmax_grid(W, bits, sym)
    scale_GO, zero_GO = scale[None], zero[None]
  diag = jnp.diag(H)
  dead = diag == 0
  H = H + jnp.diag(jnp.where(dead, 1.0, 0.0))
  W = jnp.where(dead[None, :], 0.0, W)
  if group_size is not None:  # static grids; dynamic ones are overwritten in the loop
    scale_OG, zero_OG = minmax_grid(W.reshape(out_dim, G, g), bits, sym)
    scale_GO, zero_GO = scale_OG.T, zero_OG.T

  perm = jnp.where(act_order, jnp.argsort(-jnp.diag(H), stable=True).astype(jnp.int32), idx)
  invperm = jnp.argsort(perm).astype(jnp.int32)
  W = W[:, perm]
  H = H[perm][:, perm]
  U, damp = _inverse_hessian_factor(H, damps)

  # gidx: group of the k-th processed column; g_idx: group of input column j
  gidx = jnp.where(dynamic, idx // g, perm // g)
  g_idx = jnp.where(dynamic, invperm // g, idx // g)

  block = min(block_size, n)
  N = -(-n // block) * block
  pad = N - n
  Wt = jnp.pad(W.T, ((0, pad), (0, 0)))
  U = jnp.pad(U, ((0, pad), (0, pad))) + jnp.diag(jnp.where(jnp.arange(N) >= n, 1.0, 0.0))
  gidx = jnp.pad(gidx, (0, pad), mode="edge")
  codes_NO, scale_GO, zero_GO = _gptq_columns(
      Wt, U, scale_GO, zero_GO, gidx, bits, sym, dynamic, n=n,
      group=None if group_size is None else g, block=block)
  codes = codes_NO[:n].T[:, invperm]
  scale, zero = scale_GO.T, zero_GO.T
  w = scale[:, g_idx] * (codes - zero[:, g_idx])
  return QuantResult(w.astype(w_OI.dtype), codes.astype(jnp.int32), scale, zero.astype(jnp.int32),
                     g_idx, perm, damp)


def gptq(w_OI: jax.Array, H: jax.Array, bits: int, group_size: int | None = None,
         act_order: bool = False, sym: bool = False, damp: float = 0.01,
         block_size: int = 128, static_groups: bool | None = None,
         name: str = "the weight") -> QuantResult:
  """GPTQ (Frantar et al. 2023) of w_OI [out, in] given H [in, in] = sum_t x_t x_t^T of the
  layer input x_t [in] (any positive multiple gives the same result, see the module
  docstring for the one exception).

  bits: 2..8; group_size: None or -1 for one grid per output row, else a divisor of `in`;
  act_order: process columns in descending diag(H) order; sym: symmetric grid; damp:
  relative dampening (damp * mean(diag H) is added to diag H); block_size: columns per
  lazy batch update; static_groups: compute group grids before quantizing (default:
  act_order). `name` names the component in errors. One compilation per (shapes,
  group_size, block_size, number of dampening tries). Raises DtmError for bad arguments
  and when H cannot be factored even with dampening MAX_DAMP.
  """
  _check_args(w_OI, bits, group_size, name)
  in_dim = w_OI.shape[1]
  if tuple(getattr(H, "shape", ())) != (in_dim, in_dim):
    got = tuple(getattr(H, "shape", ()))
    raise DtmError(f"GPTQ of {name}: the Hessian must be [in, in] = [{in_dim}, {in_dim}] for an HF "
                   f"weight [out={w_OI.shape[0]}, in={in_dim}], got {got}")
  if isinstance(damp, bool) or not (isinstance(damp, (int, float)) and math.isfinite(damp)
                                    and damp >= 0):
    raise DtmError(f"GPTQ of {name}: damp must be a finite number >= 0, got {damp!r}")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise DtmError(f"GPTQ of {name}: block_size must be a positive integer, got {block_size!r}")
  static = act_order if static_groups is None else static_groups
  res = _gptq(w_OI, H, jnp.int32(bits), jnp.bool_(sym), jnp.bool_(act_order), jnp.bool_(static),
              jnp.asarray(_damp_schedule(damp), jnp.float32),
              group_size=None if group_size == -1 else group_size, block_size=block_size)
  if not isinstance(res.damp, jax.core.Tracer) and math.isnan(float(res.damp)):
    raise DtmError(f"GPTQ of {name}: the Cholesky factorization of the Hessian failed (H is not "
                   f"positive definite) even with dampening {MAX_DAMP} x mean(diag H); check the "
                   f"calibration statistics (NaN/Inf, too few samples) or quantize it with rtn")
  return res
