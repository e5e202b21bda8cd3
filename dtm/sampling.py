"""Divergent token metrics under sampling decoding, with randomness shared by F and F'.

Greedy FDT asks when F' first stops reproducing F's argmax continuation. Under sampling
(temperature, top-k, top-p) the continuation is random, so "F' reproduces F" needs both
models to see the *same* randomness. dtm fixes it per (prompt, position) by the Gumbel-max
trick: with filtered logits

  l~_v = l_v / T   for v in the top-k / top-p (nucleus) set of softmax(l / T),  -inf else,

sampling from softmax(l~) is argmax_v (l~_v + g_v) with g_v ~ Gumbel(0, 1) i.i.d. The
noise g[p, j, :] (prompt p, continuation position j) is a pure function of
(seed, prompt index, j): `position_noise`. Then

  y_j  = argmax_v (l~^F_j(v)  + g[p, j, v])     F sampling its own continuation y,
  z_j  = argmax_v (l~^F'_j(v) + g[p, j, v])     F' teacher-forced on s = p ⊕ y,

  divergent_j = z_j != y_j,   FDT = min{ j : divergent_j } (N if none),   SDT = mean_j divergent_j.

Properties (tested): F' = F gives FDT = N and SDT = 0 (same logits, same noise, same
argmax); the teacher-forced FDT equals the first position where F' *actually sampling*
with the same noise (`sample_generate`) differs from y, because before that position both
runs have the same prefix and so the same logits; T -> 0 or top_k = 1 recovers greedy
FDT. As for greedy FDT, SDT counts divergences at every position of F's continuation
(F' stays teacher-forced after its first divergence). One teacher-forced pass computes
everything, as for greedy FDT. Ties of l~ + g (probability zero in exact arithmetic) go
to the lowest token id, as `jnp.argmax`.

Shapes: B prompts in a batch, c prompt tokens, N continuation tokens, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dtm import metrics
from dtm.errors import DtmError
from dtm.model import KVCache, Llama, head_matrix
from dtm.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Sampling decoding: temperature T > 0, top_k (0 = off), top_p in (0, 1] (1 = off),
  and the seed of the shared Gumbel noise."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not (np.isfinite(self.temperature) and self.temperature > 0):
      raise DtmError(f"sampling temperature must be > 0, got {self.temperature} (greedy "
                     f"decoding is the evaluate job's default path)")
    if self.top_k < 0:
      raise DtmError(f"sampling top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise DtmError(f"sampling top_p must be in (0, 1] (1 = no nucleus filter), got "
                     f"{self.top_p}")

  def describe(self) -> dict:
    return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
            "seed": self.seed, "noise": "Gumbel-max, one draw per (prompt index, position)"}


def filtered_logits(logits_BV: jax.Array, s: Sampling) -> jax.Array:
  """l / T with -inf outside the top-k and top-p sets: float32 [..., V].

  top-k keeps the k largest (ties at the k-th value all kept); then top-p, on the
  top-k-filtered and renormalized distribution (the order of HF's logits warpers), keeps
  the smallest prefix of tokens in descending probability whose mass reaches p (the
  most likely token always; ties at the cut kept).
  """
  x = jnp.asarray(logits_BV, jnp.float32) / jnp.float32(s.temperature)
  v = x.shape[-1]
  if 0 < s.top_k < v:
    kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if s.top_p < 1.0:
    srt = jnp.sort(x, axis=-1)[..., ::-1]
    p = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p        # mass strictly above each sorted token
    keep = before < jnp.float32(s.top_p)       # first token: before = 0 < p
    cut = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= cut, x, -jnp.inf)
  return x


def position_noise(seed: int, prompt_index_B: jax.Array, position: jax.Array | int,
                   vocab: int) -> jax.Array:
  """Gumbel(0, 1) noise float32 [B, V] for continuation position `position` of the prompts
  with global indices prompt_index_B (so batching and padding do not change the noise)."""
  base = jax.random.PRNGKey(seed)

  def one(i):
    key = jax.random.fold_in(jax.random.fold_in(base, i), position)
    return jax.random.gumbel(key, (vocab,), jnp.float32)

  return jax.vmap(one)(jnp.asarray(prompt_index_B, jnp.int32))


def sample_token(logits_BV: jax.Array, noise_BV: jax.Array, s: Sampling) -> jax.Array:
  """argmax_v (filtered(l)_v + g_v): int32 [B]."""
  return jnp.argmax(filtered_logits(logits_BV, s) + noise_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "num_new", "sampling"))
def sample_generate(cfg: ModelConfig, params, prompts_BC: jax.Array, prompt_index_B: jax.Array,
                    num_new: int, sampling: Sampling) -> jax.Array:
  """N sampled tokens per prompt with the KV cache: int32 [B, N] (no stop at EOS).

  Token j uses `position_noise(seed, prompt_index, j)`; the same model, prompts and seed
  give the same tokens, and two models with the same seed share every draw.
  """
  model = Llama(cfg)
  b, c = prompts_BC.shape
  v = cfg.vocab_size
  cache = KVCache.zeros(cfg, b, c + num_new)
  h, cache = model.apply({"params": params}, prompts_BC, cache, 0, method=Llama.hidden)
  logits = model.apply({"params": params}, h[:, -1:], method=Llama.logits)
  first = sample_token(logits[:, 0], position_noise(sampling.seed, prompt_index_B, 0, v), sampling)

  def step(carry, j):
    token_B, cache, index = carry
    logits, cache = model.apply({"params": params}, token_B[:, None], cache, index)
    nxt = sample_token(logits[:, 0], position_noise(sampling.seed, prompt_index_B, j, v), sampling)
    return (nxt, cache, index + 1), token_B

  (last, _, _), tokens_NB = jax.lax.scan(step, (first, cache, jnp.int32(c)),
                                         jnp.arange(1, num_new, dtype=jnp.int32))
  return jnp.concatenate([tokens_NB.T, last[:, None]], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "c", "sampling"))
def sampled_divergence_batch(cfg: ModelConfig, params, seq_BS: jax.Array, prompt_index_B,
                             c: int, sampling: Sampling) -> dict[str, jax.Array]:
  """Sampled FDT / SDT of F' (params) on s = p ⊕ y (y sampled by F with the same seed).

  seq_BS: int32 [B, c+N]. One teacher-forced pass; the head runs position by position
  (`lax.map` over N, [B, V] logits at a time). Returns fdt int32 [B], sdt f32 [B], nll
  f32 [B, N] (−log softmax of the *unfiltered* temperature-1 logits at y_j, in nats, as
  for DPPL) and the teacher-forced samples z int32 [B, N].
  """
  model = Llama(cfg)
  h, _ = model.apply({"params": params}, seq_BS[:, :-1], method=Llama.hidden)
  x_NBD = jnp.swapaxes(model.apply({"params": params}, h[:, c - 1:], method=Llama.normed), 0, 1)
  y_NB = jnp.swapaxes(seq_BS[:, c:], 0, 1)
  head = head_matrix(cfg, params)
  dt = jnp.dtype(cfg.dtype)

  def position(args):
    j, x_BD, y_B = args
    logits = jnp.dot(x_BD.astype(dt), head.astype(dt).T, preferred_element_type=jnp.float32)
    z = sample_token(logits, position_noise(sampling.seed, prompt_index_B, j, cfg.vocab_size),
                     sampling)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y_B[:, None], -1)[:, 0]
    return z, nll

  n = y_NB.shape[0]
  z_NB, nll_NB = jax.lax.map(position, (jnp.arange(n, dtype=jnp.int32), x_NBD, y_NB))
  z_BN, y_BN = z_NB.T, y_NB.T
  fdt, sdt = metrics.fdt_sdt_from_divergent(z_BN != y_BN)
  return {"fdt": fdt, "sdt": sdt, "nll": nll_NB.T, "samples": z_BN}


def _batches(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield np.arange(start, min(n, start + batch_size))


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
  return x if len(x) == rows else np.concatenate([x, np.repeat(x[-1:], rows - len(x), 0)])


def sample_references(cfg: ModelConfig, params, prompts_PC: np.ndarray, num_new: int,
                      sampling: Sampling, batch_size: int, desc: str = "sampled references"
                      ) -> np.ndarray:
  """y = sample(F, p, N) for every prompt (prompt index = row index): int32 [P, N]."""
  out = []
  for idx in tqdm(list(_batches(len(prompts_PC), batch_size)), desc=desc, unit="batch"):
    rows = _padded(idx, batch_size)
    y = sample_generate(cfg, params, jnp.asarray(prompts_PC[rows]), jnp.asarray(rows),
                        num_new, sampling)
    out.append(np.asarray(y)[: len(idx)])
  return np.concatenate(out).astype(np.int32)


def sampled_divergence(cfg: ModelConfig, params, prompts_PC: np.ndarray, y_PN: np.ndarray,
                       sampling: Sampling, batch_size: int, desc: str = "sampled DTMs"
                       ) -> dict[str, np.ndarray]:
  """Per-prompt sampled fdt [P], sdt [P], nll [P, N], samples [P, N] of F' against F's
  sampled continuation y (from `sample_references` with the same `sampling`)."""
  if prompts_PC.shape[0] != y_PN.shape[0]:
    raise DtmError(f"{prompts_PC.shape[0]} prompts but {y_PN.shape[0]} sampled continuations")
  seq = np.concatenate([prompts_PC, y_PN], axis=1).astype(np.int32)
  c = prompts_PC.shape[1]
  parts = []
  for idx in tqdm(list(_batches(len(seq), batch_size)), desc=desc, unit="batch"):
    rows = _padded(idx, batch_size)
    parts.append((len(idx), sampled_divergence_batch(cfg, params, jnp.asarray(seq[rows]),
                                                     jnp.asarray(rows), c, sampling)))
  host = jax.device_get(parts)
  return {k: np.concatenate([s[k][:n] for n, s in host]) for k in host[0][1]}


def first_mismatch(a_PN: np.ndarray, b_PN: np.ndarray) -> np.ndarray:
  """Index of the first position where two token arrays differ, N where none: int [P]."""
  diff = np.asarray(a_PN) != np.asarray(b_PN)
  return np.where(diff.any(axis=1), diff.argmax(axis=1), diff.shape[1])
