"""Greedy decoding with the KV cache, batched and compiled once per shape."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dtm.model import KVCache, Llama
from dtm.model_config import ModelConfig


@functools.partial(jax.jit, static_argnames=("cfg", "num_new"))
def greedy_generate(cfg: ModelConfig, params, prompts_BC: jax.Array, num_new: int) -> jax.Array:
  """y = greedy(F, p, N): exactly N new tokens by argmax decoding (no stop at EOS).

  prompts_BC: int32 [B, c], all prompts of the same length c (no padding).
  Returns int32 [B, N]. Argmax takes the first maximum on exact ties.
  One prefill pass over the prompt fills a cache of length c+N, then a
  `lax.scan` emits one token per step.
  """
  model = Llama(cfg)
  b, c = prompts_BC.shape
  cache = KVCache.zeros(cfg, b, c + num_new)
  h, cache = model.apply({"params": params}, prompts_BC, cache, 0, method=Llama.hidden)
  logits = model.apply({"params": params}, h[:, -1:], method=Llama.logits)
  first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

  def step(carry, _):
    token_B, cache, index = carry
    logits, cache = model.apply({"params": params}, token_B[:, None], cache, index)
    nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return (nxt, cache, index + 1), token_B

  (last, _, _), tokens_NB = jax.lax.scan(step, (first, cache, jnp.int32(c)), None,
                                         length=num_new - 1)
  return jnp.concatenate([tokens_NB.T, last[:, None]], axis=1)
