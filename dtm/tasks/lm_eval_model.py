"""An lm-evaluation-harness model (`--model dtm`) backed by dtm's Flax Llama.

`DtmLM` scores requests the way lm-eval's HF backend (`lm_eval.models.huggingface.HFLM`)
does, so a task gives the same numbers through either:

* tokenization: `TemplateLM._encode_pair` (trailing context spaces move to the
  continuation; context + continuation encoded whole, then split), an empty context
  becomes [prefix token] (BOS, else EOS), `tok_encode` adds special tokens as HFLM's
  default does (the tokenizer's own setting, none when the text starts with BOS);
* loglikelihood(context, continuation) = Σ_j log softmax(F(x)[i_j])[y_j] in nats, with
  x = (context ⊕ continuation)[-(max_length+1):][:-1] and i_j the positions that predict
  the continuation tokens y_j; is_greedy = every y_j is the argmax there;
* loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens (first
  window after the prefix token), summed;
* generate_until: greedy decoding with the KV cache, cut at the first stop sequence
  (and EOS), context left-truncated to max_length - max_gen_toks; `batch_size` requests
  of mixed lengths per decoding call, each with its own stop sequences and max_gen_toks
  (`dtm.tasks.decoding`), every output the one the request gets alone.

Requests are packed, not padded: the continuations of one context share a single copy
of it (multiple-choice tasks score every choice after the same context), and such
pieces are packed into rows of T tokens (T >= the longest request, at least ROW_MIN),
`batch_size` rows per forward pass, with an attention mask that keeps every piece and
every continuation to itself (`packed_hidden`). So a task compiles a few shapes and
computes the context once per document, not once per choice; only the positions that
predict continuation tokens go through the LM head (logits [K, V], never [B, T, V]).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from dtm import compress
from dtm.errors import DtmError
from dtm.loading import LoadedModel, load_model
from dtm.generate import bucket
from dtm.model import Llama
from dtm.tasks import decoding
from dtm.model_config import ModelConfig

log = logging.getLogger("dtm")

ROW_MIN = 128  # shortest packed row (tokens): room for a context and its choices


@dataclasses.dataclass(frozen=True)
class Piece:
  """One row segment: a context prefix followed by the inputs of the continuations
  scored after it (each attends to the prefix and to itself only).

  prefix: the tokens every member request shares; members: request indices; length:
  tokens the piece takes in a row (len(prefix) + Σ (len(continuation) - 1)).
  """
  prefix: tuple[int, ...]
  members: tuple[int, ...]
  length: int


def plan_pieces(requests: list[tuple[list[int], list[int]]], row_len: int) -> list[Piece]:
  """Group (input prefix, continuation) requests by prefix into pieces of <= row_len
  tokens. The model input of request (p, c) is p ⊕ c[:-1] and c is predicted from the
  last token of p on; len(p) + len(c) - 1 <= row_len for every request (else ValueError).
  A prefix whose continuations do not fit in one row is split over several pieces."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, (prefix, cont) in enumerate(requests):
    if not prefix or not cont or len(prefix) + len(cont) - 1 > row_len:
      raise ValueError(f"request {i}: {len(prefix)} + {len(cont)} tokens do not fit a row "
                       f"of {row_len}")
    groups.setdefault(tuple(prefix), []).append(i)
  pieces = []
  for prefix, members in groups.items():
    chunk, length = [], len(prefix)
    for i in members:
      extra = len(requests[i][1]) - 1
      if chunk and length + extra > row_len:
        pieces.append(Piece(prefix, tuple(chunk), length))
        chunk, length = [], len(prefix)
      chunk.append(i)
      length += extra
    pieces.append(Piece(prefix, tuple(chunk), length))
  return pieces


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
  """Best-fit decreasing bin packing: indices of `lengths` (each <= row_len) into rows
  of row_len tokens; each item goes to the fullest row that still holds it."""
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (tokens left, row index), sorted
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    j = bisect.bisect_left(free, (lengths[i], -1))
    if j == len(free):
      rows.append([])
      left, r = row_len, len(rows) - 1
    else:
      left, r = free.pop(j)
    rows[r].append(i)
    left -= lengths[i]
    if left > 0:
      bisect.insort(free, (left, r))
  return rows


