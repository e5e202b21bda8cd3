"""Units of dtm/train: the chunked objective against full-logit formulas (values and
gradients), masks and STE fake quantization, the AC/DC schedule, the sharding rule."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtm import compress
from dtm.components import get_path, kernel_path
from dtm.model import init_params
from dtm.model_config import ModelConfig
from dtm.train import masks as masks_lib
from dtm.train import sharding
from dtm.train.objective import Objective, chunked_loss

TINY = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=64)


def _reference(obj, x, w, y, mask, xt, wt):
  """The objective from materialised float64 logits (module docstring formulas)."""
  s = np.einsum("btd,vd->btv", x, w)
  ce = -(s - _lse(s))[np.arange(s.shape[0])[:, None], np.arange(s.shape[1]), y]
  out = {"ce": np.sum(ce * mask), "tokens": np.sum(mask)}
  if obj.alpha > 0:
    tau = obj.temperature
    t = np.einsum("btd,vd->btv", xt, wt)
    logp = t / tau - _lse(t / tau)
    logq = s / tau - _lse(s / tau)
    kl = tau ** 2 * np.sum(np.exp(logp) * (logp - logq), axis=-1)
    weight = np.ones_like(kl)
    if obj.div_weight > 0:
      g = np.argmax(t, axis=-1)
      s_g = np.take_along_axis(s, g[..., None], -1)[..., 0]
      other = s.copy()
      np.put_along_axis(other, g[..., None], -np.inf, -1)
      margin = s_g - other.max(-1)
      weight = 1 + obj.div_weight / (1 + np.exp(margin / obj.div_margin))
      weight = weight * mask.sum() / np.sum(weight * mask)
    out["kl"] = np.sum(kl * mask)
    out["loss"] = (1 - obj.alpha) * out["ce"] + obj.alpha * np.sum(weight * kl * mask)
  else:
    out["kl"] = 0.0
    out["loss"] = out["ce"]
  return out


def _lse(a):
  m = a.max(-1, keepdims=True)
  return m + np.log(np.sum(np.exp(a - m), axis=-1, keepdims=True))


def _problem(seed=0, b=2, t=5, d=16, v=37):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  w = rng.normal(size=(v, d)).astype(np.float32) * 0.7
  xt = x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
  wt = w + 0.3 * rng.normal(size=w.shape).astype(np.float32)
  y = rng.integers(0, v, (b, t)).astype(np.int32)
  mask = (rng.random((b, t)) > 0.2).astype(np.float32)
  return x, w, y, mask, xt, wt


@pytest.mark.parametrize("obj", [
    Objective(alpha=0.0, vocab_chunk=8),
    Objective(alpha=0.5, temperature=2.0, vocab_chunk=8),
    Objective(alpha=1.0, vocab_chunk=0),
    Objective(alpha=0.7, temperature=1.5, div_weight=2.0, div_margin=0.5, vocab_chunk=10),
])
def test_chunked_loss_matches_full_logits(obj):
  x, w, y, mask, xt, wt = _problem()
  got = chunked_loss(obj, x, w, y, mask, xt, wt)
  ref = _reference(obj, *(a.astype(np.float64) for a in (x, w)), y, mask,
                   xt.astype(np.float64), wt.astype(np.float64))
  for k in ("loss", "ce", "kl", "tokens"):
    np.testing.assert_allclose(float(getattr(got, k)), ref[k], rtol=2e-5, atol=1e-5, err_msg=k)


def test_chunked_loss_gradient_matches_full_logits():
  obj = Objective(alpha=0.6, temperature=1.3, vocab_chunk=8)
  x, w, y, mask, xt, wt = _problem(seed=1)

  def full(x, w):  # the same objective from materialised logits, in JAX
    s = jnp.einsum("btd,vd->btv", x, w)
    ce = jax.nn.logsumexp(s, -1) - jnp.take_along_axis(s, y[..., None], -1)[..., 0]
    t = jnp.einsum("btd,vd->btv", xt, wt) / obj.temperature
    logp, logq = jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s / obj.temperature, -1)
    kl = obj.temperature ** 2 * jnp.sum(jnp.exp(logp) * (logp - logq), -1)
    return jnp.sum(((1 - obj.alpha) * ce + obj.alpha * kl) * mask)

  g_chunked = jax.grad(lambda x, w: chunked_loss(obj, x, w, y, mask, xt, wt).loss,
                       argnums=(0, 1))(x, w)
  g_full = jax.grad(full, argnums=(0, 1))(x, w)
  for a, b in zip(g_chunked, g_full):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_identical_teacher_gives_zero_kl():
  x, w, y, mask, _, _ = _problem(seed=2)
  got = chunked_loss(Objective(alpha=1.0, vocab_chunk=8), x, w, y, mask, x, w)
  assert abs(float(got.kl)) < 1e-5


# ----------------------------------------------------------------------------- masks / STE


def test_masks_keep_exactly_the_pruned_zeros():
  params = init_params(TINY)
  plan = masks_lib.make_plan("q@0:magnitude(0.5); down@*:nm(2,4); up@1:absmax(4)", params)
  assert [k for k, _, _ in plan.pruned] == ["q", "down"] and plan.quantized[0][0] == "up"
  pruned, masks = masks_lib.prune(plan, params)
  ref, _ = compress.apply_spec(params, "q@0:magnitude(0.5); down@*:nm(2,4)")
  for kind in ("q", "down"):
    key = "/".join(kernel_path(kind))
    np.testing.assert_array_equal(np.asarray(get_path(pruned, kernel_path(kind))),
                                  np.asarray(get_path(ref, kernel_path(kind))))
    np.testing.assert_array_equal(np.asarray(masks[key]),
                                  np.asarray(get_path(ref, kernel_path(kind))) != 0)
  assert bool(np.all(np.asarray(masks["layers/attn/q/kernel"])[1]))  # layer 1 unpruned
  noisy = jax.tree.map(lambda a: a + 1.0, pruned)
  remasked = masks_lib.apply_masks(noisy, masks)
  q = np.asarray(get_path(remasked, kernel_path("q")))
  assert np.all((q == 0) == ~np.asarray(masks["layers/attn/q/kernel"]))


def test_fake_quant_forward_on_grid_and_straight_through_gradient():
  params = init_params(TINY)
  plan = masks_lib.make_plan("up@1:absmax(4)", params)
  q = masks_lib.quantize(plan, params, ste=True)
  ref, _ = compress.apply_spec(params, "up@1:absmax(4)")
  np.testing.assert_array_equal(np.asarray(get_path(q, kernel_path("up"))),
                                np.asarray(get_path(ref, kernel_path("up"))))

  def f(p):
    return jnp.sum(get_path(masks_lib.quantize(plan, p, ste=True), kernel_path("up")) ** 2)

  g = get_path(jax.grad(f)(params), kernel_path("up"))
  expected = 2 * np.asarray(get_path(ref, kernel_path("up")))  # d/dw of q(w)^2 through STE
  np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-6)


def test_acdc_schedule_phases():
  s = masks_lib.AcdcSchedule(total=20, dense_warmup=2, compressed=3, decompressed=2,
                             final_compressed=4)
  phases = "".join("C" if s.is_compressed(i) else "D" for i in range(20))
  assert phases == "DDCCCDDCCCDDCCCDCCCC"
  assert [i for i in range(20) if s.remask_at(i)] == [2, 7, 12, 16]
  plain = masks_lib.AcdcSchedule(total=5)
  assert all(plain.is_compressed(i) for i in range(5)) and not any(plain.remask_at(i) for i in range(5))


def test_fsdp_rule_largest_divisible_dimension():
  assert sharding.param_pspec((30, 576, 1536), 8) == jax.sharding.PartitionSpec(None, None, "fsdp")
  assert sharding.param_pspec((30, 576, 192), 8) == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert sharding.param_pspec((7, 9), 8) == jax.sharding.PartitionSpec()
  assert sharding.param_pspec((), 8) == jax.sharding.PartitionSpec()
  assert sharding.param_pspec((576,), 1) == jax.sharding.PartitionSpec()


def test_fsdp_rule_splits_the_hidden_axis_of_vocabulary_leaves():
  """Embedding [V, D] and LM head [D, V] (and their Adam moments) split D, so a chunk of
  the vocabulary scan needs no gathered [V, D] head; other leaves keep the largest axis."""
  rule, fsdp = sharding.leaf_pspec, 8
  assert rule(("embed", "embedding"), (512, 32), fsdp) == jax.sharding.PartitionSpec(None, "fsdp")
  assert rule(("lm_head", "kernel"), (32, 512), fsdp) == jax.sharding.PartitionSpec("fsdp", None)
  assert rule(("mu", "lm_head", "kernel"), (32, 512), fsdp) == jax.sharding.PartitionSpec("fsdp", None)
  assert rule(("layers", "mlp", "up", "kernel"), (2, 32, 64), fsdp) == jax.sharding.PartitionSpec(None, None, "fsdp")
  assert rule(("embed", "embedding"), (512, 30), fsdp) == jax.sharding.PartitionSpec("fsdp", None)


# ----------------------------------------------------------------------------- the step


def _one_step(cfg, microbatches, alpha=0.5, teacher=None):
  from dtm.train import step as step_lib
  params = init_params(cfg, seed=3)
  plan = masks_lib.make_plan("mlp@*:magnitude(0.5)", params)
  pruned, masks = masks_lib.prune(plan, params)
  oc = step_lib.OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10)
  tx = step_lib.make_optimizer(oc, pruned)
  state = jax.jit(lambda p, m: step_lib.init_state(p, m, tx, 0))(pruned, masks)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 9)), jnp.int32)
  fn = jax.jit(lambda s, b, t: step_lib.train_step(
      s, b, t, cfg=cfg, obj=Objective(alpha=alpha, vocab_chunk=128), plan=plan, tx=tx,
      microbatches=microbatches, masked=True, schedule=step_lib.lr_schedule(oc), clip_norm=1.0))
  new, m = fn(state, batch, params if teacher is None else teacher)
  return new, m


def test_microbatches_and_remat_match_one_full_batch():
  ref, m_ref = _one_step(TINY, 1)
  for cfg, mb in ((TINY, 2), (TINY, 4), (TINY.replace(remat=True), 1)):
    new, m = _one_step(cfg, mb)
    for k in ("loss", "ce", "kl", "grad_norm"):
      np.testing.assert_allclose(float(m[k]), float(m_ref[k]), rtol=1e-5, err_msg=(mb, k))
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(ref["params"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  pruned = np.asarray(ref["params"]["layers"]["mlp"]["down"]["kernel"])
  assert np.mean(pruned == 0) == 0.5  # masked update keeps the zeros


def test_attention_blocks_match_one_full_batch():
  ref, m_ref = _one_step(TINY, 1)
  new, m = _one_step(TINY.replace(remat=True, attention_chunk=4), 2)  # T = 8: two blocks
  for k in ("loss", "ce", "kl", "grad_norm"):
    np.testing.assert_allclose(float(m[k]), float(m_ref[k]), rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(ref["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_teacher_in_compute_dtype_is_exact():
  """A bfloat16-compute step gives the same result with the float32 teacher as with
  `teacher_copy` (the teacher stored in bfloat16: half the memory)."""
  from dtm.train import step as step_lib
  cfg = TINY.replace(dtype="bfloat16")
  params = init_params(cfg, seed=3)
  teacher = step_lib.teacher_copy(cfg, params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(teacher))
  assert step_lib.teacher_copy(TINY, params) is not None
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(step_lib.teacher_copy(TINY, params)))
  a, m_a = _one_step(cfg, 1, teacher=params)
  b, m_b = _one_step(cfg, 1, teacher=teacher)
  for k in ("loss", "ce", "kl", "grad_norm"):
    assert float(m_a[k]) == float(m_b[k]), k
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_compute_keeps_float32_master_weights():
  new, m = _one_step(TINY.replace(dtype="bfloat16"), 1)
  assert np.isfinite(float(m["loss"])) and float(m["finite"]) == 1.0
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new["opt_state"])
             if hasattr(x, "dtype") and x.ndim > 0)
