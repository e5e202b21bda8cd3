"""Divergent Token Metrics (Deiseroth et al., arXiv 2311.01544) and related statistics.

Setting. A prompt p of c tokens; the reference continuation y = greedy(F, p, N) is
N tokens of argmax decoding from the original model F; s = p ⊕ y. The compressed
model F' is run teacher-forced on s, and the logits at position c-1+j predict y_j,
j = 0..N-1. Callers pass only those N rows: `logits_BNV` [B, N, V] and the targets
`targets_BN` = y [B, N] (int32). B is the prompt (batch) axis.

Device-side functions (pure, `jax.jit`/`jax.vmap` compatible, float32 math even for
bfloat16 inputs):

  * `divergence_stats`: one fused pass giving per-prompt FDT, SDT, per-token NLL
    and, when base logits are given, per-token KL(F‖F') and top-1 agreement.
  * `head_divergence_stats`: the same, fused with the LM head over vocabulary
    chunks (no [B, N, V] logits); KL against a `HeadBase` (`head_base`), the base
    distribution reduced against the head to D floats per position.
  * `fdt_sdt_from_divergent`: FDT and SDT from a divergence mask.
  * `context_nll`: per-window NLL sum and count for context-aware perplexity.

Host-side functions (numpy, on per-prompt arrays gathered over the prompt set):

  * `fdt_alpha`, `perplexity`, `aggregate`.

Argmax convention: `jnp.argmax` returns the *first* index of the maximum, so on an
exact tie between y_j and a lower-indexed token the position counts as divergent
(and as a top-1 disagreement when comparing to base logits).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dtm.errors import DtmError

DEFAULT_ALPHAS: tuple[float, ...] = (0.75, 0.9)


# ----------------------------------------------------------------------------
# Device side (jit / vmap compatible)
# ----------------------------------------------------------------------------

def fdt_sdt_from_divergent(divergent_BN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and Share of Divergent Tokens from a divergence mask.

  Args:
    divergent_BN: bool [..., N]; divergent_j = argmax L'[c-1+j] ≠ y_j.

  Returns:
    fdt: int32 [...]; FDT = min{ j : divergent_j }, or N if no position diverges
      (range 0..N).
    sdt: float32 [...]; SDT = (1/N) Σ_j divergent_j (range 0..1).
  """
  divergent_BN = jnp.asarray(divergent_BN, dtype=bool)
  n = divergent_BN.shape[-1]
  first = jnp.argmax(divergent_BN, axis=-1)  # first True; 0 if none
  fdt = jnp.where(jnp.any(divergent_BN, axis=-1), first, n).astype(jnp.int32)
  sdt = jnp.mean(divergent_BN.astype(jnp.float32), axis=-1)
  return fdt, sdt


def _gather_last(x_BNV: jax.Array, index_BN: jax.Array) -> jax.Array:
  """x[..., index] along the last axis: [..., V], [...] -> [...]."""
  return jnp.take_along_axis(x_BNV, index_BN[..., None].astype(jnp.int32), axis=-1)[..., 0]


class BaseDist(NamedTuple):
  """The base model's distribution at the continuation positions, computed once and
  reused by every compressed model (probe): logits, p_F [B, N, V] f32, the
  log-normaliser lse_F [B, N] and argmax [B, N]."""
  logits: jax.Array
  p: jax.Array
  lse: jax.Array
  argmax: jax.Array


def _max_lse_argmax(logits_BNV: jax.Array):
  """(max, log Σ exp, first index of the max) over the last axis, as plain
  (non-variadic) reductions that XLA vectorises; argmax equals jnp.argmax."""
  max_BN = jnp.max(logits_BNV, axis=-1)
  lse_BN = max_BN + jnp.log(jnp.sum(jnp.exp(logits_BNV - max_BN[..., None]), axis=-1))
  iota = jax.lax.broadcasted_iota(jnp.int32, logits_BNV.shape, logits_BNV.ndim - 1)
  pred_BN = jnp.min(jnp.where(logits_BNV == max_BN[..., None], iota, logits_BNV.shape[-1]),
                    axis=-1)
  return max_BN, lse_BN, pred_BN


def base_dist(base_logits_BNV: jax.Array) -> BaseDist:
  """BaseDist from base logits [B, N, V] (any float dtype; math in float32)."""
  base = jnp.asarray(base_logits_BNV).astype(jnp.float32)
  _, lse, argmax = _max_lse_argmax(base)
  return BaseDist(base, jnp.exp(base - lse[..., None]), lse, argmax)


