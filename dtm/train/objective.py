"""Training objective: next-token cross-entropy and distillation KL(F‖F'), computed over
vocabulary chunks so that no [B, T, V] float32 tensor is materialised.

Notation: x [B, T, D] the student F' 's final-normed hidden states, W [V, D] its LM head
(logits s = x Wᵀ); x_t, W_t the frozen teacher F's (logits t = x_t W_tᵀ); τ the
temperature; y [B, T] the next tokens; m [B, T] the weight of each position (1 for a
scored target, 0 for padding).

  CE_i  = lse(s_i) − s_i[y_i]                                              (nats)
  KL_i  = τ² · Σ_v p_v (log p_v − log q_v),  p = softmax(t_i / τ), q = softmax(s_i / τ)
        = τ² · ( Σ_v p_v (t_v − s_v) / τ − lse(t_i/τ) + lse(s_i/τ) )

(the τ² factor keeps gradient magnitudes comparable across temperatures, as in Hinton
et al. 2015). One `lax.scan` over vocabulary chunks of `vocab_chunk` rows of W computes,
per chunk, the student's chunk log-normalisers (at τ = 1 and at τ), the target logit,
and, with online rescaling of the teacher's running max (flash-attention style), the
teacher's normaliser and Σ_v e^{t_v/τ − m} (t_v − s_v)/τ. The chunk body is
`jax.checkpoint`ed, so the backward pass recomputes each chunk's logits instead of
storing them: peak extra memory is one [B, T, vocab_chunk] block.

Divergence-aware weighting (optional, β > 0): position i's KL is weighted by
w_i = 1 + β · σ(−margin_i / κ), where margin_i = s_i[g_i] − max_{v ≠ g_i} s_i[v] is the
student's logit margin at the teacher's greedy token g_i = argmax t_i. Positions where F'
is close to changing F's greedy token (margin near or below 0) weigh up to 1 + β; the
weights carry no gradient and are normalised to mean 1 over the scored positions. This
targets exactly what FDT measures (a change of the greedy token).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dtm.metrics import _vocab_chunks
from dtm.train.ce import cross_entropy


@dataclasses.dataclass(frozen=True)
class Objective:
  """Static description of the loss (a jit static argument).

  alpha: weight of the distillation KL (CE weight 1 − alpha); 0 = CE only (no teacher
  forward), 1 = KL only. temperature: τ > 0. div_weight: β of the divergence-aware
  weighting (0 = plain KL). div_margin: κ > 0, the logit-margin scale of that weighting.
  vocab_chunk: rows of W per chunk (0 = one chunk holding the whole vocabulary).
  """
  alpha: float = 0.0
  temperature: float = 1.0
  div_weight: float = 0.0
  div_margin: float = 1.0
  vocab_chunk: int = 8192

  @property
  def needs_teacher(self) -> bool:
    return self.alpha > 0


class LossSums(NamedTuple):
  """Sums over the scored positions of a batch (divide by `tokens` for means)."""
  loss: jax.Array      # Σ m_i ((1 − α) CE_i + α w_i KL_i), the differentiated quantity
  ce: jax.Array        # Σ m_i CE_i
  kl: jax.Array        # Σ m_i KL_i (unweighted; 0 without a teacher)
  tokens: jax.Array    # Σ m_i


def _lse_parts(m, s):
  return m + jnp.log(s)


def _online_sumexp(m_run, s_run, x, x_max):
  """One chunk of an online log-sum-exp (flash-attention style rescaling).

  m_run, s_run [B, T]: the running max m and Σ e^{x − m} over the chunks so far; x
  [B, T, vc] this chunk's values, x_max [B, T] their max. Returns (m', s', e, r) with
  m' = max(m, x_max), r = e^{m − m'} (the factor that rescales every running sum taken
  relative to m), e = e^{x − m'} [B, T, vc] and s' = s r + Σ_v e_v. lse = m' + log s'.
  """
  new_m = jnp.maximum(m_run, x_max)
  r = jnp.exp(m_run - new_m)
  e = jnp.exp(x - new_m[..., None])
  return new_m, s_run * r + jnp.sum(e, axis=-1), e, r


class _Carry(NamedTuple):
  """The vocabulary scan's running state, one [B, T] array per field."""
  m1: jax.Array          # student: running max of s (τ = 1)
  s1: jax.Array          #   Σ e^{s − m1}
  mt: jax.Array          # teacher: running max of t/τ
  st: jax.Array          #   Σ e^{t/τ − mt}
  acc: jax.Array         #   Σ e^{t/τ − mt} (t − s)/τ
  ty: jax.Array          # student's target logit s[y]
  gt_val: jax.Array      # student's logit at the teacher's greedy token so far
  gt_arg: jax.Array      # the teacher's greedy token so far (int32)
  best_other: jax.Array  # the best student logit outside gt_arg
  mq: jax.Array          # student: running max of s/τ
  sq: jax.Array          #   Σ e^{s/τ − mq}

  @classmethod
  def start(cls, shape) -> "_Carry":
    neg = jnp.full(shape, -jnp.inf)
    zeros = jnp.zeros(shape, jnp.float32)
    return cls(neg, zeros, neg, zeros, zeros, zeros, neg, jnp.zeros(shape, jnp.int32), neg, neg,
               zeros)


def chunked_loss(obj: Objective, x_BTD: jax.Array, head_VD: jax.Array, targets_BT: jax.Array,
                 mask_BT: jax.Array, teacher_x_BTD: jax.Array | None = None,
                 teacher_head_VD: jax.Array | None = None, *, dtype=jnp.float32) -> LossSums:
  """`LossSums` of the objective (module docstring) for one batch.

  x_BTD: student final-normed hidden [B, T, D]; head_VD: student head [V, D];
  targets_BT: int32 next tokens; mask_BT: float/bool weights of the positions;
  teacher_*: the teacher's (no gradient flows into them), needed when obj.alpha > 0.
  dtype: matmul input dtype (accumulation float32).
  """
  v = head_VD.shape[0]
  chunk = obj.vocab_chunk or v
  w, vc = _vocab_chunks(head_VD, chunk, dtype)
  x = x_BTD.astype(dtype)
  targets_BT = targets_BT.astype(jnp.int32)
  if not obj.needs_teacher:  # CE only: the hand-written backward of dtm.train.ce
    ce_BT = cross_entropy(x.reshape(-1, x.shape[-1]), w, targets_BT.reshape(-1), v)
    mask = mask_BT.astype(jnp.float32)
    ce_sum = jnp.sum(ce_BT.reshape(targets_BT.shape) * mask)
    return LossSums(ce_sum, ce_sum, jnp.zeros((), jnp.float32), jnp.sum(mask))
  xs = {"w": w, "i": jnp.arange(w.shape[0], dtype=jnp.int32)}
  xt = None
  if obj.needs_teacher:
    xs["wt"], _ = _vocab_chunks(jax.lax.stop_gradient(teacher_head_VD), chunk, dtype)
    xt = jax.lax.stop_gradient(teacher_x_BTD).astype(dtype)

  def body(carry, c):
    return _chunk_step(carry, c, x=x, xt=xt, targets_BT=targets_BT, v=v, vc=vc,
                       inv_tau=1.0 / obj.temperature), None

  # Several chunks: recompute each chunk's logits in the backward pass instead of storing
  # them. One chunk (vocab_chunk=0 or >= V): store them, trading memory for one GEMM.
  carry, _ = jax.lax.scan(jax.checkpoint(body) if w.shape[0] > 1 else body,
                          _Carry.start(targets_BT.shape), xs)
  return _loss_sums(obj, carry, mask_BT.astype(jnp.float32))


def _chunk_step(carry: _Carry, c, *, x, xt, targets_BT, v: int, vc: int, inv_tau: float) -> _Carry:
  """One vocabulary chunk c = {'w': student head rows [vc, D], 'i': chunk index, 'wt':
  teacher head rows (with a teacher)}: the student's normaliser and target logit, then
  (xt given) the teacher's terms (`_distill_chunk`)."""
  logits = jnp.einsum("btd,vd->btv", x, c["w"], preferred_element_type=jnp.float32)
  iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
  valid = iota + c["i"] * vc < v
  if v % vc:
    logits = jnp.where(valid, logits, -jnp.inf)
  # The running maxima only shift the log-sum-exps (no gradient flows through them), and
  # logits are picked by a masked sum, not a gather: autodiff then adds no compare pass
  # and no scatter over the [B, T, vc] chunk.
  cmax = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  m1, s1, _, _ = _online_sumexp(carry.m1, carry.s1, logits, cmax)  # student lse at τ = 1
  local = targets_BT - c["i"] * vc
  inside = (local >= 0) & (local < vc)
  picked = jnp.sum(jnp.where(iota == local[..., None], logits, 0.0), axis=-1)
  new = carry._replace(m1=m1, s1=s1, ty=jnp.where(inside, picked, carry.ty))
  if xt is None:
    return new
  return _distill_chunk(carry, new, c, logits, cmax, iota, valid, xt=xt, vc=vc, inv_tau=inv_tau)


def _distill_chunk(carry: _Carry, new: _Carry, c, logits, cmax, iota, valid, *, xt, vc: int,
                   inv_tau: float) -> _Carry:
  """The teacher's terms of one chunk, on `new` (carry with the student's τ = 1 terms
  updated): the student's normaliser at τ, the teacher's normaliser and Σ e^{t/τ − m}
  (t − s)/τ, and the running greedy-token margin candidates (read from the old carry)."""
  tl = jnp.einsum("btd,vd->btv", xt, c["wt"], preferred_element_type=jnp.float32)
  tl = jax.lax.stop_gradient(jnp.where(valid, tl, -jnp.inf) * inv_tau)
  sl = logits * inv_tau
  mq, sq, _, _ = _online_sumexp(carry.mq, carry.sq, sl, cmax * inv_tau)  # student lse at τ
  tmax = jnp.max(tl, axis=-1)
  mt, st, e, r = _online_sumexp(carry.mt, carry.st, tl, tmax)
  acc = carry.acc * r + jnp.sum(jnp.where(valid, e * (tl - sl), 0.0), axis=-1)
  # teacher's greedy token (first max) and the student's logit there
  carg = jnp.min(jnp.where(tl == tmax[..., None], iota, vc), axis=-1)
  take = tmax > carry.mt
  s_at = jnp.sum(jnp.where(iota == carg[..., None], logits, 0.0), axis=-1)
  # the best student logit outside the teacher's argmax: keep the running max of the
  # chunk's logits excluding the chunk argmax, plus the displaced previous candidate
  chunk_other = jnp.max(jnp.where(iota == carg[..., None], -jnp.inf, logits), axis=-1)
  best_other = jnp.where(take,
                         jnp.maximum(jnp.maximum(carry.best_other, carry.gt_val), chunk_other),
                         jnp.maximum(carry.best_other, cmax))
  return new._replace(mt=mt, st=st, acc=acc, mq=mq, sq=sq, best_other=best_other,
                      gt_val=jnp.where(take, s_at, carry.gt_val),
                      gt_arg=jnp.where(take, carg + c["i"] * vc, carry.gt_arg))


def _loss_sums(obj: Objective, carry: _Carry, mask: jax.Array) -> LossSums:
  """The sums of CE, KL and the (weighted) loss from the scan's final state."""
  ce_sum = jnp.sum((_lse_parts(carry.m1, carry.s1) - carry.ty) * mask)
  tokens = jnp.sum(mask)
  if not obj.needs_teacher:
    return LossSums(ce_sum, ce_sum, jnp.zeros((), jnp.float32), tokens)
  kl = obj.temperature ** 2 * (carry.acc / carry.st - _lse_parts(carry.mt, carry.st)
                               + _lse_parts(carry.mq, carry.sq))
  weight = jnp.ones_like(kl)
  if obj.div_weight > 0:
    margin = jax.lax.stop_gradient(carry.gt_val - carry.best_other)
    weight = 1.0 + obj.div_weight * jax.nn.sigmoid(-margin / obj.div_margin)
    weight = weight * tokens / jnp.maximum(jnp.sum(weight * mask), 1e-9)
    weight = jax.lax.stop_gradient(weight)
  kl_sum = jnp.sum(kl * mask)
  loss = (1.0 - obj.alpha) * ce_sum + obj.alpha * jnp.sum(weight * kl * mask)
  return LossSums(loss, ce_sum, kl_sum, tokens)
