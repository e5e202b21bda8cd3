"""Calibration statistics (dtm.compress.calibration) on a tiny random Llama.

The reference for the captured inputs is an independent float64 NumPy transcription of
the Llama decoder layer (RMSNorm, rotate-half RoPE, GQA causal attention, SwiGLU) run
on the same params: every site's sum_t x x^T and sum_t x^2 must match it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from dtm import compress as C
from dtm.components import KINDS, Component
from dtm.compress import calibration as cal
from dtm.compress import wanda as W
from dtm.errors import DtmError
from dtm.model import abstract_params
from dtm.model_config import ModelConfig

CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64)
N, T, BATCH = 8, 16, 4  # most calls take all N windows in one batch (a faster compile)


def random_params(cfg: ModelConfig, seed: int):
  """Random params of the model's tree (no init compile): kernels and embeddings
  normal(0.02), norm scales 1 + normal(0.1)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return (0.02 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(leaf(p, x)),
                                          abstract_params(cfg))


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=0)


@pytest.fixture(scope="module")
def windows():
  return np.random.default_rng(0).integers(0, CFG.vocab_size, (N, T)).astype(np.int32)


@pytest.fixture(scope="module")
def parallel(params, windows):
  return cal.collect_statistics(CFG, params, windows, batch_size=N)


# ------------------------------------------------------------------- NumPy reference layer


