"""Text corpora, token streams and the token windows that dtm evaluates and trains on.

Pipeline: `load_texts` (documents, through `datasets` or the shipped default
prompts; `dtm.corpus`, re-exported here) -> `tokenize_corpus` (one int32 token stream) -> windows:

  * `prompt_windows`            [num, c]       prompts for the divergent token metrics
  * `prompt_windows_from_texts` [num, c]       one prompt per document (default prompt set)
  * `ppl_windows`               PplWindows     perplexity windows, disjoint or sliding
  * `train_batch`/TrainBatches  [B, L + 1]     shuffled training batches, resumable

Every window function is a pure function of its arguments (and a seed): the same
inputs give the same windows on every host and after every restart. Data that is
empty or too short raises `DtmError` stating how many tokens there are and how
many are needed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dtm.corpus import (  # noqa: F401  (the corpus half of the pipeline, re-exported)
  COMPRESSION_SUFFIXES, DOCUMENT_SOURCES, HUB_ALIASES, LOCAL_BUILDERS, STREAMED_HUB_PATHS,
  SUFFIX_BUILDERS, infer_builder, load_texts, parse_hub_source, python_stdlib_files)
from dtm.errors import DtmError

# tokenize_corpus stops looking for exact cuts after this many failures in a row.
MAX_FAILED_CUTS = 64


# --------------------------------------------------------------------------- tokens


def tokenize_corpus(tokenizer, texts: Sequence[str], *, add_bos: bool, joiner: str = '\n\n',
                    chunk_chars: int | None = 1 << 20) -> np.ndarray:
  """Tokens of `joiner.join(texts)`, optionally after one BOS: int32 [N].

  This is the standard causal-LM perplexity corpus (HF perplexity guide:
  `tokenizer("\\n\\n".join(wikitext["text"]))`): documents joined by `joiner`, BOS
  only at the very start (if add_bos), no EOS, `add_special_tokens=False`.

  For speed the string is tokenized in pieces of about `chunk_chars` characters
  (one batched call, parallel in Rust), cut only right after a joiner. A cut is
  used only where tokenizing across it gives the same tokens as tokenizing the two
  sides separately, checked on the neighbouring documents; with byte-level BPE
  (GPT-2, Llama 3) that holds before any document that starts with a non-blank
  character or one space. Tokenizers that prepend something per call (SentencePiece
  Llama 2's '▁') fail the check everywhere and end up in one piece (after
  MAX_FAILED_CUTS checks). chunk_chars=None always tokenizes in one piece.
  """
  text_pieces = _chunk_texts(tokenizer, list(texts), joiner, chunk_chars)
  ids = tokenizer(text_pieces, add_special_tokens=False)['input_ids'] if text_pieces else []
  prefix = [_bos_id(tokenizer)] if add_bos else []
  return np.fromiter(itertools.chain(prefix, *ids), dtype=np.int32)


def _bos_id(tokenizer) -> int:
  if tokenizer.bos_token_id is None:
    raise DtmError('data.add_bos is set but the tokenizer has no BOS token; set add_bos=False.')
  return int(tokenizer.bos_token_id)


def _ids(tokenizer, text: str) -> list[int]:
  return tokenizer(text, add_special_tokens=False)['input_ids']


def _cut_is_exact(tokenizer, texts: list[str], i: int, joiner: str) -> bool:
  """True if tokens(before + after) == tokens(before) + tokens(after) at a cut
  placed right before document i (two documents of context on each side)."""
  before = joiner.join(texts[max(0, i - 2):i]) + joiner
  after = joiner.join(texts[i:i + 2])
  return _ids(tokenizer, before + after) == _ids(tokenizer, before) + _ids(tokenizer, after)


def _chunk_texts(tokenizer, texts: list[str], joiner: str,
                 chunk_chars: int | None) -> list[str]:
  """Pieces whose concatenation is joiner.join(texts), cut after joiners.

  After MAX_FAILED_CUTS failed checks in a row (a tokenizer that is never exact
  across cuts), the rest of the corpus stays one piece.
  """
  if not texts:
    return []
  starts = [0]
  size = failed = 0
  for i, text in enumerate(texts):
    if chunk_chars is not None and size >= chunk_chars and failed < MAX_FAILED_CUTS:
      if _cut_is_exact(tokenizer, texts, i, joiner):
        starts.append(i)
        size = failed = 0
      else:
        failed += 1
    size += len(text) + len(joiner)
  ends = starts[1:] + [len(texts)]
  return [joiner.join(texts[a:b]) + (joiner if b < len(texts) else '')
          for a, b in zip(starts, ends)]


# --------------------------------------------------------------------------- windows


def _too_short(what: str, have: int, need: int, hint: str) -> DtmError:
  return DtmError(f'not enough data for {what}: the corpus has {have} tokens, '
                  f'{need} are needed; {hint}')


def _with_bos(body_NC: np.ndarray, bos_id: int | None) -> np.ndarray:
  if bos_id is None:
    return body_NC.astype(np.int32)
  bos = np.full((body_NC.shape[0], 1), bos_id, np.int32)
  return np.concatenate([bos, body_NC.astype(np.int32)], axis=1)


def prompt_windows(tokens: np.ndarray, *, num: int, length: int, seed: int,
                   bos_id: int | None) -> np.ndarray:
  """`num` prompts of `length` tokens from one token stream: int32 [num, length].

  Prompts (the paper's prompt prefixes of c tokens) are `length - 1` stream tokens
  after `bos_id` if given, else `length` stream tokens. Start offsets are drawn
  uniformly among all placements of `num` non-overlapping windows (stars and bars:
  sorted distinct draws from [0, slack + num)), so prompts are distinct stream
  spans. Rows are in corpus order; the result depends only on the arguments.
  """
  tokens = np.asarray(tokens, np.int32)
  body = length - (bos_id is not None)
  if num < 1 or body < 1:
    raise DtmError(f'prompt windows need num >= 1 and length > {int(bos_id is not None)}, '
                   f'got num={num}, length={length}.')
  slack = tokens.size - num * body
  if slack < 0:
    raise _too_short(f'{num} prompts of {body} tokens', tokens.size, num * body,
                     'use more documents (data.max_docs) or fewer/shorter prompts.')
  rng = np.random.default_rng(seed)
  draws = np.sort(rng.choice(slack + num, size=num, replace=False))
  starts = draws + np.arange(num) * (body - 1)
  return _with_bos(tokens[starts[:, None] + np.arange(body)], bos_id)


def prompt_windows_from_texts(tokenizer, texts: Sequence[str], *, num: int, length: int,
                              seed: int, bos_id: int | None) -> np.ndarray:
  """One prompt per document: int32 [num, length].

  Each document is tokenized on its own (no special tokens) and truncated to
  `length - 1` tokens after `bos_id` (or `length` tokens without BOS). Documents
  shorter than that are skipped. If more than `num` remain, `num` of them are
  chosen with `seed` (without replacement); rows keep document order.
  """
  body = length - (bos_id is not None)
  if num < 1 or body < 1:
    raise DtmError(f'prompt windows need num >= 1 and length > {int(bos_id is not None)}, '
                   f'got num={num}, length={length}.')
  ids = tokenizer(list(texts), add_special_tokens=False)['input_ids'] if texts else []
  eligible = [row[:body] for row in ids if len(row) >= body]
  if len(eligible) < num:
    longest = max((len(row) for row in ids), default=0)
    raise DtmError(
      f'not enough data for {num} prompts of {body} tokens: {len(eligible)} of '
      f'{len(ids)} documents have >= {body} tokens (longest has {longest}); use '
      'more documents or shorter/fewer prompts.')
  rng = np.random.default_rng(seed)
  keep = np.sort(rng.choice(len(eligible), size=num, replace=False))
  return _with_bos(np.asarray([eligible[k] for k in keep], np.int32), bos_id)


@dataclasses.dataclass(frozen=True)
class PplWindows:
  """Perplexity windows over one token stream.

  tokens:  int32 [n, T] stream windows (no BOS added per window).
  ctx_len: int32 [n]    leading positions of each window that are context only:
           positions ctx_len[i] .. T-1 are the scored targets (each predicted
           from all earlier positions of its window). Always >= 1, since
           position 0 has no prediction. Every stream token from 1 to the end
           of the last window is scored exactly once over all windows.
  """
  tokens: np.ndarray
  ctx_len: np.ndarray

  def target_mask(self) -> np.ndarray:
    """bool [n, T-1]: which next-token predictions (targets tokens[:, 1:]) count."""
    positions = np.arange(1, self.tokens.shape[1])
    return positions[None, :] >= self.ctx_len[:, None]


def ppl_windows(tokens: np.ndarray, *, length: int, stride: int | None = None,
                max_windows: int | None = None) -> PplWindows:
  """Windows of `length` tokens for perplexity, as in the HF perplexity guide.

  stride None or == length: disjoint windows [k*T, (k+1)*T), all T-1 predictions
  scored (ctx_len = 1). stride s < T: windows start at k*s; the first scores all
  its predictions, each later one only its last s tokens (ctx_len = T - s), the
  rest being context. The incomplete tail is dropped (fixed shapes for jit);
  max_windows keeps the first windows (deterministic, no sampling).
  """
  tokens = np.asarray(tokens, np.int32)
  stride = length if stride is None else stride
  if length < 2 or not 1 <= stride <= length:
    raise DtmError(f'ppl windows need length >= 2 and 1 <= stride <= length, '
                   f'got length={length}, stride={stride}.')
  if tokens.size < length:
    raise _too_short(f'one perplexity window of {length} tokens', tokens.size, length,
                     'use more documents (data.max_docs) or a shorter window.')
  n = 1 + (tokens.size - length) // stride
  if max_windows is not None:
    n = min(n, max_windows)
  starts = np.arange(n) * stride
  ctx_len = np.full(n, length - stride if stride < length else 1, np.int32)
  ctx_len[0] = 1
  return PplWindows(tokens[starts[:, None] + np.arange(length)], ctx_len)


def train_windows(num_tokens: int, seq_len: int) -> int:
  """Number of training windows: starts k*seq_len, each seq_len + 1 tokens long
  (neighbours share one token, so every token but the first is a target once)."""
  return max(0, (num_tokens - 1) // seq_len)


def train_batch(tokens: np.ndarray, *, batch: int, seq_len: int, seed: int,
                step: int) -> np.ndarray:
  """Training batch number `step`: int32 [batch, seq_len + 1] (inputs [:, :-1], targets [:, 1:]).

  A pure function: epoch = step // batches_per_epoch; the windows of that epoch
  are `np.random.default_rng((seed, epoch)).permutation(num_windows)`, consumed
  `batch` at a time; the remainder of an epoch that fills no batch is skipped.
  So every window appears at most once per epoch, and a run resumed at `step`
  sees exactly the batches it would have seen.
  """
  tokens = np.asarray(tokens, np.int32)
  num_windows = train_windows(tokens.size, seq_len)
  if batch < 1 or seq_len < 1 or step < 0:
    raise DtmError(f'train batches need batch >= 1, seq_len >= 1, step >= 0; '
                   f'got batch={batch}, seq_len={seq_len}, step={step}.')
  if num_windows < batch:
    raise _too_short(f'one batch of {batch} x {seq_len + 1} tokens', tokens.size,
                     batch * seq_len + 1, 'use more data or a smaller batch/seq_len.')
  per_epoch = num_windows // batch
  epoch, index = divmod(step, per_epoch)
  order = np.random.default_rng((seed, epoch)).permutation(num_windows)
  starts = order[index * batch:(index + 1) * batch] * seq_len
  return tokens[starts[:, None] + np.arange(seq_len + 1)]


@dataclasses.dataclass
class TrainBatches:
  """Iterator over `train_batch(tokens, ..., step=step)` for step = step, step+1, ...

  The whole iterator state is `step` (epoch = step // batches_per_epoch);
  `state_dict()` goes into the checkpoint, `from_state` resumes exactly.
  """
  tokens: np.ndarray
  batch: int
  seq_len: int
  seed: int
  step: int = 0

  def __post_init__(self):
    self.tokens = np.asarray(self.tokens, np.int32)
    train_batch(self.tokens, batch=self.batch, seq_len=self.seq_len, seed=self.seed,
                step=0)  # Validates: raises DtmError on too little data.

  @property
  def batches_per_epoch(self) -> int:
    return train_windows(self.tokens.size, self.seq_len) // self.batch

  @property
  def epoch(self) -> int:
    return self.step // self.batches_per_epoch

  def __iter__(self) -> TrainBatches:
    return self

  def __next__(self) -> np.ndarray:
    out = train_batch(self.tokens, batch=self.batch, seq_len=self.seq_len,
                      seed=self.seed, step=self.step)
    self.step += 1
    return out

  def state_dict(self) -> dict[str, int]:
    """Plain ints, JSON-serialisable; `step` is the next batch to produce."""
    return {'step': self.step, 'epoch': self.epoch, 'seed': self.seed,
            'batch': self.batch, 'seq_len': self.seq_len,
            'num_tokens': int(self.tokens.size)}

  @classmethod
  def from_state(cls, tokens: np.ndarray, state: dict[str, int]) -> TrainBatches:
    """Resumes at state['step']; the token stream must be the one saved with it."""
    tokens = np.asarray(tokens, np.int32)
    if int(state['num_tokens']) != tokens.size:
      raise DtmError(f"the training data changed since the checkpoint: it had "
                     f"{state['num_tokens']} tokens, now {tokens.size}; use the same "
                     'data config or start a new workdir.')
    return cls(tokens, batch=int(state['batch']), seq_len=int(state['seq_len']),
               seed=int(state['seed']), step=int(state['step']))


# --------------------------------------------------------------------------- jsonl


def read_prompt_jsonl(path: str | os.PathLike, length: int | None = None, *,
                      field: str = 'prompts') -> np.ndarray:
  """Token-id windows from a file of lines `{"ids": [int, ...]}`: int32 [n, c].

  length None: all rows must have the same length c (the first row's). Otherwise
  every row must have exactly `length` ids (c = length): a row of any other length
  is a DtmError naming the file:line and both lengths (rows are never truncated).
  Blank lines are skipped. `field` is the config block whose `jsonl` / `length`
  fields the messages name ('prompts' for prompts, 'calibration' for calibration).
  """
  path = Path(path).expanduser()
  if not path.is_file():
    raise DtmError(f'{field} file not found: {path}; check {field}.jsonl.')
  rows = []
  with path.open(encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        rows.append(_parse_prompt_line(path, lineno, line, length, rows, field))
  if not rows:
    raise DtmError(f'token-id file {path} holds no rows; expected lines {{"ids": [...]}}.')
  return np.asarray(rows, np.int32)


def _parse_prompt_line(path: Path, lineno: int, line: str, length: int | None,
                       previous: list[list[int]], field: str) -> list[int]:
  where = f'{path}:{lineno}'
  try:
    ids = json.loads(line)['ids']
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise DtmError(f'{where}: expected {{"ids": [int, ...]}} ({type(e).__name__}: {e}).') from e
  if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                          for t in ids):
    raise DtmError(f'{where}: "ids" must be a list of ints.')
  if length is not None and len(ids) != length:
    raise DtmError(f'{where}: row has {len(ids)} ids but {field}.length is {length}; every row '
                   f'must have exactly {length} ids (or set {field}.length to match the file).')
  if previous and len(ids) != len(previous[0]):
    raise DtmError(f'{where}: row has {len(ids)} ids but earlier lines have '
                   f'{len(previous[0])}; all rows must have the same length.')
  return ids


def write_prompt_jsonl(path: str | os.PathLike, ids: np.ndarray) -> None:
  """Writes int [n, c] prompts as `{"ids": [...]}` lines, atomically (tmp + os.replace)."""
  ids = np.asarray(ids)
  if ids.ndim != 2:
    raise ValueError(f'ids must be [n, c], got shape {ids.shape}')
  path = Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
  with tmp.open('w', encoding='utf-8') as f:
    for row in ids.tolist():
      f.write(json.dumps({'ids': row}) + '\n')
  os.replace(tmp, path)