def layout_rows(pieces: list[Piece], rows: list[list[int]], requests, n_rows: int,
                row_len: int):
  """Arrays for `packed_scores` from rows of pieces (padded to n_rows rows).

  Returns (tokens, positions, piece ids, branch ids) int32 [n_rows, row_len] (piece id 0
  and position 0 are padding; branch 0 is a prefix token, j the j-th member's input),
  flat target positions and target ids int32 [K] (K = a bucket of the number of
  continuation tokens), and spans: (request index, start, stop) into the K axis.
  """
  tokens, positions, piece_ids, branches = (np.zeros((n_rows, row_len), np.int32)
                                            for _ in range(4))
  flat, targets, spans = [], [], []
  for r, row in enumerate(rows):
    t = 0
    for n, p in enumerate(row, 1):
      piece = pieces[p]
      pl = len(piece.prefix)
      tokens[r, t:t + pl] = piece.prefix
      positions[r, t:t + pl] = np.arange(pl)
      piece_ids[r, t:t + pl] = n
      last_prefix, t = r * row_len + t + pl - 1, t + pl
      for j, i in enumerate(piece.members, 1):
        cont = requests[i][1]
        k = len(cont) - 1
        tokens[r, t:t + k] = cont[:-1]
        positions[r, t:t + k] = np.arange(pl, pl + k)
        piece_ids[r, t:t + k] = n
        branches[r, t:t + k] = j
        spans.append((i, len(flat), len(flat) + k + 1))
        flat += [last_prefix] + list(range(r * row_len + t, r * row_len + t + k))
        targets += cont
        t += k
  size = bucket(len(flat), minimum=64)
  flat_K = np.zeros((size,), np.int32)
  targets_K = np.zeros((size,), np.int32)
  flat_K[:len(flat)], targets_K[:len(targets)] = flat, targets
  return (tokens, positions, piece_ids, branches), flat_K, targets_K, spans


@functools.partial(jax.jit, static_argnames=("cfg",))
def packed_hidden(cfg: ModelConfig, params, tokens_BT, positions_BT, pieces_BT, branches_BT):
  """Residual stream [B, T, D] of packed rows (`layout_rows`): token t attends to token s
  of its row when both belong to the same piece, s's position is <= t's, and s is a
  prefix token or in t's branch."""
  pos_q, pos_k = positions_BT[:, :, None], positions_BT[:, None, :]
  br_q, br_k = branches_BT[:, :, None], branches_BT[:, None, :]
  mask_BTS = ((pieces_BT[:, :, None] == pieces_BT[:, None, :]) & (pos_k <= pos_q)
              & ((br_k == 0) | (br_k == br_q)))
  h_BTD, _ = Llama(cfg).apply({"params": params}, tokens_BT, method=Llama.hidden,
                              packing=(positions_BT, mask_BTS))
  return h_BTD


@functools.partial(jax.jit, static_argnames=("cfg",))
def packed_scores(cfg: ModelConfig, params, h_BTD, flat_K, targets_K):
  """(log p float32 nats [K], is-argmax bool [K]) of targets_K predicted at the flat
  positions flat_K (row * T + t) of h_BTD; only these K rows go through the LM head."""
  h_KD = h_BTD.reshape(-1, h_BTD.shape[-1])[flat_K]
  logits_KV = Llama(cfg).apply({"params": params}, h_KD[None], method=Llama.logits)[0]
  logp_KV = jax.nn.log_softmax(logits_KV.astype(jnp.float32), axis=-1)
  logp_K = jnp.take_along_axis(logp_KV, targets_K[:, None], axis=-1)[:, 0]
  return logp_K, jnp.argmax(logits_KV, axis=-1) == targets_K