def np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x_BTHK, theta):
  k = x_BTHK.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, k, 2) / k)
  freqs = np.arange(x_BTHK.shape[1])[:, None] * inv_freq[None, :]
  cos, sin = np.cos(freqs)[None, :, None, :], np.sin(freqs)[None, :, None, :]
  x1, x2 = np.split(x_BTHK, 2, axis=-1)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_layer(p, h, cfg):
  """One decoder layer in float64 -> (h', {site: input [B, T, in]})."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, t, _ = h.shape
  hq, hkv, kd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  x = np_rms(h, p["attn_norm"]["scale"], cfg.rms_norm_eps)
  q = np_rope((x @ p["attn"]["q"]["kernel"]).reshape(b, t, hq, kd), cfg.rope_theta)
  k = np_rope((x @ p["attn"]["k"]["kernel"]).reshape(b, t, hkv, kd), cfg.rope_theta)
  v = (x @ p["attn"]["v"]["kernel"]).reshape(b, t, hkv, kd)
  k, v = np.repeat(k, hq // hkv, axis=2), np.repeat(v, hq // hkv, axis=2)  # HF repeat_kv
  scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(kd)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = np.einsum("bhts,bshk->bthk", probs, v).reshape(b, t, hq * kd)
  h = h + attn @ p["attn"]["o"]["kernel"]
  y = np_rms(h, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
  gate, up = y @ p["mlp"]["gate"]["kernel"], y @ p["mlp"]["up"]["kernel"]
  down_in = gate / (1 + np.exp(-gate)) * up
  h = h + down_in @ p["mlp"]["down"]["kernel"]
  return h, {"attn_in": x, "o_in": attn, "mlp_in": y, "down_in": down_in}


def assert_stats_close(got: cal.InputStats, x_BTI: np.ndarray, rtol: float):
  x = x_BTI.reshape(-1, x_BTI.shape[-1])
  h_ref = x.T @ x
  np.testing.assert_allclose(np.asarray(got.hessian), h_ref, rtol=rtol,
                             atol=rtol * np.abs(h_ref).max())
  np.testing.assert_allclose(np.asarray(got.sq_norms), np.sum(x * x, axis=0), rtol=rtol)


# ------------------------------------------------------------------------------------ tests


def test_statistics_equal_float64_reference(params, windows, parallel):
  assert list(parallel) == [Component(l, k) for l in range(3) for k in KINDS]
  h = np.asarray(params["embed"]["embedding"], np.float64)[windows]
  for layer in range(CFG.num_layers):
    h, xs = np_layer(cal.layer_params(params, layer), h, CFG)
    for kind in KINDS:
      got = parallel[Component(layer, kind)]
      assert got.tokens == N * T and got.windows == N
      assert_stats_close(got, xs[cal.SITE_OF_KIND[kind]], rtol=2e-5)
  st = parallel[Component(0, "down")]
  assert st.sq_norms.dtype == np.float32 and st.hessian.shape == (64, 64)
  np.testing.assert_allclose(np.asarray(st.reference_hessian), np.asarray(st.hessian) * 2 / N)
  np.testing.assert_allclose(np.asarray(st.wanda_scaler), np.asarray(st.sq_norms) / N)
  # shared sites are one object; hessian=False collects only the squared norms
  assert parallel[Component(1, "q")] is parallel[Component(1, "v")]
  only = cal.collect_statistics(CFG, params, windows, batch_size=N, hessian=False, layers={1})
  assert sorted({c.layer for c in only}) == [1] and only[Component(1, "o")].hessian is None
  np.testing.assert_allclose(np.asarray(only[Component(1, "o")].sq_norms),
                             np.asarray(parallel[Component(1, "o")].sq_norms), rtol=1e-6)


def _shrink(kernels, rows=slice(None)):
  """A stand-in compression: kernels (any tree of them) with their first 8 input rows
  zeroed, on the layers `rows` of a stacked kernel (cheap: no per-shape compile)."""
  return jax.tree.map(lambda k: k.at[rows, :8].set(0) if k.ndim == 3 else k.at[:8].set(0),
                      kernels)


def _shrink_layer(layer, lp, stats):
  return {**lp, "attn": {**lp["attn"], **_shrink({k: lp["attn"][k] for k in "qkvo"})},
          "mlp": _shrink(lp["mlp"])}


def _shrink_below(params, layer):
  """params with layers < layer compressed by `_shrink`."""
  rows = slice(0, layer)
  layers = params["layers"]
  return {**params, "layers": {**layers, "attn": _shrink(layers["attn"], rows),
                               "mlp": _shrink(layers["mlp"], rows)}}


def test_sequential_sees_the_compressed_layers_below(params, windows, parallel):
  seq = cal.collect_statistics(CFG, params, windows, mode="sequential", batch_size=N,
                               compress_layer=_shrink_layer)
  for kind in KINDS:  # layer 0: the same input, the same original layer
    np.testing.assert_array_equal(np.asarray(seq[Component(0, kind)].hessian),
                                  np.asarray(parallel[Component(0, kind)].hessian))
  for layer in (1, 2):
    for kind in KINDS:
      assert not np.allclose(np.asarray(seq[Component(layer, kind)].hessian),
                             np.asarray(parallel[Component(layer, kind)].hessian), rtol=1e-3)
    # exactly: layer l's statistics are those of the model with layers < l compressed
    ref = cal.collect_statistics(CFG, _shrink_below(params, layer), windows, batch_size=N,
                                 layers={layer})
    for kind in KINDS:
      np.testing.assert_allclose(np.asarray(seq[Component(layer, kind)].hessian),
                                 np.asarray(ref[Component(layer, kind)].hessian),
                                 rtol=1e-5, atol=1e-5)
  # a callback that keeps every layer: sequential == parallel, bit for bit
  same = cal.collect_statistics(CFG, params, windows, mode="sequential", batch_size=N,
                                compress_layer=lambda l, lp, s: lp)
  for comp, st in parallel.items():
    np.testing.assert_array_equal(np.asarray(same[comp].hessian), np.asarray(st.hessian))


def test_batches_accumulate(params, windows, parallel):
  whole = cal.collect_statistics(CFG, params, windows, batch_size=BATCH, layers={2})
  for kind in ("q", "o", "up", "down"):
    comp = Component(2, kind)
    np.testing.assert_allclose(np.asarray(whole[comp].hessian),
                               np.asarray(parallel[comp].hessian), rtol=1e-5, atol=1e-5)


def test_calibrate_and_compress_is_layer_by_layer(params, windows):
  """The sequential procedure equals, layer by layer: statistics of layer l on the model
  compressed so far (parallel mode), then layer l's components compressed with them."""
  spec = "*@*:wanda(0.5); down@1:sparsegpt(2,4); q@2:nm(2,4); o@2:identity"
  new, report = cal.calibrate_and_compress(CFG, params, spec, windows, batch_size=N)
  resolved = C.parse_spec(spec).resolve(CFG.num_layers)
  current = jax.tree.map(np.array, params)  # host copy, updated layer by layer
  for layer in range(CFG.num_layers):
    stats = cal.collect_statistics(CFG, current, windows, batch_size=N, layers={layer})
    for comp in (c for c in resolved if c.layer == layer):
      kernel = C.get_path(current, C.kernel_path(comp.kind))
      method = resolved[comp]
      if method.name in C.CALIBRATED_METHODS:
        w, _ = C.compress_calibrated(kernel[layer], method, stats[comp], comp, kernel=True)
      else:
        w, _ = C.compress_kernel(jnp.asarray(kernel[layer]), method)
      kernel[layer] = np.asarray(w)
  for kind in KINDS:
    got, want = (np.asarray(C.get_path(p, C.kernel_path(kind))) for p in (new, current))
    np.testing.assert_array_equal(got == 0, want == 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert report["L01.down"]["method"] == "sparsegpt(n=2,m=4,percdamp=0.01,blocksize=128)"
  assert report["L01.down"]["damp"] == 0.01 and report["L01.down"]["sparsity"] == 0.5
  assert report["L02.q"]["method"] == "nm(n=2,m=4)" and "L02.o" not in report
  assert len(report) == 20 and all(r["sparsity"] == 0.5 for r in report.values())
  np.testing.assert_array_equal(np.asarray(new["layers"]["attn"]["o"]["kernel"][2]),
                                np.asarray(params["layers"]["attn"]["o"]["kernel"][2]))


def test_apply_spec_with_parallel_statistics(params, parallel):
  new, report = C.apply_spec(params, "up@1:wanda(2,4)", calibration=parallel)
  comp = Component(1, "up")
  want = W.wanda(params["layers"]["mlp"]["up"]["kernel"][1].T, parallel[comp].sq_norms, n=2, m=4)
  np.testing.assert_array_equal(np.asarray(new["layers"]["mlp"]["up"]["kernel"][1]),
                                np.asarray(want.T))
  assert report == {"L01.up": {"method": "wanda(n=2,m=4)", "sparsity": 0.5, "bits": 32}}
  with pytest.raises(DtmError, match=r"wanda \(L01\.up, \.\.\.\) needs calibration statistics: "
                                     r"pass apply_spec\(\.\.\., calibration="):
    C.apply_spec(params, "up@1:wanda(2,4)")
  only0 = {c: s for c, s in parallel.items() if c.layer == 0}
  with pytest.raises(DtmError, match=r"calibration statistics are missing for L01\.up"):
    C.apply_spec(params, "up@1:wanda(2,4)", calibration=only0)
  no_h = {c: cal.InputStats(s.sq_norms, None, s.tokens, s.windows) for c, s in parallel.items()}
  with pytest.raises(DtmError, match="needs the calibration statistic 'hessian'"):
    C.apply_spec(params, "q@0:sparsegpt(0.5)", calibration=no_h)
  bad = {c: cal.InputStats(s.sq_norms, -s.hessian, s.tokens, s.windows)
         for c, s in parallel.items()}
  with pytest.raises(DtmError, match=r"Hessian of L00\.q is not positive definite"):
    C.apply_spec(params, "q@0:sparsegpt(0.5)", calibration=bad)


def test_calibration_windows_and_errors(tmp_path, params, windows):
  stream = np.arange(100, dtype=np.int32)
  got = cal.calibration_windows(stream, samples=4, length=20, seed=1)
  assert got.shape == (4, 20) and np.all(np.diff(got, axis=1) == 1)
  np.testing.assert_array_equal(got, cal.calibration_windows(stream, samples=4, length=20, seed=1))
  with pytest.raises(DtmError, match=r"not enough calibration data: 6 windows of 20 tokens need "
                                     r"120 stream tokens, the corpus has 100"):
    cal.calibration_windows(stream, samples=6, length=20, seed=0)
  path = tmp_path / "calib.jsonl"
  path.write_text("".join(json.dumps({"ids": list(range(i, i + 5))}) + "\n" for i in range(3)))
  np.testing.assert_array_equal(cal.read_calibration_jsonl(path, samples=2, length=5)[1],
                                [1, 2, 3, 4, 5])
  with pytest.raises(DtmError, match=r"not enough calibration data: .*calib.jsonl has 3 rows "
                                     r"of 5 tokens, 4 are needed"):
    cal.read_calibration_jsonl(path, samples=4, length=5)
  with open(path, "a") as f:
    f.write(json.dumps({"ids": [1, 2, 3]}) + "\n")
  with pytest.raises(DtmError, match=r"calib.jsonl:4: row has 3 ids but calibration.length is 5"):
    cal.read_calibration_jsonl(path, samples=2, length=5)
  with pytest.raises(DtmError, match=r"batch_size=3 must divide the number of calibration "
                                     r"windows \(8\)"):
    cal.collect_statistics(CFG, params, windows, batch_size=3)
  with pytest.raises(DtmError, match=r"token ids must be in \[0, 128\) .* from \d+ to 128"):
    cal.collect_statistics(CFG, params, windows + 1, batch_size=N)
  with pytest.raises(DtmError, match="windows of 65 tokens exceed the model's context of 64"):
    cal.collect_statistics(CFG, params, np.zeros((N, 65), np.int32), batch_size=N)
  with pytest.raises(DtmError, match="calibration mode must be one of parallel, sequential"):
    cal.collect_statistics(CFG, params, windows, mode="serial")
  with pytest.raises(DtmError, match="sequential calibration needs a compress_layer"):
    cal.collect_statistics(CFG, params, windows, mode="sequential")


def test_sharded_over_8_devices_equals_one_device(tmp_path):
  """The window axis sharded over 8 simulated CPU devices (XLA all-reduces the sums)
  gives the statistics of one device, in sequential mode (a compressed layer 0)."""
  script = textwrap.dedent(f"""
      import numpy as np, jax
      from jax.sharding import Mesh, PartitionSpec
      from dtm.compress import calibration as cal
      from dtm.components import Component
      from dtm.model_config import ModelConfig
      from test_calibration import random_params
      assert len(jax.devices()) == 8
      cfg = ModelConfig(**{CFG.__dict__!r})
      params = random_params(cfg, seed=0)
      windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (16, {T}))
      mesh = Mesh(np.array(jax.devices()), ("data",))
      def shrink(layer, lp, stats):  # a stand-in compression of layer 0
        return jax.tree.map(lambda a: a * 0.5 if a.ndim == 2 else a, lp) if layer == 0 else lp
      kw = dict(mode="sequential", compress_layer=shrink, layers={{0, 1}})
      one = cal.collect_statistics(cfg, params, windows, batch_size=16, **kw)
      many = cal.collect_statistics(cfg, params, windows, batch_size=8, mesh=mesh, **kw)
      assert sorted({{c.layer for c in many}}) == [0, 1]
      for comp, st in one.items():
        np.testing.assert_allclose(np.asarray(many[comp].hessian), np.asarray(st.hessian),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(many[comp].sq_norms), np.asarray(st.sq_norms),
                                   rtol=1e-5)
      h = cal.run_layers(cfg, params, windows, shrink, batch_size=8, mesh=mesh,
                         stats_layers={{0}})
      assert h.sharding.spec == PartitionSpec("data"), h.sharding
      print("OK")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO / "tests", env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
