"""Tests for dtm.metrics: hand-computed cases, numpy references, jit/vmap, bf16."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtm import metrics
from dtm.errors import DtmError


def _one_hot_logits(pred_BN: np.ndarray, vocab: int, scale: float = 5.0) -> np.ndarray:
  """Logits [B, N, V] whose argmax at each position is pred_BN."""
  return scale * np.eye(vocab, dtype=np.float32)[pred_BN]


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


# ----------------------------------------------------------------------------
# FDT / SDT
# ----------------------------------------------------------------------------

def test_fdt_sdt_hand_cases():
  divergent = np.array([
      [1, 0, 0, 0, 0],  # first position divergent
      [0, 0, 0, 0, 1],  # last position divergent
      [0, 0, 0, 0, 0],  # none
      [1, 1, 1, 1, 1],  # all
      [0, 1, 0, 1, 1],  # FDT 1, SDT 3/5
  ], dtype=bool)
  fdt, sdt = metrics.fdt_sdt_from_divergent(divergent)
  assert fdt.dtype == jnp.int32 and sdt.dtype == jnp.float32
  np.testing.assert_array_equal(fdt, [0, 4, 5, 0, 1])
  np.testing.assert_allclose(sdt, [0.2, 0.2, 0.0, 1.0, 0.6], rtol=1e-6)


def test_divergence_stats_hand_cases():
  vocab = 7
  targets = np.array([[3, 1, 4, 1], [5, 2, 6, 0], [1, 1, 1, 1]], dtype=np.int32)
  pred = targets.copy()
  pred[0, 0] = 2            # first divergent; then matches, then last differs
  pred[0, 3] = 0
  pred[1, 2] = 0            # FDT 2, SDT 1/4
  logits = _one_hot_logits(pred, vocab)
  stats = metrics.divergence_stats(logits, targets)
  assert set(stats) == {"fdt", "sdt", "nll"}
  np.testing.assert_array_equal(stats["fdt"], [0, 2, 4])
  np.testing.assert_allclose(stats["sdt"], [0.5, 0.25, 0.0], rtol=1e-6)
  assert stats["nll"].shape == (3, 4) and stats["nll"].dtype == jnp.float32


def test_identity_gives_full_fdt_zero_sdt():
  rng = np.random.default_rng(0)
  targets = rng.integers(0, 50, size=(4, 9)).astype(np.int32)
  logits = rng.normal(size=(4, 9, 50)).astype(np.float32)
  # Make the target the strict maximum everywhere.
  np.put_along_axis(logits, targets[..., None], logits.max(-1, keepdims=True) + 1.0, axis=-1)
  stats = metrics.divergence_stats(logits, targets, base_logits_BNV=logits)
  np.testing.assert_array_equal(stats["fdt"], [9] * 4)
  np.testing.assert_array_equal(stats["sdt"], [0.0] * 4)
  np.testing.assert_allclose(stats["kl"], 0.0, atol=1e-6)
  assert bool(np.all(stats["top1_agree"]))


def test_argmax_tie_takes_first_index():
  # Tokens 1 and 2 tie for the max: argmax -> 1. Target 2 diverges, target 1 does not.
  logits = np.array([[[0.0, 3.0, 3.0], [0.0, 3.0, 3.0]]], dtype=np.float32)
  stats = metrics.divergence_stats(logits, np.array([[1, 2]], dtype=np.int32))
  np.testing.assert_array_equal(stats["fdt"], [1])
  np.testing.assert_allclose(stats["sdt"], [0.5])


def test_property_against_brute_force():
  rng = np.random.default_rng(1)
  stats_fn = jax.jit(metrics.divergence_stats)  # one compile per shape
  for b, n, v in [(64, 1, 2), (64, 5, 3), (64, 8, 4)]:
    # Small integer logits: ties happen often and exercise first-max semantics.
    logits = rng.integers(-2, 3, size=(b, n, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, n)).astype(np.int32)
    stats = jax.device_get(stats_fn(logits, targets))
    for i in range(b):
      divergent = []
      for j in range(n):
        row = list(logits[i, j])
        first_max = row.index(max(row))
        divergent.append(first_max != targets[i, j])
      expected_fdt = next((j for j in range(n) if divergent[j]), n)
      assert int(stats["fdt"][i]) == expected_fdt
      assert math.isclose(float(stats["sdt"][i]), sum(divergent) / n, rel_tol=1e-6)


# ----------------------------------------------------------------------------
# FDT_alpha
# ----------------------------------------------------------------------------

def test_fdt_alpha_hand_cases():
  fdt = np.array([0, 2, 2, 5, 7, 7, 7, 9, 10, 10])  # P = 10, N = 10
  # alpha=1.0: all prompts must have FDT >= t -> min = 0.
  assert metrics.fdt_alpha(fdt, 1.0) == 0
  # alpha=0.9: 9 prompts needed; 9th largest = 2 (count(FDT>=2)=9, count(FDT>=3)=7).
  assert metrics.fdt_alpha(fdt, 0.9) == 2
  # alpha=0.75: 8 prompts needed (7.5 -> 8); 8th largest = 2.
  assert metrics.fdt_alpha(fdt, 0.75) == 2
  # alpha=0.7: exactly 7 prompts suffice; 7th largest = 5 (count(FDT>=5)=7).
  assert metrics.fdt_alpha(fdt, 0.7) == 5
  # alpha=0.5: 5 prompts; 5th largest = 7 (count(FDT>=7)=6, count(FDT>=8)=3).
  assert metrics.fdt_alpha(fdt, 0.5) == 7
  # alpha=0.2: 2 prompts; count(FDT>=10)=2 -> 10 = N.
  assert metrics.fdt_alpha(fdt, 0.2) == 10
  # tiny alpha: 1 prompt -> max.
  assert metrics.fdt_alpha(fdt, 1e-9) == 10


def test_fdt_alpha_edge_cases():
  # All equal: every alpha gives that value.
  for alpha in (1e-3, 0.5, 0.75, 0.9, 1.0):
    assert metrics.fdt_alpha(np.full(7, 3), alpha) == 3
  # All zero (every prompt diverges at once) and all N (no divergence).
  assert metrics.fdt_alpha(np.zeros(4, int), 0.9) == 0
  assert metrics.fdt_alpha(np.full(4, 16), 0.9) == 16
  # Single prompt.
  assert metrics.fdt_alpha(np.array([6]), 0.75) == 6
  # Three prompts, alpha = 2/3 exactly in float: 2 prompts suffice.
  assert metrics.fdt_alpha(np.array([1, 4, 8]), 2 / 3) == 4
  # Order does not matter.
  assert metrics.fdt_alpha(np.array([8, 1, 4]), 2 / 3) == 4
  with pytest.raises(ValueError):
    metrics.fdt_alpha(np.array([1, 2]), 0.0)
  with pytest.raises(ValueError):
    metrics.fdt_alpha(np.array([1, 2]), 1.5)
  with pytest.raises(ValueError):
    metrics.fdt_alpha(np.array([], int), 0.5)


def test_fdt_alpha_matches_definition_brute_force():
  rng = np.random.default_rng(2)
  for _ in range(200):
    n = int(rng.integers(0, 12))
    fdt = rng.integers(0, n + 1, size=int(rng.integers(1, 15)))
    alpha = float(rng.choice([0.1, 0.25, 1 / 3, 0.5, 0.6, 0.75, 0.9, 1.0, rng.uniform(1e-3, 1)]))
    p = fdt.size
    expected = max(t for t in range(n + 1) if np.sum(fdt >= t) / p >= alpha)
    assert metrics.fdt_alpha(fdt, alpha) == expected


# ----------------------------------------------------------------------------
# NLL / DPPL / KL against numpy
# ----------------------------------------------------------------------------

def _random_case(seed: int, b: int = 3, n: int = 6, v: int = 11):
  rng = np.random.default_rng(seed)
  logits = (2 * rng.normal(size=(b, n, v))).astype(np.float32)
  base = (2 * rng.normal(size=(b, n, v))).astype(np.float32)
  targets = np.argmax(base, axis=-1).astype(np.int32)  # y = greedy tokens of F
  return logits, targets, base


def test_nll_and_dppl_match_numpy():
  logits, targets, _ = _random_case(3)
  stats = metrics.divergence_stats(logits, targets)
  logp = _np_log_softmax(logits)
  nll_ref = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(stats["nll"], nll_ref, rtol=1e-5, atol=1e-6)
  agg = metrics.aggregate(jax.device_get(stats))
  np.testing.assert_allclose(agg["nll_mean"], nll_ref.mean(), rtol=1e-6)
  np.testing.assert_allclose(agg["dppl"], np.exp(nll_ref.mean()), rtol=1e-5)


def test_kl_and_top1_match_numpy():
  logits, targets, base = _random_case(4)
  stats = metrics.divergence_stats(logits, targets, base_logits_BNV=base)
  logp, logq = _np_log_softmax(base), _np_log_softmax(logits)
  kl_ref = np.sum(np.exp(logp) * (logp - logq), axis=-1)
  np.testing.assert_allclose(stats["kl"], kl_ref, rtol=1e-5, atol=1e-6)
  agree_ref = np.argmax(logits, -1) == np.argmax(base, -1)
  np.testing.assert_array_equal(stats["top1_agree"], agree_ref)
  agg = metrics.aggregate(jax.device_get(stats))
  np.testing.assert_allclose(agg["kl_mean"], kl_ref.mean(), rtol=1e-5)
  np.testing.assert_allclose(agg["kl_median"], np.median(kl_ref), rtol=1e-5)
  np.testing.assert_allclose(agg["kl_p99"], np.percentile(kl_ref, 99), rtol=1e-5)
  np.testing.assert_allclose(agg["top1_agree"], agree_ref.mean())


def test_kl_zero_probability_base_tokens():
  # Base puts zero mass (-inf logit) on token 2; F' puts -inf there too: KL stays finite.
  base = np.array([[[0.0, 1.0, -np.inf]]], dtype=np.float32)
  logits = np.array([[[0.5, 0.5, -np.inf]]], dtype=np.float32)
  stats = metrics.divergence_stats(logits, np.array([[1]], np.int32), base_logits_BNV=base)
  p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
  np.testing.assert_allclose(stats["kl"], [[np.sum(p * np.log(p / 0.5))]], rtol=1e-5)


def test_aggregate_keys_and_values():
  per_prompt = {
      "fdt": np.array([0, 4, 4, 8]),
      "sdt": np.array([1.0, 0.5, 0.25, 0.0], np.float32),
      "nll": np.log(np.array([[2.0, 2.0], [2.0, 2.0], [2.0, 2.0], [2.0, 2.0]])),
  }
  agg = metrics.aggregate(per_prompt, alphas=(0.5, 0.75, 1.0))
  assert set(agg) == {"fdt_mean", "fdt_median", "fdt_alpha_0.5", "fdt_alpha_0.75",
                      "fdt_alpha_1", "sdt_mean", "nll_mean", "dppl"}
  assert agg["fdt_mean"] == 4.0 and agg["fdt_median"] == 4.0
  assert agg["fdt_alpha_0.5"] == 4.0   # 2 prompts: 2nd largest = 4
  assert agg["fdt_alpha_0.75"] == 4.0  # 3 prompts: 3rd largest = 4
  assert agg["fdt_alpha_1"] == 0.0
  assert agg["sdt_mean"] == pytest.approx(0.4375)
  assert agg["dppl"] == pytest.approx(2.0)
  default = metrics.aggregate(per_prompt)
  assert "fdt_alpha_0.75" in default and "fdt_alpha_0.9" in default
  assert default["fdt_alpha_0.9"] == 0.0  # needs all 4 (3.6 -> 4)


def test_aggregate_rejects_nan():
  per_prompt = {"fdt": np.array([1]), "sdt": np.array([0.0]), "nll": np.array([[np.nan]])}
  with pytest.raises(DtmError):
    metrics.aggregate(per_prompt)


# ----------------------------------------------------------------------------
# Context-aware perplexity
# ----------------------------------------------------------------------------

def _np_context_nll(logits, tokens, ctx):
  logp = _np_log_softmax(logits)
  b, t = tokens.shape
  sums, counts = np.zeros(b), np.zeros(b, int)
  for i in range(b):
    c = ctx[i] if np.ndim(ctx) else ctx
    for pos in range(max(c, 1), t):
      sums[i] -= logp[i, pos - 1, tokens[i, pos]]
      counts[i] += 1
  return sums, counts


def test_context_ppl_ctx1_is_ordinary_ppl():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 8, 13)).astype(np.float32)
  tokens = rng.integers(0, 13, size=(2, 8)).astype(np.int32)
  nll_sum, count = metrics.context_nll(logits, tokens, ctx=1)
  np.testing.assert_array_equal(count, [7, 7])
  logp = _np_log_softmax(logits)
  nll_ref = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(nll_sum, nll_ref.sum(-1), rtol=1e-5)
  np.testing.assert_allclose(metrics.perplexity(nll_sum, count), np.exp(nll_ref.mean()),
                             rtol=1e-5)


def test_context_ppl_excludes_first_positions():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 8, 13)).astype(np.float32)
  tokens = rng.integers(0, 13, size=(2, 8)).astype(np.int32)
  nll_sum, count = metrics.context_nll(logits, tokens, ctx=5)
  np.testing.assert_array_equal(count, [3, 3])  # positions 5, 6, 7
  ref_sum, _ = _np_context_nll(logits, tokens, 5)
  np.testing.assert_allclose(nll_sum, ref_sum, rtol=1e-5)
  # Changing logits rows < ctx-1 (predicting positions < ctx) does not change the result.
  perturbed = logits.copy()
  perturbed[:, :4] += rng.normal(size=perturbed[:, :4].shape).astype(np.float32)
  nll_sum2, _ = metrics.context_nll(perturbed, tokens, ctx=5)
  np.testing.assert_allclose(nll_sum2, nll_sum, rtol=1e-6)


def test_context_ppl_sliding_window_ctx_array_and_mask():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(3, 6, 5)).astype(np.float32)
  tokens = rng.integers(0, 5, size=(3, 6)).astype(np.int32)
  ctx = np.array([1, 3, 0], np.int32)  # first window scores all; 0 behaves like 1
  nll_sum, count = metrics.context_nll(logits, tokens, ctx=ctx)
  ref_sum, ref_count = _np_context_nll(logits, tokens, ctx)
  np.testing.assert_array_equal(count, [5, 3, 5])
  np.testing.assert_array_equal(count, ref_count)
  np.testing.assert_allclose(nll_sum, ref_sum, rtol=1e-5)
  # Padding mask: last two tokens of window 0 are padding.
  mask = np.ones((3, 6), bool)
  mask[0, 4:] = False
  nll_sum_m, count_m = metrics.context_nll(logits, tokens, ctx=ctx, mask_BT=mask)
  np.testing.assert_array_equal(count_m, [3, 3, 5])
  ref_sum_m, _ = _np_context_nll(logits[:, :4], tokens[:, :4], 1)
  np.testing.assert_allclose(nll_sum_m[0], ref_sum_m[0], rtol=1e-5)


def test_ppl_nearly_equal_while_every_token_diverges():
  """The paper's motivating failure of perplexity: PPL ~ equal, SDT = 1, FDT = 0."""
  eps = 1e-4
  n, v = 6, 4
  tokens = np.array([[0, 1, 2, 3, 0, 1, 2]], np.int32)  # T = n + 1; targets tokens[1:]
  targets = tokens[:, 1:]
  other = (targets + 1) % v
  base = np.full((1, n + 1, v), -30.0, np.float32)
  comp = np.full((1, n + 1, v), -30.0, np.float32)
  rows = np.arange(n)
  # Base: target just above the runner-up. Compressed: target just below.
  base[0, rows, targets[0]] = eps
  base[0, rows, other[0]] = 0.0
  comp[0, rows, targets[0]] = 0.0
  comp[0, rows, other[0]] = eps
  ppl_base = metrics.perplexity(*metrics.context_nll(base, tokens, ctx=1))
  ppl_comp = metrics.perplexity(*metrics.context_nll(comp, tokens, ctx=1))
  assert abs(ppl_base - ppl_comp) < 1e-3
  assert ppl_base == pytest.approx(2.0, rel=1e-3)
  stats = metrics.divergence_stats(comp[:, :n], targets, base_logits_BNV=base[:, :n])
  np.testing.assert_array_equal(stats["fdt"], [0])
  np.testing.assert_array_equal(stats["sdt"], [1.0])
  assert not bool(np.any(stats["top1_agree"]))
  base_stats = metrics.divergence_stats(base[:, :n], targets)
  np.testing.assert_array_equal(base_stats["fdt"], [n])


