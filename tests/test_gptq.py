"""GPTQ and RTN (dtm/compress/gptq.py) against a NumPy transcription of IST-DASLab/gptq."""
import numpy as np
import jax.numpy as jnp
import pytest

from dtm.compress import gptq as Q
from dtm.errors import DtmError

OUT, IN, SAMPLES = 32, 256, 768
DEAD = 5  # an input feature that is always zero: H[5, 5] == 0
# float32 vs float64: a row's codes may differ only after a column where the reference's
# w / scale was this close to a .5 tie (one such row in 36 configs x 64 rows, at 1.2e-7)
TIE = 1e-4

# ------------------------------------------------------- NumPy transcription of the reference


def ref_find_params(x, bits, sym):
  """quant.py Quantizer.find_params(x, weight=True), perchannel: x [rows, cols] -> [rows].
  Computed in float32 as the reference does (an all-zero row's zero point -xmin / scale =
  7.4999996 in float32 but 7.5 in float64), returned in x's dtype."""
  maxq = 2 ** bits - 1
  dtype, x = x.dtype, x.astype(np.float32)
  xmin = np.minimum(x.min(1), 0)
  xmax = np.maximum(x.max(1), 0)
  if sym:
    xmax = np.maximum(np.abs(xmin), xmax)
    xmin = np.where(xmin < 0, -xmax, xmin)
  flat = (xmin == 0) & (xmax == 0)
  xmin, xmax = np.where(flat, -1, xmin), np.where(flat, 1, xmax)
  scale = (xmax - xmin) / np.float32(maxq)
  zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
  return scale.astype(dtype), zero.astype(dtype)


def ref_quantize(x, scale, zero, bits):
  code = np.clip(np.round(x / scale) + zero, 0, 2 ** bits - 1)
  return code, scale * (code - zero)


