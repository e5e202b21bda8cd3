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
  (and EOS), context left-truncated to max_length - max_gen_toks.

Requests are sorted by length, longest first (HFLM's order), batched `batch_size` at a
time and right-padded to a length bucket (`bucket`), so a task compiles a few shapes;
every batch has `batch_size` rows (the last is padded by repeating a row). Only the
continuation positions go through the LM head: logits are [B, C, V], never [B, T, V].
"""
from __future__ import annotations

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
from dtm.model import KVCache, Llama
from dtm.model_config import ModelConfig

log = logging.getLogger("dtm")

GEN_CHUNK = 16  # decoding steps per compiled call between host checks for stop sequences


def bucket(n: int, cap: int | None = None, minimum: int = 16) -> int:
  """Padded length for n >= 1 tokens: n rounded up to a multiple of max(minimum, 2^(b-3)),
  b = bit length of n-1 (under 25 % padding past 64 tokens, four shapes per doubling of
  length), at most `cap`."""
  step = max(minimum, 1 << max(0, (n - 1).bit_length() - 3))
  out = -(-n // step) * step
  return min(out, cap) if cap else out


def bucket_pow2(n: int, cap: int) -> int:
  """The smallest power of two >= n, at most `cap` (continuation lengths)."""
  return min(cap, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_batch(cfg: ModelConfig, params, tokens_BT, first_B, targets_BC):
  """Log-probabilities of continuation tokens, teacher-forced.

  tokens_BT: int32 model input (right-padded); the logits at position first_B[b] + j
  predict targets_BC[b, j]. Returns (logp_BC float32 nats, greedy_BC bool: targets_BC is
  the argmax there). Positions past a row's continuation hold junk the caller drops.
  """
  model = Llama(cfg)
  h_BTD, _ = model.apply({"params": params}, tokens_BT, method=Llama.hidden)
  t, c = tokens_BT.shape[1], targets_BC.shape[1]
  pos_BC = jnp.minimum(first_B[:, None] + jnp.arange(c)[None, :], t - 1)
  h_BCD = jnp.take_along_axis(h_BTD, pos_BC[..., None], axis=1)
  logits_BCV = model.apply({"params": params}, h_BCD, method=Llama.logits)
  logp_BCV = jax.nn.log_softmax(logits_BCV.astype(jnp.float32), axis=-1)
  logp_BC = jnp.take_along_axis(logp_BCV, targets_BC[..., None], axis=-1)[..., 0]
  return logp_BC, jnp.argmax(logits_BCV, axis=-1) == targets_BC


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(cfg: ModelConfig, params, tokens_1P, length, cache_len: int):
  """Prompt tokens_1P (int32 [1, P], right-padded; the first `length` are real) into a
  fresh KV cache of cache_len positions -> (first greedy token [1], cache). Padding
  rows of the cache sit after the prompt and are overwritten by decoding before any
  query can attend to them (causal mask by absolute position)."""
  model = Llama(cfg)
  cache = KVCache.zeros(cfg, 1, cache_len)
  h_1PD, cache = model.apply({"params": params}, tokens_1P, cache, 0, method=Llama.hidden)
  h_11D = jax.lax.dynamic_slice_in_dim(h_1PD, length - 1, 1, axis=1)
  logits = model.apply({"params": params}, h_11D, method=Llama.logits)
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("cfg", "steps"), donate_argnames=("cache",))
def decode(cfg: ModelConfig, params, token_1, cache: KVCache, index, steps: int):
  """`steps` greedy steps: feed token_1 at position `index`, emit the argmax, repeat.
  Returns (new tokens int32 [1, steps], cache)."""
  model = Llama(cfg)

  def step(carry, _):
    token, cache, i = carry
    logits, cache = model.apply({"params": params}, token[:, None], cache, i)
    nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return (nxt, cache, i + 1), nxt

  (_, cache, _), out_S1 = jax.lax.scan(step, (token_1, cache, index), None, length=steps)
  return out_S1.T, cache


@register_model("dtm")
class DtmLM(TemplateLM):
  """lm-eval model backed by dtm (see the module docstring for the scoring rules).

  model: any `dtm.loading.load_model` name ('smollm2-135m', .gguf, HF dir, dtm dir, hub
  id), or `loaded`, an already loaded `LoadedModel` (several compressions share one
  load); compression: a spec string ('' = the original model; calibrated methods need
  `params` made by `dtm.jobs.common.compress_model`); params: compressed params to use
  instead of compressing here; batch_size: requests per forward pass; max_length: the
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
    rows = []
    for _, ctx, cont in requests:
      if not ctx or not cont:
        raise DtmError("loglikelihood request with an empty context or continuation")
      if len(cont) > self.max_length:
        raise DtmError(f"continuation of {len(cont)} tokens exceeds max_length "
                       f"{self.max_length}")
      rows.append((ctx + cont)[-(self.max_length + 1):])
    # HFLM's order: longest first (then by tokens), so a batch holds similar lengths.
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), tuple(rows[i])))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    # One continuation width for the whole call (a power of two): shapes vary only in T.
    width = bucket_pow2(max((len(r[2]) for r in requests), default=1), self.max_length)
    bar = tqdm(total=len(rows), desc="dtm loglikelihood", unit="req", disable=disable_tqdm)
    pending = None
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      batch = self._score_arrays([rows[i] for i in idx], [len(requests[i][2]) for i in idx],
                                 width)
      if pending is not None:  # read back one batch late: the device never waits for us
        self._collect(pending, requests, out, bar)
      pending = (idx, batch)
    if pending is not None:
      self._collect(pending, requests, out, bar)
    bar.close()
    self.seconds["loglikelihood"] += time.perf_counter() - t0
    return out

  def _score_arrays(self, seqs: list[list[int]], cont_lens: list[int], width: int):
    """Dispatch `score_batch` on one batch of full sequences (context ⊕ continuation,
    already left-truncated to max_length + 1), continuation slots min(width, T); returns
    the device results."""
    b = self.batch_size
    t = bucket(max(len(s) - 1 for s in seqs), self.max_length)
    c = min(width, t)
    tokens = np.zeros((b, t), np.int32)
    targets = np.zeros((b, c), np.int32)
    first = np.zeros((b,), np.int32)
    for r in range(b):
      s, k = (seqs[r], cont_lens[r]) if r < len(seqs) else (seqs[-1], cont_lens[-1])
      n = len(s) - 1
      tokens[r, :n] = s[:-1]
      first[r] = n - k
      targets[r, :k] = s[-k:]
    return score_batch(self.cfg, self.params, jnp.asarray(tokens), jnp.asarray(first),
                       jnp.asarray(targets))

  def _collect(self, pending, requests, out, bar) -> None:
    idx, (logp, greedy) = pending
    logp, greedy = np.asarray(logp), np.asarray(greedy)
    for r, i in enumerate(idx):
      key, _, cont = requests[i]
      k = len(cont)
      answer = (float(np.sum(logp[r, :k], dtype=np.float64)), bool(np.all(greedy[r, :k])))
      out[i] = answer
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
    bar.update(len(idx))

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
    """Greedy continuation of each context, cut at its first stop sequence (EOS is one)."""
    t0 = time.perf_counter()
    out = []
    eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    for req in tqdm(requests, desc="dtm generate_until", unit="req", disable=disable_tqdm):
      context, gen_kwargs = req.args
      until, max_new = _greedy_kwargs(gen_kwargs, self.max_gen_toks, eos_text)
      ctx = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
      text = self._greedy(ctx, max_new, until)
      out.append(text)
      self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
    self.seconds["generate"] += time.perf_counter() - t0
    return out

  def _greedy(self, ctx: list[int], max_new: int, until: list[str]) -> str:
    if not ctx:
      ctx = [self.prefix_token_id]
    n = len(ctx)
    p = bucket(n)
    steps = -(-max(max_new - 1, 0) // GEN_CHUNK) * GEN_CHUNK
    tokens = np.zeros((1, p), np.int32)
    tokens[0, :n] = ctx
    token, cache = prefill(self.cfg, self.params, jnp.asarray(tokens), jnp.int32(n),
                           cache_len=p + steps + 1)
    new = [int(token[0])]
    while len(new) < max_new and not self._stopped(new, until):
      chunk, cache = decode(self.cfg, self.params, token, cache, jnp.int32(n + len(new) - 1),
                            GEN_CHUNK)
      token = chunk[:, -1]
      new += [int(x) for x in np.asarray(chunk[0])]
    new = new[:max_new]
    if self.eot_token_id in new:
      new = new[:new.index(self.eot_token_id)]
    text = self.tok_decode(new)
    for stop in until:
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
