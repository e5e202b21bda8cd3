"""Activation-aware int8 linear maps: W8A8 and LLM.int8 (Dettmers et al. 2022, arXiv 2208.07339).

Pure functions y = f(x [..., in], w_OI [out, in]) -> [..., out] that stand in for
y = x @ w_OI^T, to be plugged into the model at one interception point (the linear
layers' dot product). The int8 grid follows bitsandbytes (`int8_vectorwise_quant`,
`int8_mm_dequant` and `int8_mixed_scaled_mm` of its default/CPU backend):

  absmax-int8 of a vector v:  a = max|v|,  q = clip(round(v * (127 / a)), -127, 127)  (int8)
                              dequantized q * a / 127; `round` is round-half-to-even

(multiplication by the float32 reciprocal 127 / a, as bitsandbytes does, not v / (a / 127);
a vector with a == 0 gets q = 0). Activations are quantized per token (each row of x
flattened to [tokens, in]), weights per output channel (each row of w_OI). Products are
accumulated exactly in int32 and rescaled as acc * (a_x * a_w) / 127^2 in float32.

LLM.int8 (mixed-precision decomposition): the input features (columns of x) with any
|x| >= threshold over all tokens of the call are outlier features; their part of the
product is computed in floating point, x[:, outliers] @ w[:, outliers]^T, the rest as
above with the outlier columns' codes zeroed, and the two parts are summed. As in
bitsandbytes, a token's absmax skips only the entries >= threshold, not the whole outlier
columns. Differences from bitsandbytes (0.45 and later), on purpose:
  * no cast to float16: x and w are quantized from their own values (upcast to float32);
    bitsandbytes casts both to float16 first (so feed float16-representable values to
    compare);
  * the rescale constant is exactly float32(1 / 127^2); bitsandbytes' default (CPU)
    kernel multiplies by 6.200124e-05, 1.8e-5 relatively larger (its CUDA kernel uses
    6.200012e-05);
  * the outlier columns use the unquantized weights (the paper, and bitsandbytes with
    has_fp16_weights=True) unless outlier_weights='int8': then the dequantized int8
    weights q * a_w / 127, as bitsandbytes' inference path (has_fp16_weights=False) does;
  * the outlier part runs as a masked dense matmul (same shapes for every batch, so it
    jit-compiles once), not on gathered columns; adding exact zeros does not change it;
  * a token or channel whose absmax is 0 gets codes 0 (bitsandbytes computes 0 * inf).

The *_ste variants have the same forward pass and the gradient of the float matmul
x @ w^T (a straight-through estimator, for quantization-aware training).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from dtm.errors import DtmError

QMAX = 127
OUTLIER_WEIGHTS = ("float", "int8")
_RESCALE = 1.0 / (QMAX * QMAX)  # applied as a float32 constant


def absmax_int8(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Vector-wise absmax int8 over the last axis: (q int8 [..., k], absmax float32 [...]),
  q = clip(round(v * (127 / absmax)), -127, 127), round half to even; absmax 0 -> q = 0."""
  v = v.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(v), axis=-1)
  factor = jnp.where(absmax > 0, QMAX / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  q = jnp.clip(jnp.round(v * factor[..., None]), -QMAX, QMAX)
  return q.astype(jnp.int8), absmax


def quantize_weight(w_OI: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-output-channel symmetric int8 weights: (q int8 [out, in], absmax float32 [out])."""
  return absmax_int8(w_OI)


def quantize_activation(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token dynamic symmetric int8 activations: (q int8 [..., in], absmax float32 [...])."""
  return absmax_int8(x)


def dequantize(q: jax.Array, absmax: jax.Array) -> jax.Array:
  """float32 q * absmax / 127 (bitsandbytes' int8_vectorwise_dequant order)."""
  return q.astype(jnp.float32) * absmax[..., None] * jnp.float32(1.0 / QMAX)


def int8_matmul(qx: jax.Array, qw_OI: jax.Array) -> jax.Array:
  """Exact int32 accumulation of int8 products: [..., in] x [out, in] -> int32 [..., out]."""
  return lax.dot_general(qx, qw_OI, (((qx.ndim - 1,), (1,)), ((), ())),
                         preferred_element_type=jnp.int32)


def _rescale(acc: jax.Array, ax: jax.Array, aw: jax.Array) -> jax.Array:
  """float32 acc * (a_x * a_w) / 127^2 (bitsandbytes' int8_mm_dequant order)."""
  return acc.astype(jnp.float32) * (ax[..., None] * aw) * jnp.float32(_RESCALE)


def _check_shapes(x, w_OI, what: str) -> None:
  if getattr(w_OI, "ndim", None) != 2 or getattr(x, "ndim", 0) < 1 or x.shape[-1] != w_OI.shape[1]:
    raise DtmError(f"{what}: expected x [..., in] and an HF weight [out, in], got "
                   f"{tuple(getattr(x, 'shape', ()))} and {tuple(getattr(w_OI, 'shape', ()))}")


@jax.jit
def _w8a8(x, w_OI):
  qx, ax = quantize_activation(x)
  qw, aw = quantize_weight(w_OI)
  return _rescale(int8_matmul(qx, qw), ax, aw).astype(x.dtype)


def w8a8_matmul(x: jax.Array, w_OI: jax.Array) -> jax.Array:
  """x [..., in] @ w_OI^T with per-token int8 x and per-channel int8 w, int32 accumulation,
  rescaled to float: [..., out] in x.dtype."""
  _check_shapes(x, w_OI, "w8a8_matmul")
  return _w8a8(x, w_OI)


def llm_int8_split(x: jax.Array, threshold: float):
  """The activation side of LLM.int8 for x [..., in] (all tokens together):
  (outlier bool [in], q int8 [..., in] with the outlier columns 0, absmax float32 [...]
  over each token's entries with |x| < threshold)."""
  x32 = x.astype(jnp.float32)
  big = jnp.abs(x32) >= threshold
  outlier = jnp.any(big.reshape(-1, x.shape[-1]), axis=0)
  q, absmax = absmax_int8(jnp.where(big, 0.0, x32))
  return outlier, jnp.where(outlier, jnp.int8(0), q), absmax


@functools.partial(jax.jit, static_argnames=("threshold", "outlier_weights"))
def _llm_int8(x, w_OI, threshold: float, outlier_weights: str):
  outlier, qx, ax = llm_int8_split(x, threshold)
  qw, aw = quantize_weight(w_OI)
  y = _rescale(int8_matmul(qx, qw), ax, aw)
  w_float = w_OI if outlier_weights == "float" else dequantize(qw, aw)
  w_float = w_float.astype(x.dtype)
  x_out = jnp.where(outlier, x, jnp.zeros_like(x))
  y_out = lax.dot_general(x_out, w_float, (((x.ndim - 1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
  return (y + y_out).astype(x.dtype)


def _check_llm_int8(threshold, outlier_weights) -> None:
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
      or not math.isfinite(threshold) or threshold <= 0:
    raise DtmError(f"llm_int8: the outlier threshold must be a finite number > 0 (|x| >= threshold "
                   f"marks an outlier feature; the paper uses 6.0), got {threshold!r}; for no "
                   f"decomposition use w8a8")
  if outlier_weights not in OUTLIER_WEIGHTS:
    raise DtmError(f"llm_int8: outlier_weights must be one of {', '.join(OUTLIER_WEIGHTS)}, "
                   f"got {outlier_weights!r}")


def llm_int8_matmul(x: jax.Array, w_OI: jax.Array, threshold: float = 6.0,
                    outlier_weights: str = "float") -> jax.Array:
  """LLM.int8 x [..., in] @ w_OI^T -> [..., out] in x.dtype (module docstring): outlier
  features (any |x| >= threshold over all tokens) in floating point with the unquantized
  (outlier_weights='float') or dequantized int8 ('int8') weights, the rest vector-wise
  int8 with int32 accumulation."""
  _check_shapes(x, w_OI, "llm_int8_matmul")
  _check_llm_int8(threshold, outlier_weights)
  return _llm_int8(x, w_OI, float(threshold), outlier_weights)


# ---------------------------------------------------------------- straight-through variants


def _float_matmul_vjp(res, g):
  """Cotangents of y = x @ w^T: dx = g @ w, dw = g^T x (summed over the leading axes)."""
  x, w_OI = res
  lead = tuple(range(x.ndim - 1))
  dx = lax.dot_general(g, w_OI, (((g.ndim - 1,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32).astype(x.dtype)
  dw = lax.dot_general(g, x, ((lead, lead), ((), ())),
                       preferred_element_type=jnp.float32).astype(w_OI.dtype)
  return dx, dw


@jax.custom_vjp
def _w8a8_ste(x, w_OI):
  return _w8a8(x, w_OI)


_w8a8_ste.defvjp(lambda x, w: (_w8a8(x, w), (x, w)), _float_matmul_vjp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _llm_int8_ste(x, w_OI, threshold, outlier_weights):
  return _llm_int8(x, w_OI, threshold, outlier_weights)


_llm_int8_ste.defvjp(
    lambda x, w, t, o: (_llm_int8(x, w, t, o), (x, w)),
    lambda t, o, res, g: _float_matmul_vjp(res, g))


def w8a8_matmul_ste(x: jax.Array, w_OI: jax.Array) -> jax.Array:
  """w8a8_matmul forward, gradient of x @ w_OI^T (straight-through) for x and w_OI."""
  _check_shapes(x, w_OI, "w8a8_matmul_ste")
  return _w8a8_ste(x, w_OI)


def llm_int8_matmul_ste(x: jax.Array, w_OI: jax.Array, threshold: float = 6.0,
                        outlier_weights: str = "float") -> jax.Array:
  """llm_int8_matmul forward, gradient of x @ w_OI^T (straight-through) for x and w_OI."""
  _check_shapes(x, w_OI, "llm_int8_matmul_ste")
  _check_llm_int8(threshold, outlier_weights)
  return _llm_int8_ste(x, w_OI, float(threshold), outlier_weights)