def ref_gptq(W, H, bits, groupsize=-1, actorder=False, sym=False, percdamp=0.01, blocksize=128,
             static_groups=False):
  """gptq.py GPTQ.fasterquant in float64 (grids in float32). Returns (Q, codes,
  scale [rows, G], ratio, perm): ratio[:, j] is the w / scale that was rounded for column j
  (original order)."""
  W, H = W.astype(np.float64), H.astype(np.float64).copy()
  rows, cols = W.shape
  g = cols if groupsize == -1 else groupsize
  scale, zero = ref_find_params(W, bits, sym)
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  groups = [ref_find_params(W[:, i:i + g], bits, sym) for i in range(0, cols, g)]
  perm = np.argsort(-np.diag(H), kind="stable") if actorder else np.arange(cols)
  W, H = W[:, perm], H[perm][:, perm]
  scales = np.zeros((rows, cols // g))
  codes, Qw, ratio = np.zeros_like(W), np.zeros_like(W), np.zeros_like(W)
  H[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper, Hinv^T Hinv = H^-1
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    W1 = W[:, i1:i2].copy()
    Err1 = np.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w, d = W1[:, i], Hinv1[i, i]
      if groupsize != -1:
        if not static_groups:
          if (i1 + i) % groupsize == 0:
            scale, zero = ref_find_params(W[:, i1 + i:i1 + i + groupsize], bits, sym)
            scales[:, (i1 + i) // g] = scale
        else:
          scale, zero = groups[perm[i1 + i] // groupsize]
          scales[:, perm[i1 + i] // groupsize] = scale
      else:
        scales[:, 0] = scale
      ratio[:, i1 + i] = w / scale
      codes[:, i1 + i], Qw[:, i1 + i] = ref_quantize(w, scale, zero, bits)
      err1 = (w - Qw[:, i1 + i]) / d
      W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
      Err1[:, i] = err1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  inv = np.argsort(perm)
  return Qw[:, inv], codes[:, inv], scales, ratio[:, inv], perm


# ---------------------------------------------------------------------------------- problems


def problem(seed=0, out_dim=OUT, dead=True):
  """W [out, in] with an all-zero row and a non-negative row; X [in, samples] correlated
  features of unequal scales with one dead feature (unless not `dead`); H = X X^T."""
  rng = np.random.default_rng(seed)
  W = rng.standard_normal((out_dim, IN)).astype(np.float32)
  W[3] = 0.0
  W[7] = np.abs(W[7])
  mix = np.eye(IN) + rng.standard_normal((IN, IN)) * 0.6 / np.sqrt(IN)
  X = (mix @ rng.standard_normal((IN, SAMPLES))) * np.exp(rng.normal(0, 0.5, (IN, 1)))
  if dead:
    X[DEAD] = 0.0
  X = X.astype(np.float32)
  return W, X, (X.astype(np.float64) @ X.T.astype(np.float64)).astype(np.float32)


def compare_codes(res, ref_codes, ref_ratio, ref_perm, max_rows):
  """Codes equal in every row except at most `max_rows` rows, each of which first differs
  (in processing order) where the reference rounded a near-tie; returns a bool mask of
  the entries that are comparable (same row history)."""
  got = np.asarray(res.codes)
  np.testing.assert_array_equal(np.asarray(res.perm), ref_perm)
  diff = (got != ref_codes)[:, ref_perm]  # processing order
  bad_rows = np.flatnonzero(diff.any(1))
  assert len(bad_rows) <= max_rows, f"{len(bad_rows)} rows differ: {bad_rows}"
  same = np.ones(got.shape, bool)
  for r in bad_rows:
    first = np.argmax(diff[r])
    frac = ref_ratio[r, ref_perm[first]] % 1.0
    assert abs(frac - 0.5) < TIE, f"row {r} col {ref_perm[first]}: not a near-tie ({frac})"
    same[r, ref_perm[first:]] = False
  return same


CASES = [  # bits, group_size, act_order, sym, block_size, static_groups
    (4, 64, False, False, 128, None),
    (4, 64, True, False, 128, None),
    (4, 64, False, True, 128, None),
    (4, 64, True, True, 128, None),
    (8, None, False, False, 128, None),
    (8, None, True, True, 128, None),
    (3, None, True, False, 128, None),
    (4, 64, False, False, 96, None),  # padded last block; a group straddles two blocks
    (4, 64, True, False, 128, False),  # act-order with groups over the processed order
]


@pytest.mark.parametrize("bits, group_size, act_order, sym, block_size, static_groups", CASES)
def test_gptq_equals_reference(bits, group_size, act_order, sym, block_size, static_groups):
  W, _, H = problem()
  res = Q.gptq(jnp.asarray(W), jnp.asarray(H), bits, group_size, act_order, sym,
               block_size=block_size, static_groups=static_groups)
  static = act_order if static_groups is None else static_groups
  ref_w, ref_codes, ref_scale, ref_ratio, ref_perm = ref_gptq(
      W, H, bits, group_size or -1, act_order, sym, blocksize=block_size, static_groups=static)
  same = compare_codes(res, ref_codes, ref_ratio, ref_perm, max_rows=1)
  np.testing.assert_allclose(np.asarray(res.w)[same], ref_w[same], rtol=0, atol=1e-5)
  rows_same = same.all(1)
  np.testing.assert_allclose(np.asarray(res.scale)[rows_same], ref_scale[rows_same], rtol=1e-5)
  # the outputs describe one another exactly
  g = np.asarray(res.g_idx)
  codes, scale, zero = np.asarray(res.codes), np.asarray(res.scale), np.asarray(res.zero)
  np.testing.assert_array_equal(np.asarray(res.w),
                                scale[:, g] * (codes - zero[:, g]).astype(np.float32))
  assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
  expected_g = np.arange(IN) // (group_size or IN)
  if group_size and act_order and not static:
    expected_g = np.argsort(ref_perm) // group_size
  np.testing.assert_array_equal(g, expected_g)
  # dead input and all-zero row quantize to exact zeros
  assert (np.asarray(res.w)[:, DEAD] == 0).all() and (np.asarray(res.w)[3] == 0).all()
  assert float(res.damp) == pytest.approx(0.01)


@pytest.mark.parametrize("bits, group_size, sym", [(4, 64, False), (4, 64, True), (8, None, False),
                                                   (3, None, True)])
def test_rtn_equals_reference_bit_exact(bits, group_size, sym):
  """In float32 the NumPy grid and rounding give exactly RTN's codes and weights."""
  W, _, _ = problem(1)
  res = Q.rtn(jnp.asarray(W), bits, group_size, sym)
  g = group_size or IN
  Wg = W.reshape(OUT * IN // g, g)
  scale, zero = ref_find_params(Wg, bits, sym)
  code, deq = ref_quantize(Wg, scale[:, None], zero[:, None], bits)
  np.testing.assert_array_equal(np.asarray(res.codes), code.reshape(OUT, IN))
  np.testing.assert_array_equal(np.asarray(res.w), deq.reshape(OUT, IN))
  np.testing.assert_array_equal(np.asarray(res.scale), scale.reshape(OUT, IN // g))
  np.testing.assert_array_equal(np.asarray(res.zero), zero.reshape(OUT, IN // g))
  assert (np.asarray(res.w)[3] == 0).all()


@pytest.mark.parametrize("bits, group_size, act_order",
                         [(4, 64, False), (4, 64, True), (3, None, True)])
def test_gptq_output_error_below_rtn(bits, group_size, act_order):
  W, X, H = problem(2)
  err = lambda w: np.linalg.norm((W.astype(np.float64) - np.asarray(w, np.float64)) @ X)
  e_gptq = err(Q.gptq(jnp.asarray(W), jnp.asarray(H), bits, group_size, act_order).w)
  e_rtn = err(Q.rtn(jnp.asarray(W), bits, group_size).w)
  assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def test_hessian_scale_invariance():
  """Without dead inputs (their H_jj = 1 does not scale) H and c * H give the same result."""
  W, _, H = problem(dead=False)
  args = (jnp.asarray(W),)
  base = Q.gptq(*args, jnp.asarray(H), 4, 64, True)
  # a power of two scales every float operation exactly: bitwise the same result
  four = Q.gptq(*args, jnp.asarray(H * 4), 4, 64, True)
  for a, b in zip(base, four):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the reference's 2/n sum x x^T: the same up to float32 near-ties
  _, ref_codes, _, ref_ratio, ref_perm = ref_gptq(W, H, 4, 64, True, static_groups=True)
  scaled = Q.gptq(*args, jnp.asarray(H * np.float32(2 / SAMPLES)), 4, 64, True)
  compare_codes(scaled, ref_codes, ref_ratio, ref_perm, max_rows=1)
  assert np.mean(np.asarray(scaled.codes) != np.asarray(base.codes)) <= 0.005


def test_non_positive_definite_hessian_retries_then_raises():
  W, _, H = problem()
  H64 = H.astype(np.float64)
  evals, evecs = np.linalg.eigh(H64)
  m = np.mean(np.diag(H64))
  v = evecs[:, -1]
  # lowest eigenvalue -0.05 * mean(diag): damp 0.01 fails, 0.1 succeeds
  H_bad = (H64 - (evals[-1] + 0.05 * m) * np.outer(v, v)).astype(np.float32)
  res = Q.gptq(jnp.asarray(W), jnp.asarray(H_bad), 4, 64)
  assert float(res.damp) == pytest.approx(0.1)
  _, ref_codes, _, ref_ratio, ref_perm = ref_gptq(W, H_bad, 4, 64, percdamp=0.1)
  compare_codes(res, ref_codes, ref_ratio, ref_perm, max_rows=1)
  # far from positive definite: no dampening up to MAX_DAMP helps
  H_worse = (H64 - (evals[-1] + 5 * m) * np.outer(v, v)).astype(np.float32)
  with pytest.raises(DtmError, match="GPTQ of L03.q: the Cholesky factorization .* failed"):
    Q.gptq(jnp.asarray(W), jnp.asarray(H_worse), 4, 64, name="L03.q")
  with pytest.raises(DtmError, match="L03.q"):
    Q.gptq(jnp.asarray(W), jnp.asarray(np.full_like(H, np.nan)), 4, 64, name="L03.q")


def test_damp_schedule():
  assert Q._damp_schedule(0.01) == pytest.approx((0.01, 0.1, 1.0))
  assert Q._damp_schedule(0.0) == pytest.approx((0.0, 0.01, 0.1, 1.0))
  assert Q._damp_schedule(2.0) == (2.0,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), "bits must be an integer in 2..8, got 1"),
    (dict(bits=9), "bits must be an integer in 2..8, got 9"),
    (dict(bits=4.0), "bits must be an integer"),
    (dict(bits=4, group_size=6), "group_size 6 does not divide the input dimension "
                                 "\\(HF weight \\[out=4, in=16\\]\\)"),
    (dict(bits=4, group_size=0), "group_size must be a positive integer"),
    (dict(bits=4, damp=-0.1), "damp must be a finite number >= 0"),
    (dict(bits=4, block_size=0), "block_size must be a positive integer"),
])
def test_bad_arguments_raise(kwargs, match):
  w, H = jnp.ones((4, 16)), jnp.eye(16)
  with pytest.raises(DtmError, match=match):
    Q.gptq(w, H, name="L00.up", **kwargs)
  if "damp" not in kwargs and "block_size" not in kwargs:
    with pytest.raises(DtmError, match=match):
      Q.rtn(w, name="L00.up", **kwargs)


def test_bad_shapes_raise():
  with pytest.raises(DtmError, match="Hessian must be \\[in, in\\] = \\[16, 16\\]"):
    Q.gptq(jnp.ones((4, 16)), jnp.eye(8), 4)
  with pytest.raises(DtmError, match="expected a 2-D HF weight"):
    Q.rtn(jnp.ones((16,)), 4)
