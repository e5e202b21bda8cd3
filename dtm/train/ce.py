"""Next-token cross-entropy over vocabulary chunks with a hand-written backward pass (the
CE-only objective, alpha = 0, of `dtm.train.objective.chunked_loss`).

Per position i with logits s_i = W x_i (W [V, D], chunks of vc rows):

  CE_i = lse(s_i) − s_i[y_i],     ∂CE_i / ∂s_iv = p_iv − [v = y_i],  p_i = softmax(s_i).

Forward: one pass over the chunks with an online log-sum-exp and the target logit
(a masked sum, no gather). Backward, given g_i = ∂L/∂CE_i: per chunk
d = (e^{s − lse} − onehot(y)) g [N, vc] in one elementwise pass, then dx += d W_c and
dW_c = dᵀ x: the two GEMMs the gradient needs and nothing else. With several chunks the
chunk's logits are recomputed (one more GEMM, peak memory one [N, vc] block); with one
chunk they are kept from the forward. Autodiff of the online forward instead also
differentiated the running maxima (a compare and a reduction over [N, vc] per chunk),
scattered the target logit's gradient into a [N, vc] zero block, and wrote the chunk's
softmax several times: 1.5-2x this backward's time on a 2-core Xeon. Values equal the
autodiff path's bit for bit; gradients agree to float32 rounding (tested).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunk_logits(x_ND, w_vD, i, v: int):
  """f32 logits [N, vc] of chunk i; vocabulary padding (ids >= v) at -inf."""
  logits = jnp.dot(x_ND, w_vD.T, preferred_element_type=jnp.float32)
  vc = w_vD.shape[0]
  if v % vc:
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + i * vc
    logits = jnp.where(ids < v, logits, -jnp.inf)
  return logits


def _onehot(targets_N, i, shape):
  ids = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + i * shape[1]
  return ids == targets_N[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def cross_entropy(x_ND: jax.Array, w_CvD: jax.Array, targets_N: jax.Array, v: int) -> jax.Array:
  """CE_i [N] (f32, nats) of x [N, D] against the head in chunks w [C, vc, D] (rows >= v
  are padding), targets int32 [N] in [0, v). Differentiable in x and w."""
  return _forward(x_ND, w_CvD, targets_N, v)[0]


def _forward(x_ND, w_CvD, targets_N, v):
  n, num_chunks = x_ND.shape[0], w_CvD.shape[0]

  def body(carry, c):
    m, s, ty = carry
    w_vD, i = c
    logits = _chunk_logits(x_ND, w_vD, i, v)
    new_m = jnp.maximum(m, jnp.max(logits, axis=-1))
    s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[:, None]), axis=-1)
    ty = ty + jnp.sum(jnp.where(_onehot(targets_N, i, logits.shape), logits, 0.0), axis=-1)
    return (new_m, s, ty), (logits if num_chunks == 1 else None)

  init = (jnp.full((n,), -jnp.inf), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
  (m, s, ty), kept = jax.lax.scan(body, init, (w_CvD, jnp.arange(num_chunks, dtype=jnp.int32)))
  lse = m + jnp.log(s)
  return lse - ty, (x_ND, w_CvD, targets_N, lse, kept)


def _backward(v, res, g_N):
  x_ND, w_CvD, targets_N, lse, kept = res
  num_chunks = w_CvD.shape[0]

  def chunk_grads(w_vD, i, logits):
    d = jnp.exp(logits - lse[:, None]) - _onehot(targets_N, i, logits.shape)
    d = (d * g_N[:, None]).astype(x_ND.dtype)
    dx = jnp.dot(d, w_vD, preferred_element_type=jnp.float32)
    dw = jnp.dot(d.T, x_ND, preferred_element_type=jnp.float32)
    return dx, dw.astype(w_CvD.dtype)

  if num_chunks == 1:
    dx, dw = chunk_grads(w_CvD[0], 0, kept[0])
    dw = dw[None]
  else:
    def body(dx, c):
      w_vD, i = c
      dx_c, dw = chunk_grads(w_vD, i, _chunk_logits(x_ND, w_vD, i, v))
      return dx + dx_c, dw
    dx, dw = jax.lax.scan(body, jnp.zeros(x_ND.shape, jnp.float32),
                          (w_CvD, jnp.arange(num_chunks, dtype=jnp.int32)))
  return dx.astype(x_ND.dtype), dw, None


cross_entropy.defvjp(lambda x, w, t, v: _forward(x, w, t, v), _backward)
