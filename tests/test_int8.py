"""W8A8 and LLM.int8 (dtm/compress/int8.py) against NumPy transcriptions (and bitsandbytes)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtm.compress import int8 as I
from dtm.errors import DtmError

TOKENS, IN, OUT = 24, 128, 48
OUTLIER_COLS = (5, 17, 90)

# ------------------------------------------------------------- NumPy transcription (float32)


def np_absmax_int8(v):
  v = v.astype(np.float32)
  a = np.abs(v).max(-1)
  factor = np.where(a > 0, np.float32(127) / np.where(a > 0, a, 1), 0).astype(np.float32)
  return np.clip(np.round(v * factor[..., None]), -127, 127).astype(np.int8), a


def np_rescale(acc, ax, aw):
  return (acc.astype(np.float32) * (ax[:, None] * aw[None, :])) * np.float32(1 / 127 ** 2)


def np_llm_int8(x, w, threshold, outlier_weights="float"):
  """LLM.int8 as bitsandbytes' int8_vectorwise_quant + int8_mixed_scaled_mm, in NumPy:
  returns (y [tokens, out], outlier cols, qx, ax, acc int64)."""
  x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
  big = np.abs(x2) >= threshold
  cols = big.any(0)
  qx, ax = np_absmax_int8(np.where(big, 0, x2))
  qx[:, cols] = 0
  qw, aw = np_absmax_int8(w)
  acc = qx.astype(np.int64) @ qw.T.astype(np.int64)
  w_out = w if outlier_weights == "float" else qw.astype(np.float32) * aw[:, None] / np.float32(127)
  y = np_rescale(acc, ax, aw) + x2[:, cols].astype(np.float64) @ w_out[:, cols].T.astype(np.float64)
  return y.reshape(*x.shape[:-1], -1), cols, qx, ax, acc


def data(seed=0):
  """x [2, TOKENS // 2, IN] with planted outlier features, w [OUT, IN] with a zero row."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((TOKENS, IN)).astype(np.float32)
  x[:, OUTLIER_COLS[0]] *= 20  # a whole outlier feature
  x[3, OUTLIER_COLS[1]] = -7.5  # one outlier entry
  x[[4, 9], OUTLIER_COLS[2]] = [6.0, 12.0]  # exactly at the threshold counts
  x[4, OUTLIER_COLS[1]] = 5.9  # below threshold inside an outlier column: sets token 4's absmax
  x[4, [c for c in range(IN) if c not in OUTLIER_COLS]] *= 0.5
  x[7] = 0.0  # an all-zero token
  w = (rng.standard_normal((OUT, IN)) * 0.05).astype(np.float32)
  w[2] = 0.0
  return x.reshape(2, TOKENS // 2, IN), w


# ------------------------------------------------------------------------------ quantizers


def test_absmax_int8_round_half_even_and_zero():
  v = np.array([[127.0, 0.5, 1.5, 2.5, -2.5, -127.0, 126.5, 3.0], [0.0] * 8], np.float32)
  q, a = I.absmax_int8(jnp.asarray(v))
  assert q.dtype == jnp.int8
  np.testing.assert_array_equal(q, [[127, 0, 2, 2, -2, -127, 126, 3], [0] * 8])
  np.testing.assert_array_equal(a, [127.0, 0.0])


def test_quantizers_equal_numpy():
  x, w = data()
  qx, ax = I.quantize_activation(jnp.asarray(x))
  ref_qx, ref_ax = np_absmax_int8(x)
  np.testing.assert_array_equal(qx, ref_qx)
  np.testing.assert_array_equal(ax, ref_ax)
  assert qx.shape == x.shape and ax.shape == x.shape[:-1]
  qw, aw = I.quantize_weight(jnp.asarray(w))
  ref_qw, ref_aw = np_absmax_int8(w)
  np.testing.assert_array_equal(qw, ref_qw)
  np.testing.assert_array_equal(aw, ref_aw)
  assert np.abs(np.asarray(qw)).max() == 127 and (np.asarray(qw)[2] == 0).all()
  # dequantized within half a step of the original
  err = np.abs(np.asarray(I.dequantize(qw, aw)) - w)
  assert (err <= ref_aw[:, None] / 254 * (1 + 1e-5)).all()


# ------------------------------------------------------------------------------------ W8A8


def test_w8a8_is_exact_integer_matmul_times_scales():
  x, w = data(1)
  x = x.reshape(TOKENS, IN)
  qx, ax = np_absmax_int8(x)
  qw, aw = np_absmax_int8(w)
  acc = qx.astype(np.int64) @ qw.T.astype(np.int64)
  assert np.abs(acc).max() < 2 ** 31
  np.testing.assert_array_equal(I.int8_matmul(jnp.asarray(qx), jnp.asarray(qw)), acc)
  y = I.w8a8_matmul(jnp.asarray(x), jnp.asarray(w))
  assert y.dtype == jnp.float32 and y.shape == (TOKENS, OUT)
  np.testing.assert_array_equal(y, np_rescale(acc, ax, aw))
  # leading axes are tokens too; no outlier features -> LLM.int8 is exactly W8A8
  y3 = I.w8a8_matmul(jnp.asarray(x.reshape(2, -1, IN)), jnp.asarray(w))
  np.testing.assert_array_equal(y3.reshape(TOKENS, OUT), y)
  no_outliers = I.llm_int8_matmul(jnp.asarray(x), jnp.asarray(w), threshold=1e30)
  np.testing.assert_array_equal(no_outliers, y)
  # without outlier features, within 1 % of the float matmul
  x = np.random.default_rng(1).standard_normal((TOKENS, IN)).astype(np.float32)
  ref = x.astype(np.float64) @ w.T.astype(np.float64)
  assert np.linalg.norm(np.asarray(I.w8a8_matmul(jnp.asarray(x), jnp.asarray(w))) - ref) \
      < 0.01 * np.linalg.norm(ref)


def test_w8a8_bfloat16_keeps_dtype():
  x, w = data(2)
  y = I.w8a8_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and y.shape == (2, TOKENS // 2, OUT)


# -------------------------------------------------------------------------------- LLM.int8


@pytest.mark.parametrize("outlier_weights", ["float", "int8"])
def test_llm_int8_equals_numpy(outlier_weights):
  x, w = data()
  outlier, qx, ax = I.llm_int8_split(jnp.asarray(x), 6.0)
  ref_y, ref_cols, ref_qx, ref_ax, ref_acc = np_llm_int8(x, w, 6.0, outlier_weights)
  assert np.flatnonzero(outlier).tolist() == list(OUTLIER_COLS) == np.flatnonzero(ref_cols).tolist()
  np.testing.assert_array_equal(np.asarray(qx).reshape(TOKENS, IN), ref_qx)
  np.testing.assert_array_equal(np.asarray(ax).reshape(TOKENS), ref_ax)
  assert ref_ax[4] == np.float32(5.9)  # the sub-threshold entry of an outlier column counts
  np.testing.assert_array_equal(
      I.int8_matmul(qx, I.quantize_weight(jnp.asarray(w))[0]).reshape(TOKENS, OUT), ref_acc)
  y = I.llm_int8_matmul(jnp.asarray(x), jnp.asarray(w), 6.0, outlier_weights)
  assert y.shape == (2, TOKENS // 2, OUT) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  # the decomposition is what makes it accurate: far closer than W8A8 on outlier features
  ref = x.astype(np.float64) @ w.T.astype(np.float64)
  err = lambda y: np.linalg.norm(np.asarray(y, np.float64) - ref)
  bound = 0.25 if outlier_weights == "float" else 0.5
  assert err(y) < bound * err(I.w8a8_matmul(jnp.asarray(x), jnp.asarray(w)))


def test_llm_int8_outlier_part_uses_float_weights():
  x, w = data()
  y_float = np.asarray(I.llm_int8_matmul(jnp.asarray(x), jnp.asarray(w), 6.0, "float"))
  y_int8 = np.asarray(I.llm_int8_matmul(jnp.asarray(x), jnp.asarray(w), 6.0, "int8"))
  assert not np.array_equal(y_float, y_int8)
  # with only outlier features, the float variant is the float matmul of those features
  x_only = np.zeros_like(x)
  x_only[..., OUTLIER_COLS[0]] = x[..., OUTLIER_COLS[0]]
  got = I.llm_int8_matmul(jnp.asarray(x_only), jnp.asarray(w), 6.0)
  np.testing.assert_allclose(got, x_only @ w.T, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=0.0), "threshold must be a finite number > 0"),
    (dict(threshold=-1.0), "threshold must be a finite number > 0.*got -1.0"),
    (dict(threshold=float("nan")), "threshold must be"),
    (dict(threshold=True), "threshold must be"),
    (dict(outlier_weights="fp16"), "outlier_weights must be one of float, int8, got 'fp16'"),
])
def test_llm_int8_bad_arguments(kwargs, match):
  x, w = jnp.ones((2, 8)), jnp.ones((4, 8))
  with pytest.raises(DtmError, match=match):
    I.llm_int8_matmul(x, w, **kwargs)
  with pytest.raises(DtmError, match=match):
    I.llm_int8_matmul_ste(x, w, **kwargs)


def test_shape_mismatch_raises():
  with pytest.raises(DtmError, match="expected x \\[..., in\\] and an HF weight \\[out, in\\]"):
    I.w8a8_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)))
  with pytest.raises(DtmError, match="llm_int8_matmul"):
    I.llm_int8_matmul(jnp.ones((2, 8)), jnp.ones((8,)))


