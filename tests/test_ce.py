"""dtm.train.ce: the CE-only loss's hand-written backward against autodiff of full logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtm.train.objective import Objective, chunked_loss


def _problem(seed=0, b=2, t=5, d=16, v=37):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(v, d)) * 0.7, jnp.float32)
  y = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.asarray(rng.random((b, t)) > 0.2, jnp.float32)
  return x, w, y, mask


@pytest.mark.parametrize("vocab_chunk", [8, 10, 0])
def test_ce_value_and_gradient_equal_full_logits(vocab_chunk):
  x, w, y, mask = _problem()

  def full(x, w):
    s = jnp.einsum("btd,vd->btv", x, w)
    ce = jax.nn.logsumexp(s, -1) - jnp.take_along_axis(s, y[..., None], -1)[..., 0]
    return jnp.sum(ce * mask)

  obj = Objective(alpha=0.0, vocab_chunk=vocab_chunk)
  value, grads = jax.jit(jax.value_and_grad(
      lambda x, w: chunked_loss(obj, x, w, y, mask).loss, argnums=(0, 1)))(x, w)
  want, want_grads = jax.value_and_grad(full, argnums=(0, 1))(x, w)
  assert float(value) == pytest.approx(float(want), rel=1e-6)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
  # the CE the distillation path reports is the same number
  distill = chunked_loss(Objective(alpha=0.5, vocab_chunk=vocab_chunk), x, w, y, mask, x, w)
  assert float(distill.ce) == float(value)


def test_ce_bf16_gradients_keep_dtypes():
  x, w, y, mask = _problem(1)
  obj = Objective(alpha=0.0, vocab_chunk=8)
  gx, gw = jax.grad(lambda x, w: chunked_loss(obj, x, w, y, mask, dtype=jnp.bfloat16).loss,
                    argnums=(0, 1))(x, w)
  assert gx.dtype == jnp.float32 and gw.dtype == jnp.float32 and gw.shape == w.shape
  def full(x):
    s = jnp.einsum("btd,vd->btv", x, w)
    return jnp.sum((jax.nn.logsumexp(s, -1) - jnp.take_along_axis(s, y[..., None], -1)[..., 0])
                   * mask)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(jax.grad(full)(x)), rtol=0, atol=0.05)
