"""dtm.compress.site: one calibrated solve per input site equals one
`compress_calibrated` per kind (Wanda, SparseGPT unstructured and n:m, GPTQ)."""
import types

import jax.numpy as jnp
import numpy as np
import pytest

from dtm import compress as C
from dtm.components import Component
from dtm.compress import site


def _site(seed=0, in_dim=64, outs=(64, 16, 16)):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((512, in_dim)).astype(np.float32)
  x[:, 3] = 0  # a dead input
  kernels = {kind: jnp.asarray(rng.standard_normal((in_dim, o)).astype(np.float32))
             for kind, o in zip(("q", "k", "v"), outs)}
  stats = types.SimpleNamespace(hessian=jnp.asarray(x.T @ x), sq_norms=jnp.asarray((x * x).sum(0)))
  return kernels, stats


@pytest.mark.parametrize("method", [
    "wanda(0.5)", "wanda(2,4)", "sparsegpt(0.5,blocksize=32)", "sparsegpt(2,4,blocksize=16)",
    "gptq(4,group_size=16)", "gptq(4,group_size=16,act_order=True)", "gptq(8)"])
def test_site_equals_one_call_per_kind(method):
  method = C.parse_method(method)
  kernels, stats = _site()
  grids = method.name == "gptq"
  news, out = site.compress_site(kernels, method, stats, keep_grid=grids)
  for kind, kernel in kernels.items():
    want, want_stats = C.compress_calibrated(kernel, method, stats, Component(0, kind),
                                             kernel=True, keep_grid=grids)
    np.testing.assert_allclose(np.asarray(news[kind]), np.asarray(want), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(news[kind]) == 0, np.asarray(want) == 0)
    for key in ("sparsity", "bits", "damp"):
      if key in want_stats:
        assert float(out[kind][key]) == pytest.approx(float(want_stats[key]), abs=1e-6), key
    if grids:
      np.testing.assert_array_equal(np.asarray(out[kind]["grid"].codes),
                                    np.asarray(want_stats["grid"].codes))
  assert not site.failed({k: {n: np.asarray(v) for n, v in s.items() if n != "grid"}
                          for k, s in out.items()})
