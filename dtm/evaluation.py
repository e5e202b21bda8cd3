"""Jitted passes of the evaluate job: teacher-forced DTM pass and windowed perplexity.

Shapes: P prompts of c tokens, N continuation tokens, V vocab, B batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dtm import metrics
from dtm.errors import DtmError
from dtm.generate import NON_FINITE, bucket, greedy_generate
from dtm.model import Llama, head_matrix
from dtm.model_config import ModelConfig


def head_stats(cfg: ModelConfig, params, h_BND, targets_BN, base: metrics.HeadBase | None):
  """Final norm, then the LM head fused with `metrics.divergence_stats` over vocab chunks
  (the [B, N, V] logits are never materialised). Shared with the probe path."""
  x = Llama(cfg).apply({"params": params}, h_BND, method=Llama.normed)
  return metrics.head_divergence_stats(x, head_matrix(cfg, params), targets_BN, base,
                                       dtype=jnp.dtype(cfg.dtype))


def final_base(cfg: ModelConfig, params, h_BND) -> metrics.HeadBase:
  """The base model's `metrics.HeadBase` from its last residual stream [B, N, D], from
  the same chunked logits `head_stats` computes."""
  x = Llama(cfg).apply({"params": params}, h_BND, method=Llama.normed)
  return metrics.head_base(x, head_matrix(cfg, params), dtype=jnp.dtype(cfg.dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "c"))
def continuation_base(cfg: ModelConfig, params, seq_BS: jax.Array, c: int) -> metrics.HeadBase:
  """The base model's distribution at the N continuation positions of s = p ⊕ y,
  reduced against the LM head (`metrics.HeadBase`: [B, N] fields and p_head [B, N, D]).

  seq_BS: int32 [B, c+N]. The last token of s is never fed (its prediction is not needed).
  """
  h, _ = Llama(cfg).apply({"params": params}, seq_BS[:, :-1], method=Llama.hidden)
  return final_base(cfg, params, h[:, c - 1:])


@functools.partial(jax.jit, static_argnames=("cfg", "c"))
def dtm_batch(cfg: ModelConfig, params, seq_BS: jax.Array, c: int,
              base: metrics.HeadBase | None = None):
  """`metrics.divergence_stats` of F' (params) on s = p ⊕ y, one forward pass; the LM
  head is fused with the statistics over vocabulary chunks (`head_stats`); KL and top-1
  agreement against `base` (from `continuation_base`) when given."""
  h, _ = Llama(cfg).apply({"params": params}, seq_BS[:, :-1], method=Llama.hidden)
  return head_stats(cfg, params, h[:, c - 1:], seq_BS[:, c:], base)


@functools.partial(jax.jit, static_argnames=("cfg",))
def ppl_batch(cfg: ModelConfig, params, tokens_BT: jax.Array, ctx_B: jax.Array):
  """(NLL sum [B], count [B]) over positions i >= ctx of each window."""
  logits = Llama(cfg).apply({"params": params}, tokens_BT)
  return metrics.context_nll(logits, tokens_BT, ctx_B)


def _batches(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield slice(start, min(n, start + batch_size))


def batch_rows(n: int, batch_size: int) -> int:
  """Rows of every batch of n items: batch_size, or n when fewer (padding 8 prompts to a
  batch of 16 doubled the work of every pass, as the dry run's comp/use column showed)."""
  return max(1, min(int(batch_size), int(n)))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Pad to a full batch by repeating the last row (one compiled shape per run)."""
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


def generate_references(cfg: ModelConfig, params, prompts_PC, num_new: int,
                        batch_size: int, desc: str = "references") -> np.ndarray:
  """y = greedy(F, p, N) for every prompt: int32 [P, N].

  prompts_PC: int [P, c] (one length), or a sequence of P 1-D token arrays of mixed
  lengths (`ragged_references`)."""
  if len({len(p) for p in prompts_PC}) > 1:
    return ragged_references(cfg, params, prompts_PC, num_new, batch_size, desc)
  prompts_PC = np.asarray(prompts_PC)
  batch_size = batch_rows(len(prompts_PC), batch_size)
  out = []
  for sl in tqdm(list(_batches(len(prompts_PC), batch_size)), desc=desc, unit="batch"):
    chunk = prompts_PC[sl]
    y = greedy_generate(cfg, params, jnp.asarray(_pad_rows(chunk, batch_size)), num_new)
    out.append(np.asarray(y)[: len(chunk)])
  return check_finite_tokens(np.concatenate(out).astype(np.int32), desc)


def check_finite_tokens(y_PN: np.ndarray, desc: str = "references") -> np.ndarray:
  """y_PN (greedy tokens int32 [P, N]) unchanged, or DtmError naming the prompts whose
  decoding met non-finite logits (`generate.NON_FINITE`): a NaN's argmax would otherwise
  pass as token 0 and every metric against those references would be wrong."""
  bad = np.flatnonzero(np.any(y_PN == NON_FINITE, axis=1))
  if bad.size:
    raise DtmError(f"{desc}: greedy decoding met non-finite logits (NaN/inf) for {bad.size} "
                   f"of {len(y_PN)} prompts (rows {bad[:8].tolist()}"
                   f"{' ...' if bad.size > 8 else ''}); nothing was written for them")
  return y_PN


def ragged_references(cfg: ModelConfig, params, prompts, num_new: int, batch_size: int,
                      desc: str = "references") -> np.ndarray:
  """greedy(F, p, N) for P prompts of mixed lengths: int32 [P, N], row i equal to
  decoding prompt i alone. Prompts are taken longest first (rows of a batch have similar
  lengths), right-padded to `bucket` of the batch's longest (a few compiled widths) and
  decoded with a cache index per row (`greedy_generate` with lengths)."""
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if any(len(p) == 0 for p in prompts):
    raise ValueError("empty prompt: every prompt needs at least one token")
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  batch_size = batch_rows(len(prompts), batch_size)
  out = np.zeros((len(prompts), num_new), np.int32)
  for sl in tqdm(list(_batches(len(order), batch_size)), desc=desc, unit="batch"):
    rows = order[sl]
    lengths = np.array([len(prompts[i]) for i in rows], np.int32)
    tokens = np.zeros((len(rows), bucket(int(lengths.max()))), np.int32)
    for r, i in enumerate(rows):
      tokens[r, :lengths[r]] = prompts[i]
    y = greedy_generate(cfg, params, jnp.asarray(_pad_rows(tokens, batch_size)), num_new,
                        jnp.asarray(_pad_rows(lengths, batch_size)))
    out[rows] = np.asarray(y)[: len(rows)]
  return check_finite_tokens(out, desc)


def base_reference(cfg, params, seq_PS: np.ndarray, c: int, batch_size: int):
  """The base model's `metrics.HeadBase` per batch, kept on device (D floats per
  position instead of V logits)."""
  batch_size = batch_rows(len(seq_PS), batch_size)
  return [continuation_base(cfg, params, jnp.asarray(_pad_rows(seq_PS[sl], batch_size)), c)
          for sl in _batches(len(seq_PS), batch_size)]


def divergence(cfg: ModelConfig, params, seq_PS: np.ndarray, c: int, batch_size: int,
               base=None, desc: str = "teacher-forced") -> dict[str, np.ndarray]:
  """Per-prompt `divergence_stats` of params on s = p ⊕ y, gathered to host; `base` is
  `base_reference`'s list (one `HeadBase` per batch) for KL / top-1."""
  parts = []
  batch_size = batch_rows(len(seq_PS), batch_size)
  for i, sl in enumerate(tqdm(list(_batches(len(seq_PS), batch_size)), desc=desc, unit="batch")):
    seq = jnp.asarray(_pad_rows(seq_PS[sl], batch_size))
    stats = dtm_batch(cfg, params, seq, c, None if base is None else base[i])
    parts.append((sl.stop - sl.start, stats))
  host = jax.device_get(parts)  # one transfer at the end, no per-batch sync
  return {k: np.concatenate([s[k][:n] for n, s in host]) for k in host[0][1]}