# ----------------------------------------------------------------------------
# jit / vmap / bfloat16
# ----------------------------------------------------------------------------

def _assert_tree_close(a, b, rtol=1e-6, atol=1e-6):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_allclose(np.asarray(a[key], np.float64), np.asarray(b[key], np.float64),
                               rtol=rtol, atol=atol, err_msg=key)


def test_jit_matches_eager():
  logits, targets, base = _random_case(8)
  eager = metrics.divergence_stats(logits, targets, base)
  jitted = jax.jit(metrics.divergence_stats)(logits, targets, base)
  _assert_tree_close(eager, jitted)
  eager_nobase = metrics.divergence_stats(logits, targets)
  _assert_tree_close(eager_nobase, jax.jit(metrics.divergence_stats)(logits, targets))
  tokens = np.concatenate([targets, targets[:, :1]], axis=1)
  logits_t = np.concatenate([logits, logits[:, :1]], axis=1)
  ctx = np.array([1, 2, 4], np.int32)
  _assert_tree_close(dict(zip("sc", metrics.context_nll(logits_t, tokens, ctx))),
                     dict(zip("sc", jax.jit(metrics.context_nll)(logits_t, tokens, ctx))))


def test_vmap_over_probe_axis_matches_loop():
  rng = np.random.default_rng(9)
  probes, b, n, v = 4, 3, 5, 7
  logits = rng.normal(size=(probes, b, n, v)).astype(np.float32)
  base = rng.normal(size=(b, n, v)).astype(np.float32)
  targets = np.argmax(base, -1).astype(np.int32)
  fn = jax.jit(jax.vmap(metrics.divergence_stats, in_axes=(0, None, None)))
  batched = fn(logits, targets, base)
  for k in range(probes):
    single = metrics.divergence_stats(logits[k], targets, base)
    _assert_tree_close(single, jax.tree.map(lambda x: x[k], batched))
  fdt, sdt = jax.vmap(metrics.fdt_sdt_from_divergent)(logits.argmax(-1) != targets)
  assert fdt.shape == (probes, b) and sdt.shape == (probes, b)