def divergence_stats(
    logits_BNV: jax.Array,
    targets_BN: jax.Array,
    base_logits_BNV: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Per-prompt divergence statistics of F' against the reference continuation y.

  One fused pass: the log-normaliser (logsumexp over V) is computed once per
  position of each logit set; all math is float32 whatever the input dtype.

  Args:
    logits_BNV: [B, N, V] logits of F' teacher-forced on s = p ⊕ y; row j is
      L'[c-1+j], the prediction of y_j. Any float dtype (e.g. bfloat16).
    targets_BN: int [B, N]; y = greedy(F, p, N).
    base_logits_BNV: optional [B, N, V] logits of the base model F at the same
      positions (for the llama.cpp-style KL / top-1 statistics), or their
      precomputed `BaseDist` (saves two passes over V when reused).

  Returns a dict of per-prompt arrays:
    fdt: int32 [B]; First Divergent Token, min{ j : argmax L'[c-1+j] ≠ y_j } or N.
    sdt: float32 [B]; Share of Divergent Tokens, (1/N) Σ_j [argmax L'[c-1+j] ≠ y_j].
    nll: float32 [B, N]; NLL_j = −log softmax(L'[c-1+j])[y_j], in nats.
    and, only when base_logits_BNV is given:
    kl: float32 [B, N]; KL(F‖F') = Σ_v p_F(v) (log p_F(v) − log p_F'(v)), nats.
    top1_agree: bool [B, N]; argmax F' == argmax F (first max on ties).

  Works unchanged with extra leading axes (e.g. under `jax.vmap` over probes).
  """
  logits_BNV = jnp.asarray(logits_BNV).astype(jnp.float32)
  targets_BN = jnp.asarray(targets_BN).astype(jnp.int32)
  # Few passes over V, each a plain reduction: max; Σ exp (log-normaliser); first
  # index of the max; with a base model one more, Σ_v p_F (b − l'), which reads only
  # inputs and so shares its pass with the others.
  _, lse_BN, pred_BN = _max_lse_argmax(logits_BNV)
  nll_BN = lse_BN - _gather_last(logits_BNV, targets_BN)
  fdt_B, sdt_B = fdt_sdt_from_divergent(pred_BN != targets_BN)
  out = {"fdt": fdt_B, "sdt": sdt_B, "nll": nll_BN}
  if base_logits_BNV is not None:
    base = base_logits_BNV if isinstance(base_logits_BNV, BaseDist) else base_dist(base_logits_BNV)
    # KL = Σ p_F (log p_F − log p_F') = Σ p_F (b − l') − lse_F + lse' (Σ p_F = 1), with b,
    # l' the raw logits: no per-element log-probs; identical inputs give exactly 0.
    cross = jnp.sum(jnp.where(base.p > 0, base.p * (base.logits - logits_BNV), 0.0), axis=-1)
    out["kl"] = cross + (lse_BN - base.lse)
    out["top1_agree"] = pred_BN == base.argmax
  return out


def _vocab_chunks(head_VD: jax.Array, vocab_chunk: int, dtype):
  """head [V, D] -> ([nc, vc, D] zero-padded chunks, vc)."""
  v, d = head_VD.shape
  nc = -(-v // vocab_chunk)
  vc = -(-v // nc)
  w = jnp.pad(head_VD.astype(dtype), ((0, nc * vc - v), (0, 0))).reshape(nc, vc, d)
  return w, vc


def _chunk_logits(x_BND: jax.Array, w_vD: jax.Array) -> jax.Array:
  return jnp.einsum("bnd,vd->bnv", x_BND, w_vD, preferred_element_type=jnp.float32)


def head_logits(x_BND: jax.Array, head_VD: jax.Array, *, vocab_chunk: int = 4096,
                dtype=jnp.float32) -> jax.Array:
  """float32 logits x @ head.T [B, N, V], computed chunk by chunk exactly as
  `head_divergence_stats` computes them, so both give bit-identical logits."""
  v = head_VD.shape[0]
  w, vc = _vocab_chunks(head_VD, vocab_chunk, dtype)
  x = x_BND.astype(dtype)
  out = jax.lax.map(lambda w_vD: _chunk_logits(x, w_vD), w)  # [nc, B, N, vc]
  out = jnp.moveaxis(out, 0, -2).reshape(*x.shape[:-1], w.shape[0] * vc)
  return out[..., :v]


class HeadBase(NamedTuple):
  """The base model's distribution p_F at the continuation positions, reduced against
  the LM head W [V, D] so that a compressed model's KL needs no [B, N, V] tensor.
  With base logits b = x @ W.T and F' logits l' = x' @ W.T (same head: probes compress
  decoder layers only),

    Σ_v p_F(v) (b_v − l'_v) = (x − x') · Σ_v p_F(v) W_v = (x − x') · p_head,

  which is computed from the difference x − x', so it stays accurate when F' ≈ F.

  Fields: max [B, N] and sum_exp [B, N] = Σ_v exp(b_v − max) (the log-normaliser is
  lse_F = max + log sum_exp, kept in two parts so that lse' − lse_F is formed without
  rounding either to a float of magnitude |b|); argmax [B, N] (first index of the max);
  x [B, N, D] the base model's final-normed hidden states as the head sees them (cast
  to the matmul dtype, stored float32); p_head [B, N, D] = Σ_v p_F(v) W_v (float32, W
  cast to the matmul dtype first, so the identity holds for bf16 models too).
  """
  max: jax.Array
  sum_exp: jax.Array
  argmax: jax.Array
  x: jax.Array
  p_head: jax.Array

  @property
  def lse(self) -> jax.Array:
    return self.max + jnp.log(self.sum_exp)


def head_base(x_BND: jax.Array, head_VD: jax.Array, *, vocab_chunk: int = 4096,
              dtype=jnp.float32) -> HeadBase:
  """`HeadBase` of the base model from its final-normed hidden states x [B, N, D].

  One pass over vocabulary chunks with online rescaling (Σ e^{b-m} and Σ e^{b-m} W are
  rescaled whenever the running max m grows); the logits of each chunk are computed
  exactly as `head_divergence_stats` computes them.
  """
  v = head_VD.shape[0]
  w, vc = _vocab_chunks(head_VD, vocab_chunk, dtype)
  x = x_BND.astype(dtype)
  shape = x.shape[:-1]

  def body(carry, c):
    *online, ph = carry
    _, e, scale, online = _online_chunk(x, c, vc, v, *online)
    ph = ph * scale[..., None] + jnp.einsum(
        "bnv,vd->bnd", e, c["w"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (*online, ph), None

  zeros = jnp.zeros(shape, jnp.float32)
  init = (jnp.full(shape, -jnp.inf), zeros, jnp.zeros(shape, jnp.int32),
          jnp.zeros(x.shape, jnp.float32))
  xs = {"w": w, "i": jnp.arange(w.shape[0], dtype=jnp.int32)}
  (m, s, arg, ph), _ = jax.lax.scan(body, init, xs)
  return HeadBase(m, s, arg, x.astype(jnp.float32), ph / s[..., None])


def _online_chunk(x_BND, c, vc: int, v: int, m, s, arg):
  """One vocabulary chunk (c: {"w": [vc, D], "i": chunk index}) of the online recursion
  for the running max m, Σ exp(l − m) s and first argmax arg [B, N] (flash-attention
  style rescaling; ties keep the earlier, lower index). Returns the chunk's logits
  [B, N, vc] (padding -> -inf; no mask when vc divides V), e = exp(logits − new m),
  the factor exp(m − new m) that rescales earlier sums, and the new (m, s, arg)."""
  logits = _chunk_logits(x_BND, c["w"])
  iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  if v % vc:
    logits = jnp.where(iota + c["i"] * vc < v, logits, -jnp.inf)
  cmax = jnp.max(logits, axis=-1)
  carg = jnp.min(jnp.where(logits == cmax[..., None], iota, vc), axis=-1) + c["i"] * vc
  new_m = jnp.maximum(m, cmax)
  scale = jnp.exp(m - new_m)
  e = jnp.exp(logits - new_m[..., None])  # 0 at the padding
  return logits, e, scale, (new_m, s * scale + jnp.sum(e, axis=-1),
                            jnp.where(cmax > m, carg, arg))


def head_divergence_stats(
    x_BND: jax.Array,
    head_VD: jax.Array,
    targets_BN: jax.Array,
    base: HeadBase | None = None,
    *,
    vocab_chunk: int = 4096,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
  """`divergence_stats` of logits = x @ head.T, computed over vocabulary chunks.

  The LM head and the statistics are fused: each [B, N, vocab_chunk] block of logits
  is produced and consumed while it is in cache (online max / Σ exp rescaling as in
  flash attention; argmax keeps the first maximum across chunks), so the [B, N, V]
  logits are never written to memory. Same definitions and outputs as
  `divergence_stats`; the log-normaliser's summation order differs (≈1e-6 relative).
  KL(F‖F') = Σ_v p_F(b_v − l'_v) − lse_F + lse' with Σ_v p_F(b_v − l'_v) =
  (x − x') · p_head from the `HeadBase` (a D-length dot product, not a pass over V).

  Args:
    x_BND: final-normed hidden states at the continuation positions [B, N, D].
    head_VD: LM head [V, D] (`dtm.model.head_matrix`).
    targets_BN: y [B, N]; base: optional `HeadBase` of the base model (same head).
    vocab_chunk: logits per chunk; V is padded to a multiple (padding masked out).
    dtype: matmul input dtype (accumulation is float32).
  """
  v = head_VD.shape[0]
  w, vc = _vocab_chunks(head_VD, vocab_chunk, dtype)
  x = x_BND.astype(dtype)
  targets_BN = jnp.asarray(targets_BN).astype(jnp.int32)
  shape = targets_BN.shape

  def body(carry, c):
    *online, ty = carry
    logits, _, _, online = _online_chunk(x, c, vc, v, *online)
    # the target's logit from the same GEMM output the argmax sees
    local = targets_BN - c["i"] * vc
    inside = (local >= 0) & (local < vc)
    ty = jnp.where(inside, _gather_last(logits, jnp.clip(local, 0, vc - 1)), ty)
    return (*online, ty), None

  zeros = jnp.zeros(shape, jnp.float32)
  init = (jnp.full(shape, -jnp.inf), zeros, jnp.zeros(shape, jnp.int32), zeros)
  xs = {"w": w, "i": jnp.arange(w.shape[0], dtype=jnp.int32)}
  (m, s, pred_BN, target_logit), _ = jax.lax.scan(body, init, xs)
  lse_BN = m + jnp.log(s)
  x32 = x.astype(jnp.float32)
  fdt_B, sdt_B = fdt_sdt_from_divergent(pred_BN != targets_BN)
  out = {"fdt": fdt_B, "sdt": sdt_B, "nll": lse_BN - target_logit}
  if base is not None:
    cross = jnp.sum((base.x - x32) * base.p_head, axis=-1)
    out["kl"] = cross + ((m - base.max) + jnp.log(s / base.sum_exp))  # + lse' − lse_F
    out["top1_agree"] = pred_BN == base.argmax
  return out


def context_nll(
    logits_BTV: jax.Array,
    tokens_BT: jax.Array,
    ctx: int | jax.Array = 1,
    mask_BT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-window NLL sum and count for context-aware perplexity.

  Context-aware PPL of windows t (length T) with context ctx is
  exp(mean over i ≥ ctx of −log p(t_i | t_<i)); ctx = 1 is ordinary perplexity
  (every token but the first, which has no prediction). Logits row i-1 predicts
  token i, so row T-1 is unused. Aggregate with `perplexity(sum, count)`.

  Args:
    logits_BTV: [B, T, V] logits, any float dtype (math in float32).
    tokens_BT: int [B, T] window tokens.
    ctx: int scalar or int [B] (per-window, for sliding windows whose first
      `ctx` tokens were already scored by the previous window). Values < 1
      behave like 1.
    mask_BT: optional bool [B, T]; tokens with False (e.g. padding) are not
      scored.

  Returns:
    nll_sum: float32 [B]; Σ_{i ≥ ctx, mask_i} −log softmax(logits[i-1])[t_i], nats.
    count: int32 [B]; number of scored tokens.
  """
  logits_BSV = jnp.asarray(logits_BTV)[:, :-1].astype(jnp.float32)
  tokens_BT = jnp.asarray(tokens_BT).astype(jnp.int32)
  targets_BS = tokens_BT[:, 1:]
  nll_BS = jax.nn.logsumexp(logits_BSV, axis=-1) - _gather_last(logits_BSV, targets_BS)
  b, t = tokens_BT.shape
  ctx_B1 = jnp.broadcast_to(jnp.asarray(ctx, dtype=jnp.int32), (b,))[:, None]
  position_S = jnp.arange(1, t, dtype=jnp.int32)
  keep_BS = position_S[None, :] >= ctx_B1
  if mask_BT is not None:
    keep_BS = keep_BS & jnp.asarray(mask_BT, dtype=bool)[:, 1:]
  nll_sum_B = jnp.sum(jnp.where(keep_BS, nll_BS, 0.0), axis=-1)
  count_B = jnp.sum(keep_BS, axis=-1, dtype=jnp.int32)
  return nll_sum_B, count_B


# ----------------------------------------------------------------------------
# Host side (numpy, over the gathered prompt set)
# ----------------------------------------------------------------------------

def fdt_alpha(fdt: np.ndarray, alpha: float) -> int:
  """FDT_α: the largest integer t such that a fraction ≥ α of prompts have FDT ≥ t.

  "The number of tokens that α of the prompts reproduce exactly." With P prompts
  and k = min{ k : k / P ≥ α } (exact fraction comparison), FDT_α is the k-th
  largest FDT; it is therefore always one of the observed values (so in 0..N),
  α = 1 gives min FDT, and small α gives max FDT.

  Args:
    fdt: int [P] per-prompt FDT values, P ≥ 1.
    alpha: fraction in (0, 1].
  """
  fdt = np.asarray(fdt).reshape(-1)
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"alpha must be in (0, 1], got {alpha}")
  if fdt.size == 0:
    raise ValueError("fdt_alpha needs at least one prompt")
  p = fdt.size
  fractions = np.arange(1, p + 1) / p  # fraction of prompts covered by the top k
  k = int(np.searchsorted(fractions, alpha, side="left")) + 1
  return int(np.sort(fdt)[::-1][k - 1])


def perplexity(nll_sum: np.ndarray | float, count: np.ndarray | int) -> float:
  """exp(Σ nll_sum / Σ count): perplexity from summed NLL (nats) and token counts.

  Used for DPPL (sum of NLL_j over all prompts and positions / (P·N)) and for
  context-aware PPL (sums and counts from `context_nll` over all windows).
  """
  total_count = float(np.sum(np.asarray(count, dtype=np.float64)))
  if total_count <= 0:
    raise ValueError("perplexity needs at least one scored token")
  total_nll = float(np.sum(np.asarray(nll_sum, dtype=np.float64)))
  return float(np.exp(total_nll / total_count))


def _check_finite(name: str, x: np.ndarray) -> None:
  if not np.all(np.isfinite(x)):
    raise DtmError(f"non-finite values in per-prompt {name!r} "
                   f"({int(np.sum(~np.isfinite(x)))} of {x.size}); "
                   "the model produced NaN/inf logits")


def aggregate(
    per_prompt: Mapping[str, np.ndarray],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> dict[str, float]:
  """Aggregate per-prompt arrays (from `divergence_stats`, concatenated over batches).

  Args:
    per_prompt: numpy arrays 'fdt' [P], 'sdt' [P], 'nll' [P, N], and optionally
      'kl' [P, N] and 'top1_agree' [P, N].
    alphas: the α values for FDT_α.

  Returns a flat dict of Python floats:
    fdt_mean, fdt_median, fdt_alpha_<α> (α formatted with %g, e.g. fdt_alpha_0.75),
    sdt_mean, nll_mean (mean NLL_j in nats over all P·N tokens),
    dppl = exp(nll_mean),
    and, when present: kl_mean, kl_median, kl_p99 (over all P·N positions; numpy
    linear-interpolation percentiles), top1_agree (fraction of positions).

  Raises DtmError on non-finite NLL or KL (NaN must not pass silently).
  """
  fdt = np.asarray(per_prompt["fdt"]).reshape(-1)
  sdt = np.asarray(per_prompt["sdt"], dtype=np.float64).reshape(-1)
  nll = np.asarray(per_prompt["nll"], dtype=np.float64)
  _check_finite("nll", nll)
  out = {
      "fdt_mean": float(np.mean(fdt)),
      "fdt_median": float(np.median(fdt)),
  }
  for alpha in alphas:
    out[f"fdt_alpha_{alpha:g}"] = float(fdt_alpha(fdt, alpha))
  out["sdt_mean"] = float(np.mean(sdt))
  out["nll_mean"] = float(np.mean(nll))
  out["dppl"] = perplexity(np.sum(nll), nll.size)
  if "kl" in per_prompt:
    kl = np.asarray(per_prompt["kl"], dtype=np.float64).reshape(-1)
    _check_finite("kl", kl)
    out["kl_mean"] = float(np.mean(kl))
    out["kl_median"] = float(np.median(kl))
    out["kl_p99"] = float(np.percentile(kl, 99))
  if "top1_agree" in per_prompt:
    out["top1_agree"] = float(np.mean(np.asarray(per_prompt["top1_agree"], dtype=np.float64)))
  return out