def perplexity(cfg: ModelConfig, params, tokens_WT: np.ndarray, ctx_W: np.ndarray,
               batch_size: int, desc: str = "perplexity") -> dict[str, float]:
  """Context-aware perplexity over windows: exp(Σ NLL / Σ count), count of scored tokens."""
  parts = []
  batch_size = batch_rows(len(tokens_WT), batch_size)
  for sl in tqdm(list(_batches(len(tokens_WT), batch_size)), desc=desc, unit="batch"):
    toks = jnp.asarray(_pad_rows(tokens_WT[sl], batch_size))
    ctx = jnp.asarray(_pad_rows(ctx_W[sl], batch_size))
    parts.append((sl.stop - sl.start, ppl_batch(cfg, params, toks, ctx)))
  host = jax.device_get(parts)
  nll = sum(float(np.sum(s[:n])) for n, (s, _) in host)
  count = sum(int(np.sum(c[:n])) for n, (_, c) in host)
  return {"ppl": metrics.perplexity(nll, count), "nll_sum": nll, "tokens": count}


class HeldOut:
  """Held-out prompts with F's references, and perplexity windows: the validation set
  of compressed models (the evaluate job, recovery training, pruning rounds).

  `evaluate(params)` -> metrics.aggregate of the DTM pass (FDT_α, mean/median FDT, SDT,
  DPPL, KL / top-1 when `kl`) plus 'ppl' (context-aware, when windows are given). The
  base model's head statistics are computed once, at construction.
  """

  def __init__(self, cfg: ModelConfig, base_params, prompts_PC: np.ndarray,
               references_PN: np.ndarray, *, batch_size: int, alphas=metrics.DEFAULT_ALPHAS,
               kl: bool = True, ppl_tokens_WT: np.ndarray | None = None,
               ppl_ctx_W: np.ndarray | None = None, ppl_batch_size: int = 8):
    self.cfg = cfg.replace(remat=False)
    self.seq = np.concatenate([prompts_PC, references_PN], axis=1)
    self.c = prompts_PC.shape[1]
    self.batch_size = batch_size
    self.alphas = tuple(alphas)
    self.base = base_reference(self.cfg, base_params, self.seq, self.c, batch_size) if kl else None
    self.ppl_tokens, self.ppl_ctx, self.ppl_batch_size = ppl_tokens_WT, ppl_ctx_W, ppl_batch_size

  def per_prompt(self, params, desc: str = "teacher-forced") -> dict[str, np.ndarray]:
    return divergence(self.cfg, params, self.seq, self.c, self.batch_size, self.base, desc=desc)

  def perplexity(self, params, desc: str = "perplexity") -> dict[str, float] | None:
    if self.ppl_tokens is None:
      return None
    return perplexity(self.cfg, params, self.ppl_tokens, self.ppl_ctx, self.ppl_batch_size,
                      desc=desc)

  def evaluate(self, params) -> dict[str, float]:
    out = metrics.aggregate(self.per_prompt(params, desc="held-out DTMs"), self.alphas)
    ppl = self.perplexity(params, desc="held-out ppl")
    if ppl is not None:
      out["ppl"] = ppl["ppl"]
    return out
