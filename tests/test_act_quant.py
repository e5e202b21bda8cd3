"""W8A8 / LLM.int8 linears through the model's one interception point (dtm/compress/act_quant.py).

On the tiny random Llama (3 layers): the layer-1 `down` linear with w8a8 equals a NumPy
int8 computation (integer matmul of the grid values times the scales) of the input it
sees; with llm_int8 it equals `int8.llm_int8_matmul` of that input; a spec without
activation methods leaves the params tree and the logits bit-identical; a method on
layer 1 changes only layer 1 inside the scanned model; the STE gradient flows to the
float kernels (and is exactly the float matmul's).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_model import TINY
from dtm import compress
from dtm.compress import act_quant, int8
from dtm.components import get_path, kernel_path
from dtm.errors import DtmError
from dtm.model import DecoderLayer, Llama, _positions, init_params
from dtm.train import masks as masks_lib

CFG = TINY
T = 12


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, seed=1)


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, T)), jnp.int32)


_logits = jax.jit(lambda p, t: Llama(CFG).apply({"params": p}, t))
_hidden = jax.jit(lambda p, t: Llama(CFG).apply({"params": p}, t, method=Llama.hidden)[0])


def _layer(params, l):
  return jax.tree.map(lambda a: a[l], params["layers"])


def _chain(params, tokens, capture_layer=None):
  """Hidden states after each layer, one unscanned DecoderLayer at a time (per-layer
  params sliced from the stacked tree, mode leaves included); optionally the (input,
  output) of `down` at capture_layer."""
  h = Llama(CFG).apply({"params": params}, tokens, method=lambda m, t: m.embed(t))
  pos = _positions(tokens.shape[1], None)
  outs, seen = [], {}

  def grab(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.module.name == "down" and context.method_name == "__call__":
      seen["x"], seen["y"] = args[0], y
    return y

  for l in range(CFG.num_layers):
    apply = lambda: DecoderLayer(CFG).apply({"params": _layer(params, l)}, h, None, (pos, None))[0]
    if l == capture_layer:
      with nn.intercept_methods(grab):
        h = apply()
    else:
      h = apply()
    outs.append(h)
  return outs, seen


def _np_absmax_int8(v):
  v = np.asarray(v, np.float32)
  a = np.abs(v).max(-1)
  factor = np.where(a > 0, np.float32(127) / np.where(a > 0, a, 1), 0).astype(np.float32)
  return np.clip(np.round(v * factor[..., None]), -127, 127).astype(np.int8), a


def test_spec_grammar_and_errors(params):
  spec = compress.parse_spec("down@*:llm_int8; q@0:w8a8()")
  assert spec.to_string() == "down@*:llm_int8(threshold=6.0); q@0:w8a8"
  assert compress.parse_spec("up@1:llm_int8(2.5)").rules[0].method.kwargs == {"threshold": 2.5}
  with pytest.raises(DtmError, match="threshold"):
    compress.parse_spec("down@*:llm_int8(0)")
  with pytest.raises(DtmError, match="too many arguments; signature is w8a8"):
    compress.parse_spec("down@*:w8a8(8)")
  with pytest.raises(DtmError, match="activations at run time"):
    compress.compress(jnp.ones((4, 4)), compress.Method("w8a8"))
  _, report = compress.apply_spec(params, "down@1:w8a8; q@0:llm_int8(3.0)")
  assert report["L01.down"] == {"method": "w8a8", "sparsity": 0.0, "bits": 8}
  assert report["L00.q"]["method"] == "llm_int8(threshold=3.0)"


def test_no_activation_method_is_bit_identical(params, tokens):
  ref = _logits(params, tokens)
  for spec in ("none", "q@0:absmax(8)"):
    pc, _ = compress.apply_spec(params, spec)
    assert jax.tree.structure(pc) == jax.tree.structure(params)
    assert not act_quant.has_leaves(pc)
  pc, _ = compress.apply_spec(params, "none")
  np.testing.assert_array_equal(_logits(pc, tokens), ref)
  # mode leaves that select the float branch everywhere: the switch's float branch is
  # the plain matmul, bit for bit
  pq, _ = compress.apply_spec(params, "*@*:w8a8")
  zero = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if path[-1].key == act_quant.MODE_LEAF else a, pq)
  np.testing.assert_array_equal(_logits(zero, tokens), ref)
  np.testing.assert_array_equal(_logits(act_quant.strip(pq), tokens), ref)
  assert jax.tree.structure(act_quant.strip(pq)) == jax.tree.structure(params)


def test_w8a8_equals_hand_built_int8_matmul(params, tokens):
  pc, _ = compress.apply_spec(params, "down@1:w8a8")
  _, seen = _chain(pc, tokens, capture_layer=1)
  x = np.asarray(seen["x"], np.float32).reshape(-1, CFG.intermediate_size)
  w_OI = np.asarray(get_path(params, kernel_path("down"))[1]).T
  qx, ax = _np_absmax_int8(x)
  qw, aw = _np_absmax_int8(w_OI)
  acc = qx.astype(np.int64) @ qw.T.astype(np.int64)  # exact integer accumulation
  assert np.abs(acc).max() < 2**31
  y = acc.astype(np.float32) * (ax[:, None] * aw[None, :]) * np.float32(1 / 127**2)
  got = np.asarray(seen["y"]).reshape(y.shape)
  np.testing.assert_allclose(got, y, rtol=1e-6, atol=1e-9)
  float_y = x @ w_OI.T
  assert np.abs(got - float_y).max() > 1e-5 * np.abs(float_y).max()  # it is quantized


def test_llm_int8_equals_kernel_at_that_linear(params, tokens):
  _, seen_float = _chain(params, tokens, capture_layer=1)
  absx = np.abs(np.asarray(seen_float["x"])).reshape(-1, CFG.intermediate_size).max(0)
  threshold = float(np.quantile(absx, 0.9))  # about 10% outlier columns
  pc, _ = compress.apply_spec(params, f"down@1:llm_int8(threshold={threshold!r})")
  _, seen = _chain(pc, tokens, capture_layer=1)
  np.testing.assert_array_equal(seen["x"], seen_float["x"])  # layer-1 down input is float
  outliers = int((absx >= np.float32(threshold)).sum())
  assert 0 < outliers < CFG.intermediate_size
  w_OI = get_path(params, kernel_path("down"))[1].T
  want = int8.llm_int8_matmul(seen["x"], w_OI, threshold)
  np.testing.assert_allclose(seen["y"], want, rtol=1e-6, atol=1e-9)
  w8a8 = int8.w8a8_matmul(seen["x"], w_OI)
  assert np.abs(np.asarray(want) - np.asarray(w8a8)).max() > 0  # the decomposition matters


def test_method_on_layer_1_changes_only_layer_1(params, tokens):
  pc, _ = compress.apply_spec(params, "*@1:w8a8")
  float_layers, _ = _chain(params, tokens)
  q_layers, _ = _chain(pc, tokens)
  np.testing.assert_array_equal(q_layers[0], float_layers[0])
  assert np.abs(np.asarray(q_layers[1]) - np.asarray(float_layers[1])).max() > 1e-4
  # the scanned model reads layer l's mode at layer l
  np.testing.assert_allclose(_hidden(pc, tokens), q_layers[-1], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(_hidden(params, tokens)) - np.asarray(q_layers[-1])).max() > 1e-4
  # a later rule on another layer of the same kind keeps both
  p2, _ = compress.apply_spec(pc, "down@2:llm_int8(1.0)")
  mode = get_path(p2, kernel_path("down")[:-1] + (act_quant.MODE_LEAF,))
  np.testing.assert_array_equal(mode, [0, 1, 2])


def test_ste_gradient_flows_to_float_kernels(params, tokens):
  # exactly the float matmul's gradient at one linear
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 5, 16)) * 3, jnp.float32)
  w = jnp.asarray(rng.standard_normal((16, 8)) * 0.1, jnp.float32)
  c = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  for mode in (1, 2):
    act = (jnp.int32(mode), jnp.float32(4.0))
    gx, gw = jax.grad(lambda x, w: jnp.sum(act_quant.dot(x, w, jnp.float32, act) * c),
                      argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gw, jnp.einsum("bti,bto->io", x, c), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, c @ w.T, rtol=1e-5, atol=1e-6)
  # through the training path: the differentiated tree is the float params tree
  plan = masks_lib.make_plan("down@1:w8a8; q@0:llm_int8(0.05)", params)
  assert [k for k, _, _ in plan.activation] == ["q", "down"] and not plan.quantized

  def loss(p):
    return jnp.mean(Llama(CFG).apply({"params": masks_lib.quantize(plan, p, ste=True)},
                                     tokens) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for kind, layer in (("down", 1), ("q", 0)):
    g = np.asarray(get_path(grads, kernel_path(kind))[layer])
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_sequential_calibration_feeds_the_quantized_layer_forward(params):
  from dtm.compress import calibration
  windows = np.random.default_rng(3).integers(0, CFG.vocab_size, (4, 16))
  mixed, report = calibration.calibrate_and_compress(
      CFG, params, "down@0:w8a8; up@1:wanda(0.5)", windows, batch_size=4)
  alone, _ = calibration.calibrate_and_compress(CFG, params, "up@1:wanda(0.5)", windows,
                                                batch_size=4)
  assert report["L00.down"]["method"] == "w8a8" and report["L01.up"]["method"] == "wanda(rate=0.5)"
  want, _ = compress.apply_spec(alone, "down@0:w8a8")
  mode = (act_quant.MODE_LEAF,)
  np.testing.assert_array_equal(get_path(mixed, kernel_path("down")[:-1] + mode),
                                get_path(want, kernel_path("down")[:-1] + mode))
  np.testing.assert_array_equal(get_path(mixed, kernel_path("down")),
                                get_path(params, kernel_path("down")))
  # layer 1's statistics come from the w8a8 layer 0: its pruning differs
  up = kernel_path("up")
  assert not np.array_equal(get_path(mixed, up)[1] == 0, get_path(alone, up)[1] == 0)