@register_model("dtm")
class DtmLM(TemplateLM):
  """lm-eval model backed by dtm (see the module docstring for the scoring rules).

  model: any `dtm.loading.load_model` name ('smollm2-135m', .gguf, HF dir, dtm dir, hub
  id), or `loaded`, an already loaded `LoadedModel` (several compressions share one
  load); compression: a spec string ('' = the original model; calibrated methods need
  `params` made by `dtm.jobs.common.compress_model`); params: compressed params to use
  instead of compressing here; batch_size: packed rows per forward pass (each of T tokens,
  T >= the longest request, holding as many requests as fit); max_length: the
  context limit in tokens (default: the model's max_position_embeddings).
  """

  def __init__(self, model: str = "smollm2-135m", compression: str = "", batch_size=8,
               max_length=None, max_gen_toks: int = 256, param_dtype: str = "float32",
               dtype: str = "float32", loaded: LoadedModel | None = None, params=None,
               **ignored):
    super().__init__()
    for key in ("device", "max_batch_size"):
      ignored.pop(key, None)
    if ignored:
      raise DtmError(f"dtm lm-eval model: unknown arguments {sorted(ignored)}")
    batch_size = _positive_int(batch_size, "batch_size")
    compression = compress.parse_spec(compression).to_string()  # syntax, before the load
    if loaded is None:
      loaded = load_model(model, param_dtype=param_dtype, dtype=dtype)
    if loaded.tokenizer is None:
      raise DtmError(f"model {loaded.source} has no tokenizer; lm-eval tasks need one")
    self.loaded = loaded
    self.cfg = loaded.cfg.replace(remat=False)
    self.tokenizer = loaded.tokenizer
    self.compression = compression
    self.report: dict = {}
    if params is None:
      params, self.report = compress.apply_spec(loaded.params, self.compression)
    self.params = params
    self._batch_size = batch_size
    self._max_length = (_positive_int(max_length, "max_length") if max_length
                        else int(self.cfg.max_position_embeddings))
    self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
    self.seconds = {"loglikelihood": 0.0, "generate": 0.0}

  # --- what lm-eval reads -----------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return getattr(self.tokenizer, "name_or_path", "") or self.loaded.source

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """HFLM.tok_encode with add_bos_token unset: the tokenizer's default special tokens,
    none when the text already starts with the prefix (BOS) token's text."""
    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None and string.startswith(
        self.tokenizer.decode(self.prefix_token_id)):
      kw["add_special_tokens"] = False
    ids = self.tokenizer.encode(string, **kw)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  # --- loglikelihood ------------------------------------------------------------------
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """[(cache key, context ids, continuation ids)] -> [(Σ log p nats, is_greedy)]."""
    t0 = time.perf_counter()
    inputs = []
    for _, ctx, cont in requests:
      if not ctx or not cont:
        raise DtmError("loglikelihood request with an empty context or continuation")
      if len(cont) > self.max_length:
        raise DtmError(f"continuation of {len(cont)} tokens exceeds max_length "
                       f"{self.max_length}")
      full = (ctx + cont)[-(self.max_length + 1):]  # HFLM's left truncation
      inputs.append((full[:len(full) - len(cont)], cont))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    if not inputs:
      return out
    row_len = max(bucket(max(len(p) + len(c) - 1 for p, c in inputs)), ROW_MIN)
    pieces = plan_pieces(inputs, row_len)
    rows = pack_rows([p.length for p in pieces], row_len)
    bar = tqdm(total=len(requests), desc="dtm loglikelihood", unit="req",
               disable=disable_tqdm)
    pending = None
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      n_rows = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
      arrays, flat, targets, spans = layout_rows(pieces, chunk, inputs, n_rows, row_len)
      h = packed_hidden(self.cfg, self.params, *map(jnp.asarray, arrays))
      scores = packed_scores(self.cfg, self.params, h, jnp.asarray(flat), jnp.asarray(targets))
      if pending is not None:  # read back one batch late: the device never waits for us
        self._collect(pending, requests, out, bar)
      pending = (spans, scores)
    self._collect(pending, requests, out, bar)
    bar.close()
    self.seconds["loglikelihood"] += time.perf_counter() - t0
    return out

  def _collect(self, pending, requests, out, bar) -> None:
    spans, (logp, greedy) = pending
    logp, greedy = np.asarray(logp), np.asarray(greedy)
    for i, a, b in spans:
      answer = (float(np.sum(logp[a:b], dtype=np.float64)), bool(np.all(greedy[a:b])))
      out[i] = answer
      if requests[i][0] is not None:
        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
    bar.update(len(spans))

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Σ log p of each whole string over lm-eval's disjoint rolling windows (nats)."""
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(i)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, scores):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # --- generation ---------------------------------------------------------------------
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuation of each context, cut at its first stop sequence (EOS is one):
    `batch_size` requests per decoding call, longest contexts first, each with its own
    stop sequences and max_gen_toks (lm-eval's `until` / `max_gen_toks` kwargs)."""
    t0 = time.perf_counter()
    eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    jobs = []
    for req in requests:
      context, gen_kwargs = req.args
      until, max_new = _greedy_kwargs(gen_kwargs, self.max_gen_toks, eos_text)
      ctx = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
      jobs.append(decoding.Request(tuple(ctx or [self.prefix_token_id]), max_new, tuple(until)))
    out: list[str | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="dtm generate_until", unit="req", disable=disable_tqdm)
    for batch in decoding.batches(jobs, self.batch_size):
      rows = min(self.batch_size, 1 << (len(batch) - 1).bit_length())
      news = decoding.generate_batch(self.cfg, self.params, [jobs[i] for i in batch], rows,
                                     self._stopped)
      for i, new in zip(batch, news):
        out[i] = self._text(new, jobs[i])
        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
      bar.update(len(batch))
    bar.close()
    self.seconds["generate"] += time.perf_counter() - t0
    return out

  def _text(self, new: list[int], job: decoding.Request) -> str:
    """lm-eval's answer from the new tokens: the first max_new, cut at EOS, decoded,
    cut before the first occurrence of each stop sequence in turn."""
    new = new[:job.max_new]
    if self.eot_token_id in new:
      new = new[:new.index(self.eot_token_id)]
    text = self.tok_decode(new)
    for stop in job.until:
      if stop:
        text = text.split(stop)[0]
    return text

  def _stopped(self, new: list[int], until: list[str]) -> bool:
    if self.eot_token_id in new:
      return True
    text = self.tok_decode(new, skip_special_tokens=False)
    return any(stop and stop in text for stop in until)


def _greedy_kwargs(gen_kwargs: dict, default_max: int, eos_text: str) -> tuple[list[str], int]:
  """(stop sequences incl. EOS text, max new tokens); DtmError for sampling requests."""
  kw = dict(gen_kwargs)
  until = kw.pop("until", None)
  until = [until] if isinstance(until, str) else list(until or [])
  if eos_text not in until:
    until.append(eos_text)
  max_new = next((kw.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                  if kw.get(k) is not None), default_max)
  if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0.0:
    raise DtmError("dtm's lm-eval model decodes greedily only (do_sample/temperature > 0 "
                   "requested by the task)")
  return until, _positive_int(max_new, "max_gen_toks")


def _positive_int(value, name: str) -> int:
  """int(value) if it is a whole number >= 1 (also as a string, as lm-eval passes model
  args); else DtmError."""
  text = str(value).strip()
  if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
    raise DtmError(f"{name} must be a positive integer, got {value!r}")
  return int(text)
