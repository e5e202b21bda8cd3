"""Greedy decoding with the KV cache, batched and compiled once per shape.

Prompts of one length decode with one scalar cache index (`greedy_generate` without
lengths: the fast path). Prompts of mixed lengths are right-padded to a common width P
and decode with a cache index per row (`Llama.hidden` with cache_index [B]): row b's
prompt fills slots 0..n_b-1, its padding slots n_b..P-1 are masked (causal rule by
absolute position) until decoding overwrites them, and its j-th new token sits at
position n_b + j, as it would alone. So a row's tokens do not depend on the other rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dtm.model import KVCache, Llama
from dtm.model_config import ModelConfig


def bucket(n: int, cap: int | None = None, minimum: int = 16) -> int:
  """Padded length for n >= 1 tokens: n rounded up to a multiple of max(minimum, 2^(b-3)),
  b = bit length of n-1 (under 25 % padding past 64 tokens, four shapes per doubling of
  length), at most `cap`."""
  step = max(minimum, 1 << max(0, (n - 1).bit_length() - 3))
  out = -(-n // step) * step
  return min(out, cap) if cap else out


# Emitted by `greedy_generate` in place of a token whose logits were not all finite (the
# argmax of NaN logits would be token 0, a valid id): no tokenizer has it.
NON_FINITE = -1


def _prefill_logits(cfg: ModelConfig, params, tokens_BP: jax.Array, lengths_B: jax.Array | None,
                    cache_len: int):
  """`_prefill`'s pass: (logits of each row's last prompt position float [B, V], cache)."""
  model = Llama(cfg)
  cache = KVCache.zeros(cfg, tokens_BP.shape[0], cache_len)
  h_BPD, cache = model.apply({"params": params}, tokens_BP, cache, 0, method=Llama.hidden)
  if lengths_B is None:
    h_B1D = h_BPD[:, -1:]
  else:
    h_B1D = jnp.take_along_axis(h_BPD, (lengths_B - 1)[:, None, None], axis=1)
  logits = model.apply({"params": params}, h_B1D, method=Llama.logits)
  return logits[:, 0], cache


def _prefill(cfg: ModelConfig, params, tokens_BP: jax.Array, lengths_B: jax.Array | None,
             cache_len: int):
  """Prompts tokens_BP (int32 [B, P]; right-padded, the first lengths_B[b] of row b real,
  or all P when lengths_B is None) into a fresh cache of cache_len slots.
  Returns (first greedy token int32 [B], cache)."""
  logits_BV, cache = _prefill_logits(cfg, params, tokens_BP, lengths_B, cache_len)
  return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), cache


def _mark(token_B: jax.Array, logits_BV: jax.Array) -> jax.Array:
  """token_B, or NON_FINITE in the rows whose logits hold a NaN or inf."""
  return jnp.where(jnp.all(jnp.isfinite(logits_BV), axis=-1), token_B, NON_FINITE)


def _decode(cfg: ModelConfig, params, token_B: jax.Array, cache: KVCache, index, steps: int,
            mark_non_finite: bool = False):
  """`steps` greedy steps: feed token_B at position `index` (scalar, or int32 [B] per
  row), emit the argmax, feed it at index + 1, ... Returns (new tokens int32 [B, steps],
  cache). mark_non_finite: emit NON_FINITE where a step's logits are not all finite (the
  argmax is still fed back)."""
  model = Llama(cfg)

  def step(carry, _):
    token, cache, i = carry
    logits, cache = model.apply({"params": params}, token[:, None], cache, i)
    nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    out = _mark(nxt, logits[:, 0]) if mark_non_finite else nxt
    return (nxt, cache, i + 1), out

  (_, cache, _), out_SB = jax.lax.scan(step, (token_B, cache, index), None, length=steps)
  return out_SB.T, cache


prefill = jax.jit(_prefill, static_argnames=("cfg", "cache_len"))
prefill.__doc__ = _prefill.__doc__
decode = jax.jit(_decode, static_argnames=("cfg", "steps"), donate_argnames=("cache",))
decode.__doc__ = _decode.__doc__


@functools.partial(jax.jit, static_argnames=("cfg", "num_new"))
def greedy_generate(cfg: ModelConfig, params, prompts_BC: jax.Array, num_new: int,
                    lengths_B: jax.Array | None = None) -> jax.Array:
  """y = greedy(F, p, N): exactly N new tokens by argmax decoding (no stop at EOS).

  prompts_BC: int32 [B, c]; all prompts c tokens long when lengths_B is None, else
  right-padded, row b's prompt its first lengths_B[b] tokens (1 <= lengths_B[b] <= c).
  Returns int32 [B, N], each row equal to decoding its prompt alone; NON_FINITE (-1) where
  the model's logits were not all finite (`evaluation.check_finite_tokens` turns that into
  an error). Argmax takes the first maximum on exact ties. One prefill pass over the
  prompts fills a cache of length c+N, then a `lax.scan` emits one token per step.
  """
  c = prompts_BC.shape[1]
  logits_BV, cache = _prefill_logits(cfg, params, prompts_BC, lengths_B, c + num_new)
  first = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  index = jnp.int32(c) if lengths_B is None else lengths_B.astype(jnp.int32)
  rest, _ = _decode(cfg, params, first, cache, index, num_new - 1, mark_non_finite=True)
  return jnp.concatenate([_mark(first, logits_BV)[:, None], rest], axis=1)