# --------------------------------------------------------------------- straight-through (STE)


@pytest.mark.parametrize("name", ["w8a8", "llm_int8"])
def test_ste_forward_quantized_gradient_float(name):
  x, w = data(3)
  x, w = jnp.asarray(x), jnp.asarray(w)
  fn, ste = ((I.w8a8_matmul, I.w8a8_matmul_ste) if name == "w8a8" else
             (I.llm_int8_matmul, I.llm_int8_matmul_ste))
  r = jax.random.normal(jax.random.PRNGKey(0), (2, TOKENS // 2, OUT))
  np.testing.assert_array_equal(jax.jit(ste)(x, w), fn(x, w))
  loss_ste = lambda x, w: jnp.sum(ste(x, w) * r)
  loss_float = lambda x, w: jnp.sum(jnp.einsum("bti,oi->bto", x, w) * r)
  gx, gw = jax.jit(jax.grad(loss_ste, argnums=(0, 1)))(x, w)
  fx, fw = jax.grad(loss_float, argnums=(0, 1))(x, w)
  assert gx.shape == x.shape and gw.shape == w.shape
  np.testing.assert_allclose(gx, fx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw, fw, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ bitsandbytes


def test_llm_int8_matches_bitsandbytes():
  """bitsandbytes' CPU LLM.int8 (inference state: int8 weights for the outlier columns too)
  on float16-representable inputs: identical codes, scales and outlier columns; outputs
  within the 1.8e-5 relative error of its rescale constant (on each of the two parts, so
  absolute where they cancel)."""
  torch = pytest.importorskip("torch")
  bnb = pytest.importorskip("bitsandbytes", reason="optional oracle: pip install bitsandbytes")
  F = pytest.importorskip("bitsandbytes.functional")
  x, w = data(4)
  x = x.reshape(TOKENS, IN).astype(np.float16).astype(np.float32)
  w = w.astype(np.float16).astype(np.float32)
  CA, SCA, cols = F.int8_vectorwise_quant(torch.from_numpy(x).half(), threshold=6.0)
  outlier, qx, ax = I.llm_int8_split(jnp.asarray(x), 6.0)
  np.testing.assert_array_equal(np.asarray(qx), CA.numpy())
  np.testing.assert_array_equal(np.asarray(ax), SCA.numpy())
  assert np.flatnonzero(outlier).tolist() == sorted(cols.tolist())
  CB, SCB, _ = F.int8_vectorwise_quant(torch.from_numpy(w).half())
  qw, aw = I.quantize_weight(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(qw), CB.numpy())
  np.testing.assert_array_equal(np.asarray(aw), SCB.numpy())
  state = bnb.MatmulLtState()
  state.is_training, state.has_fp16_weights = False, False
  with torch.no_grad():
    y_bnb = bnb.matmul(torch.from_numpy(x), torch.from_numpy(w).half(), state=state, threshold=6.0)
  y = I.llm_int8_matmul(jnp.asarray(x), jnp.asarray(w), 6.0, outlier_weights="int8")
  np.testing.assert_allclose(np.asarray(y), y_bnb.float().numpy(), rtol=1e-4, atol=1e-4)