def test_bfloat16_inputs_computed_in_float32():
  logits, targets, base = _random_case(10)
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  base_bf16 = jnp.asarray(base, jnp.bfloat16)
  stats = jax.jit(metrics.divergence_stats)(logits_bf16, targets, base_bf16)
  assert stats["sdt"].dtype == jnp.float32
  assert stats["nll"].dtype == jnp.float32 and stats["kl"].dtype == jnp.float32
  # Reference: the same bf16-rounded values, upcast, computed in float32.
  ref = metrics.divergence_stats(np.asarray(logits_bf16, np.float32), targets,
                                 np.asarray(base_bf16, np.float32))
  _assert_tree_close(stats, ref, rtol=1e-5, atol=1e-5)
  nll_sum, count = metrics.context_nll(logits_bf16, targets, ctx=2)
  assert nll_sum.dtype == jnp.float32 and count.dtype == jnp.int32


@pytest.mark.parametrize("vocab, chunk", [(1000, 256), (1024, 256), (999, 1000)])
def test_fused_head_stats_equal_unfused(vocab, chunk):
  """LM head fused with the statistics over vocab chunks (padding masked) equals
  divergence_stats on the materialised logits; ties resolve to the lowest index; the
  KL through the head-reduced base (HeadBase) equals the KL over all V logits."""
  rng = np.random.default_rng(vocab)
  x = rng.normal(size=(3, 5, 16)).astype(np.float32)
  head = (rng.integers(-2, 3, size=(vocab, 16)) * 0.5).astype(np.float32)  # many exact ties
  head[7] = head[700 % vocab]  # duplicate rows: exactly tied logits across chunks
  logits = np.asarray(metrics.head_logits(jnp.asarray(x), jnp.asarray(head), vocab_chunk=chunk))
  np.testing.assert_allclose(logits, np.einsum("bnd,vd->bnv", x, head), atol=1e-5)
  targets = np.argmax(logits, -1).astype(np.int32)
  targets[0, 2] = (targets[0, 2] + 1) % vocab
  x_base = x + 0.3 * rng.normal(size=x.shape).astype(np.float32)  # the "base model"
  base_logits = np.einsum("bnd,vd->bnv", x_base, head)
  base = metrics.head_base(jnp.asarray(x_base), jnp.asarray(head), vocab_chunk=chunk)
  fused = metrics.head_divergence_stats(jnp.asarray(x), jnp.asarray(head), targets, base,
                                        vocab_chunk=chunk)
  plain = metrics.divergence_stats(logits, targets, base_logits)
  for key in ("fdt", "sdt", "top1_agree"):
    np.testing.assert_array_equal(fused[key], plain[key])
  for key in ("nll", "kl"):
    np.testing.assert_allclose(fused[key], plain[key], rtol=1e-5, atol=1e-5)
  assert float(np.min(plain["kl"])) > 1e-3  # the KL check is not vacuous


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_base_matches_numpy(dtype):
  """HeadBase fields against float64 numpy on the (dtype-rounded) head: lse, argmax,
  x and Σ p W; and the same model against itself gives KL = 0."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 4, 24)).astype(np.float32)
  head = rng.normal(size=(777, 24)).astype(np.float32)
  base = metrics.head_base(jnp.asarray(x), jnp.asarray(head), vocab_chunk=100, dtype=dtype)
  xr = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)
  hr = np.asarray(jnp.asarray(head).astype(dtype).astype(jnp.float32), np.float64)
  b = np.einsum("bnd,vd->bnv", xr, hr)
  lse = np.log(np.sum(np.exp(b - b.max(-1, keepdims=True)), -1)) + b.max(-1)
  p = np.exp(b - lse[..., None])
  np.testing.assert_allclose(base.lse, lse, rtol=1e-5)
  np.testing.assert_array_equal(base.argmax, np.argmax(b, -1))
  np.testing.assert_array_equal(base.x, xr.astype(np.float32))
  np.testing.assert_allclose(base.p_head, np.einsum("bnv,vd->bnd", p, hr), rtol=1e-4, atol=1e-5)
  same = metrics.head_divergence_stats(jnp.asarray(x), jnp.asarray(head), base.argmax, base,
                                       vocab_chunk=100, dtype=dtype)
  np.testing.assert_allclose(same["kl"], 0.0, atol=1e-6)
  if dtype == jnp.float32:  # F' ≈ F: a small KL against a float64 oracle; the residual
    # error (~1e-6 nats) is that of the float32 logits themselves (through lse' − lse_F)
    x2 = x + 1e-2 * rng.normal(size=x.shape).astype(np.float32)
    near = metrics.head_divergence_stats(jnp.asarray(x2), jnp.asarray(head), base.argmax, base,
                                         vocab_chunk=100)
    l2 = np.einsum("bnd,vd->bnv", np.asarray(x2, np.float64), hr)
    lse2 = np.log(np.sum(np.exp(l2 - l2.max(-1, keepdims=True)), -1)) + l2.max(-1)
    kl = np.sum(p * ((b - lse[..., None]) - (l2 - lse2[..., None])), -1)
    assert 1e-5 < kl.min() and kl.max() < 1e-2
    np.testing.assert_allclose(near["kl"], kl, rtol=1e-2, atol=2e-6)
  assert bool(np.all(same["top1_agree"])) and np.all(same["fdt"] == 4)
