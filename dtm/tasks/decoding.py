"""Greedy decoding of generate_until requests in batches, each row with its own stop rule.

A batch holds up to `batch_size` requests of mixed context lengths: contexts are
right-padded to one width and decode with a cache index per row (`dtm.generate.prefill`
/ `decode` with lengths), so each row's tokens are those it would get alone. Decoding
runs GEN_CHUNK steps per compiled call; after each call the host asks every row that is
still running whether it is done (its own stop sequences, EOS, its own token limit), and
a done row keeps the tokens it had at that moment: exactly the tokens that decoding the
request alone, chunk by chunk, returns. The batch ends when every row is done.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from dtm.generate import bucket, decode, prefill
from dtm.model import KVCache
from dtm.model_config import ModelConfig

GEN_CHUNK = 16  # decoding steps per compiled call between host checks for stop sequences


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation: context token ids (at least one), the most new tokens, and the
  stop strings (`stopped` decides what they mean)."""
  tokens: tuple[int, ...]
  max_new: int
  until: tuple[str, ...]


def batches(requests: list[Request], batch_size: int) -> list[list[int]]:
  """Request indices in batches of batch_size, longest context first (as lm-eval's HF
  backend orders them), so a batch's rows have similar lengths."""
  order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_batch(cfg: ModelConfig, params, batch: list[Request], rows: int,
                   stopped: Callable[[list[int], tuple[str, ...]], bool]) -> list[list[int]]:
  """New token ids of each request (the caller cuts at max_new and at the stops).

  rows >= len(batch) is the compiled batch size (extra rows decode a one-token dummy).
  Contexts are padded to `bucket` of the longest; the cache holds that width plus room
  for one chunk of steps and doubles its room when a chunk needs more (up to what the
  largest max_new needs, in whole chunks): short answers never pay for a long cache.
  """
  lengths = np.ones((rows,), np.int32)
  lengths[:len(batch)] = [len(r.tokens) for r in batch]
  width = bucket(int(lengths.max()))
  steps = -(-max(max(r.max_new for r in batch) - 1, 0) // GEN_CHUNK) * GEN_CHUNK
  tokens = np.zeros((rows, width), np.int32)
  for i, r in enumerate(batch):
    tokens[i, :len(r.tokens)] = r.tokens
  index = jnp.asarray(lengths)
  room = min(GEN_CHUNK, steps)  # decoding steps the cache has slots for
  token, cache = prefill(cfg, params, jnp.asarray(tokens), index, cache_len=width + room)
  new = [[int(t)] for t in np.asarray(token)[:len(batch)]]
  done = [_done(new[i], r, stopped) for i, r in enumerate(batch)]
  chunks = 0
  while not all(done):
    chunks += 1
    if chunks * GEN_CHUNK > room:
      cache, room = _grow(cache, room, min(2 * room, steps))
    chunk, cache = decode(cfg, params, token, cache, index, GEN_CHUNK)
    token, index = chunk[:, -1], index + GEN_CHUNK
    host = np.asarray(chunk)
    for i, r in enumerate(batch):
      if not done[i]:
        new[i] += host[i].tolist()
        done[i] = _done(new[i], r, stopped)
  return new


def _grow(cache: KVCache, room: int, new_room: int) -> tuple[KVCache, int]:
  """The cache with new_room - room more (empty) slots at the end of its S axis."""
  pad = [(0, 0)] * cache.k.ndim
  pad[3] = (0, new_room - room)  # [L, B, Hkv, S, K]
  return KVCache(*(jnp.pad(x, pad) for x in cache)), new_room


def _done(new: list[int], r: Request, stopped) -> bool:
  return len(new) >= r.max_new or stopped(new, r.until)
