"""Sampled DTMs (dtm.sampling): shared Gumbel noise, teacher-forced FDT == free-running F'."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtm import compress, sampling
from dtm.errors import DtmError
from dtm.generate import greedy_generate
from dtm.model import init_params
from tests.tiny_model import TINY

P, C, N = 8, 12, 16


@pytest.fixture(scope="module")
def tiny():
  params = init_params(TINY, seed=3)
  params = {**params, "lm_head": jax.tree.map(lambda x: x * 20.0, params["lm_head"])}
  prompts = np.random.default_rng(1).integers(0, TINY.vocab_size, (P, C)).astype(np.int32)
  return params, prompts


S = sampling.Sampling(temperature=1.5, top_k=40, top_p=0.95, seed=7)


def test_identical_models_never_diverge(tiny):
  params, prompts = tiny
  y = sampling.sample_references(TINY, params, prompts, N, S, batch_size=4)
  out = sampling.sampled_divergence(TINY, params, prompts, y, S, batch_size=4)
  assert out["fdt"].tolist() == [N] * P
  assert out["sdt"].tolist() == [0.0] * P
  np.testing.assert_array_equal(out["samples"], y)
  # the continuation really is random: another seed gives other tokens
  y2 = sampling.sample_references(TINY, params, prompts, N, sampling.Sampling(1.5, 40, 0.95, 8), 4)
  assert (y2 != y).mean() > 0.2


@pytest.mark.parametrize("spec", ["mlp@*:magnitude(0.5)", "*@*:absmax(bits=3)",
                                  "q,k@0-1:nm(1,4)"])
def test_teacher_forced_fdt_equals_free_running_sampling(tiny, spec):
  params, prompts = tiny
  params_c, _ = compress.apply_spec(params, spec)
  y = sampling.sample_references(TINY, params, prompts, N, S, batch_size=4)
  out = sampling.sampled_divergence(TINY, params_c, prompts, y, S, batch_size=4)
  z = sampling.sample_references(TINY, params_c, prompts, N, S, batch_size=4)
  np.testing.assert_array_equal(out["fdt"], sampling.first_mismatch(y, z))
  assert out["fdt"].min() < N  # the compression does change some samples
  # before the first divergence the teacher-forced samples are F' 's own samples
  for p in range(P):
    f = out["fdt"][p]
    np.testing.assert_array_equal(out["samples"][p, :f + 1 if f < N else N], z[p, :f + 1])


def test_batching_does_not_change_the_noise(tiny):
  params, prompts = tiny
  a = sampling.sample_references(TINY, params, prompts, N, S, batch_size=8)
  b = sampling.sample_references(TINY, params, prompts, N, S, batch_size=3)
  np.testing.assert_array_equal(a, b)


def test_low_temperature_is_greedy(tiny):
  params, prompts = tiny
  greedy = np.asarray(greedy_generate(TINY, params, jnp.asarray(prompts), N))
  cold = sampling.sample_references(TINY, params, prompts, N, sampling.Sampling(1e-4, seed=1), 8)
  np.testing.assert_array_equal(cold, greedy)
  top1 = sampling.sample_references(TINY, params, prompts, N, sampling.Sampling(5.0, top_k=1), 8)
  np.testing.assert_array_equal(top1, greedy)


def _np_filter(logits, s):
  x = logits.astype(np.float64) / s.temperature
  keep = np.ones_like(x, bool)
  if s.top_k:
    keep &= x >= np.sort(x)[::-1][s.top_k - 1]
  if s.top_p < 1:  # on the top-k-filtered, renormalized distribution (HF's warper order)
    x = np.where(keep, x, -np.inf)
    order = np.argsort(-x, kind="stable")
    p = np.exp(x[order] - x.max())
    p /= p.sum()
    before = np.cumsum(p) - p
    kept = order[before < s.top_p]
    keep &= x >= x[kept].min()
  return np.where(keep, x, -np.inf)


@pytest.mark.parametrize("s", [sampling.Sampling(0.7, top_k=5), sampling.Sampling(1.3, top_p=0.6),
                               sampling.Sampling(1.0, top_k=10, top_p=0.8)])
def test_filter_matches_numpy(s):
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
  got = np.asarray(sampling.filtered_logits(jnp.asarray(logits), s))
  for row in range(4):
    want = _np_filter(logits[row], s)
    np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[row][fin], want[fin], rtol=1e-6)


def test_gumbel_max_samples_the_filtered_distribution():
  s = sampling.Sampling(0.8, top_k=6, top_p=0.97, seed=0)
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(12,)).astype(np.float32))
  draws = 20000
  noise = sampling.position_noise(0, jnp.arange(draws), 3, 12)  # one draw per "prompt"
  tokens = np.asarray(sampling.sample_token(jnp.broadcast_to(logits, (draws, 12)), noise, s))
  freq = np.bincount(tokens, minlength=12) / draws
  x = _np_filter(np.asarray(logits), s)
  p = np.exp(x - x.max())
  p /= p.sum()
  assert np.all(freq[p == 0] == 0)
  np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / draws).max() + 1e-3)


@pytest.mark.parametrize("kwargs, match", [({"temperature": 0.0}, "temperature"),
                                           ({"top_k": -1}, "top_k"),
                                           ({"top_p": 0.0}, "top_p"),
                                           ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_settings(kwargs, match):
  with pytest.raises(DtmError, match=match):
    sampling.Sampling(**kwargs)
