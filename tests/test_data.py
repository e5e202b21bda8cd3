"""Tests for dtm.data: loading, tokenization, windows, resumable batches, jsonl IO."""

from __future__ import annotations

import os

os.environ['HF_HUB_OFFLINE'] = '1'  # Before datasets/huggingface_hub are imported.
os.environ['HF_DATASETS_OFFLINE'] = '1'

import json
import time
from pathlib import Path

import numpy as np
import pytest

from dtm import data
from dtm.errors import DtmError

WIKI_RAW = (Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
            / 'wikitext-2-raw' / 'wiki.test.raw')
needs_wiki = pytest.mark.skipif(not WIKI_RAW.is_file(), reason=f'{WIKI_RAW} missing')


@pytest.fixture(scope='module')
def wiki_lines() -> list[str]:
  if not WIKI_RAW.is_file():
    pytest.fail(f'{WIKI_RAW} missing (shared/ beside the repo)')
  return data.load_texts('text', data_files=str(WIKI_RAW))


@pytest.fixture(scope='module')
def tokenizer(wiki_lines):
  """A small byte-level BPE (vocab 1000) trained on WikiText lines, as a HF fast tokenizer."""
  import tokenizers
  from transformers import PreTrainedTokenizerFast

  bpe = tokenizers.ByteLevelBPETokenizer()
  # Blocks joined by '\n\n' (with empty lines) so that newline runs get merges too.
  blocks = ['\n\n'.join(wiki_lines[i:i + 10] + ['', '']) for i in range(0, 3000, 10)]
  bpe.train_from_iterator(blocks, vocab_size=1000, min_frequency=2,
                          special_tokens=['<s>', '</s>'], show_progress=False)
  return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token='<s>',
                                 eos_token='</s>')


@pytest.fixture(scope='module')
def wiki_tokens(tokenizer, wiki_lines) -> np.ndarray:
  return data.tokenize_corpus(tokenizer, wiki_lines, add_bos=True)


# ----------------------------------------------------------------------- loading


@needs_wiki
def test_wikitext_raw_loads_without_cr(wiki_lines):
  raw = WIKI_RAW.read_bytes()
  assert b'\r\n' in raw  # The file really is CRLF.
  assert len(wiki_lines) == raw.count(b'\n')
  assert not any('\r' in line for line in wiki_lines)
  assert wiki_lines[0] == ' = Robert Boulter = '


@needs_wiki
def test_auto_source_and_max_docs(wiki_lines):
  texts = data.load_texts('auto', data_files=[str(WIKI_RAW)], max_docs=5)
  assert texts == wiki_lines[:5]


def test_text_builder_keeps_empty_lines_and_strips_cr(tmp_path):
  path = tmp_path / 'crlf.txt'
  path.write_bytes(b'first line \r\n\r\nthird\r\n')
  assert data.load_texts('text', data_files=str(path)) == ['first line ', '', 'third']


def test_local_json_with_text_field(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text('{"body": "a b"}\n{"body": "c"}\n')
  assert data.load_texts('auto', data_files=str(path), text_field='body') == ['a b', 'c']
  with pytest.raises(DtmError, match="no column 'text'"):
    data.load_texts('json', data_files=str(path))


def test_missing_local_file_names_path(tmp_path):
  missing = tmp_path / 'nope' / 'wiki.test.raw'
  with pytest.raises(DtmError, match='not found: .*nope/wiki.test.raw'):
    data.load_texts('text', data_files=str(missing))
  with pytest.raises(DtmError, match='cannot infer'):
    data.infer_builder('corpus.xyz')
  assert data.infer_builder('a/b.jsonl.gz') == 'json'


@pytest.mark.parametrize('source', ['wikitext-2-raw-v1', 'someone/corpus:cfg'])
def test_hub_offline_fails_fast_with_local_hint(source):
  start = time.perf_counter()
  with pytest.raises(DtmError) as info:
    data.load_texts(source, split='test')
  assert time.perf_counter() - start < 10
  message = str(info.value)
  assert 'hub' in message and 'local files' in message
  assert '--config.data.source=text --config.data.data_files=' in message


def test_c4_needs_max_docs_and_valid_split():
  with pytest.raises(DtmError, match='max_docs'):
    data.load_texts('c4', split='validation')
  with pytest.raises(DtmError, match='validation'):
    data.load_texts('c4', split='test', max_docs=8)


def test_parse_hub_source():
  assert data.parse_hub_source('c4') == ('allenai/c4', 'en')
  assert data.parse_hub_source('owner/name:cfg') == ('owner/name', 'cfg')
  assert data.parse_hub_source('owner/name') == ('owner/name', None)


def test_default_prompts():
  texts = data.load_texts('default')
  assert len(texts) >= 60
  assert all(40 <= len(t.split()) <= 120 for t in texts)
  assert len(set(texts)) == len(texts)
  assert data.load_texts('default', max_docs=3) == texts[:3]


# ----------------------------------------------------------------------- tokens


@needs_wiki
def test_tokenize_corpus_matches_one_shot(tokenizer, wiki_lines, wiki_tokens):
  one_shot = tokenizer('\n\n'.join(wiki_lines), add_special_tokens=False)['input_ids']
  assert wiki_tokens.dtype == np.int32 and wiki_tokens.ndim == 1
  assert wiki_tokens[0] == tokenizer.bos_token_id
  np.testing.assert_array_equal(wiki_tokens[1:], one_shot)
  lines = wiki_lines[:600]
  chunked = data.tokenize_corpus(tokenizer, lines, add_bos=False, chunk_chars=20_000)
  assert len(data._chunk_texts(tokenizer, lines, '\n\n', 20_000)) > 5
  np.testing.assert_array_equal(
    chunked, tokenizer('\n\n'.join(lines), add_special_tokens=False)['input_ids'])


def test_tokenize_corpus_chunks_with_empty_docs(tokenizer):
  """HF's wikitext has empty lines ('\\n\\n\\n\\n' runs); unsafe cuts must be skipped."""
  texts = ['', ' = Title = ', '', ' Body text here . ', '', '', 'Next doc', '  two spaces',
           '\tTab', 'x'] * 20
  one_shot = tokenizer('\n\n'.join(texts), add_special_tokens=False)['input_ids']
  for chunk_chars in (1, 50, None):
    got = data.tokenize_corpus(tokenizer, texts, add_bos=False, chunk_chars=chunk_chars)
    np.testing.assert_array_equal(got, one_shot)
  pieces = data._chunk_texts(tokenizer, texts, '\n\n', 1)
  assert 1 < len(pieces) < len(texts)  # Some cuts used, the unsafe ones skipped.
  assert data.tokenize_corpus(tokenizer, [], add_bos=False).shape == (0,)


def test_tokenize_corpus_prefix_space_tokenizer_is_one_piece():
  """A SentencePiece-style tokenizer prepends '▁' per call: no cut is exact."""
  import tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {'<s>': 0, '▁': 1, 'a': 2, 'b': 3, '\n': 4}
  spm = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  spm.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme='first')
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token='<s>')
  docs = ['a b', 'b a'] * 10
  assert len(data._chunk_texts(tokenizer, docs, '\n\n', 1)) == 1
  got = data.tokenize_corpus(tokenizer, docs, add_bos=True, chunk_chars=1)
  np.testing.assert_array_equal(
    got, [0] + tokenizer('\n\n'.join(docs), add_special_tokens=False)['input_ids'])


# ----------------------------------------------------------------------- windows


def test_prompt_windows(wiki_tokens):
  prompts = data.prompt_windows(wiki_tokens, num=64, length=16, seed=0, bos_id=7)
  assert prompts.shape == (64, 16) and prompts.dtype == np.int32
  assert (prompts[:, 0] == 7).all()
  np.testing.assert_array_equal(
    prompts, data.prompt_windows(wiki_tokens, num=64, length=16, seed=0, bos_id=7))
  other = data.prompt_windows(wiki_tokens, num=64, length=16, seed=1, bos_id=7)
  assert not np.array_equal(prompts, other)


def test_prompt_windows_non_overlapping():
  tokens = np.arange(1000, dtype=np.int32)  # Token value == stream position.
  for seed in range(20):
    prompts = data.prompt_windows(tokens, num=30, length=33, seed=seed, bos_id=None)
    np.testing.assert_array_equal(np.diff(prompts, axis=1), 1)  # Contiguous spans.
    assert len(np.unique(prompts)) == prompts.size  # Disjoint.
    assert (np.diff(prompts[:, 0]) > 0).all()  # Corpus order.
  full = data.prompt_windows(tokens, num=10, length=100, seed=3, bos_id=None)
  np.testing.assert_array_equal(full.ravel(), tokens)  # Zero slack: tiling.


def test_prompt_windows_too_short():
  with pytest.raises(DtmError, match='has 100 tokens, 160 are needed'):
    data.prompt_windows(np.arange(100), num=10, length=17, seed=0, bos_id=1)
  with pytest.raises(DtmError, match='has 0 tokens'):
    data.prompt_windows(np.zeros(0, np.int32), num=1, length=4, seed=0, bos_id=None)


def test_prompt_windows_from_texts(tokenizer):
  texts = data.load_texts('default')
  prompts = data.prompt_windows_from_texts(tokenizer, texts, num=len(texts), length=24,
                                           seed=0, bos_id=tokenizer.bos_token_id)
  assert prompts.shape == (len(texts), 24)
  first = tokenizer(texts[0], add_special_tokens=False)['input_ids'][:23]
  np.testing.assert_array_equal(prompts[0], [tokenizer.bos_token_id] + first)
  some = data.prompt_windows_from_texts(tokenizer, texts, num=8, length=24, seed=5,
                                        bos_id=None)
  again = data.prompt_windows_from_texts(tokenizer, texts, num=8, length=24, seed=5,
                                         bos_id=None)
  np.testing.assert_array_equal(some, again)
  with pytest.raises(DtmError, match='0 of 2 documents have >= 50 tokens'):
    data.prompt_windows_from_texts(tokenizer, ['short', 'text'], num=1, length=50, seed=0,
                                   bos_id=None)


def test_ppl_windows_disjoint():
  tokens = np.arange(103, dtype=np.int32)
  windows = data.ppl_windows(tokens, length=10)
  assert windows.tokens.shape == (10, 10)
  np.testing.assert_array_equal(windows.tokens.ravel(), tokens[:100])
  np.testing.assert_array_equal(windows.ctx_len, 1)
  assert windows.target_mask().all()
  assert data.ppl_windows(tokens, length=10, stride=10, max_windows=3).tokens.shape == (3, 10)


def test_ppl_windows_sliding_scores_each_token_once():
  tokens = np.arange(100, dtype=np.int32)
  windows = data.ppl_windows(tokens, length=32, stride=8)
  assert windows.tokens.shape == (1 + (100 - 32) // 8, 32)
  np.testing.assert_array_equal(windows.tokens[:, 0], np.arange(windows.tokens.shape[0]) * 8)
  assert windows.ctx_len[0] == 1 and (windows.ctx_len[1:] == 32 - 8).all()
  scored = windows.tokens[:, 1:][windows.target_mask()]
  last = windows.tokens[-1, -1]
  np.testing.assert_array_equal(np.sort(scored), np.arange(1, last + 1))


def test_ppl_windows_errors():
  with pytest.raises(DtmError, match='has 5 tokens, 8 are needed'):
    data.ppl_windows(np.arange(5), length=8)
  with pytest.raises(DtmError, match='stride'):
    data.ppl_windows(np.arange(50), length=8, stride=9)


def test_train_batch_epochs_and_resume():
  tokens = np.arange(1 + 8 * 40, dtype=np.int32)  # 40 windows of 9 tokens.
  batch, seq_len = 4, 8
  per_epoch = 10
  run_a = [data.train_batch(tokens, batch=batch, seq_len=seq_len, seed=3, step=s)
           for s in range(2 * per_epoch)]
  for b in run_a:
    assert b.shape == (batch, seq_len + 1) and b.dtype == np.int32
    np.testing.assert_array_equal(np.diff(b, axis=1), 1)
  for epoch in range(2):
    starts = np.concatenate([b[:, 0] for b in run_a[epoch * per_epoch:(epoch + 1) * per_epoch]])
    np.testing.assert_array_equal(np.sort(starts), np.arange(40) * seq_len)  # Each once.
  assert not np.array_equal(run_a[0], run_a[per_epoch])  # Reshuffled per epoch.
  other_seed = data.train_batch(tokens, batch=batch, seq_len=seq_len, seed=4, step=0)
  assert not np.array_equal(run_a[0], other_seed)

  # A run interrupted after 7 steps and resumed from its state sees the same batches.
  it = data.TrainBatches(tokens, batch=batch, seq_len=seq_len, seed=3)
  first = [next(it) for _ in range(7)]
  state = json.loads(json.dumps(it.state_dict()))
  assert state['step'] == 7 and state['epoch'] == 0
  resumed = data.TrainBatches.from_state(tokens, state)
  rest = [next(resumed) for _ in range(2 * per_epoch - 7)]
  for got, want in zip(first + rest, run_a):
    np.testing.assert_array_equal(got, want)
  assert resumed.epoch == 2
  with pytest.raises(DtmError, match='changed since the checkpoint'):
    data.TrainBatches.from_state(tokens[:-8], state)


def test_train_batch_too_short():
  with pytest.raises(DtmError, match='has 20 tokens, 33 are needed'):
    data.TrainBatches(np.arange(20), batch=4, seq_len=8, seed=0)
  with pytest.raises(DtmError, match='has 0 tokens'):
    data.train_batch(np.zeros(0, np.int32), batch=1, seq_len=8, seed=0, step=0)


# ----------------------------------------------------------------------- jsonl


def test_prompt_jsonl_round_trip(tmp_path):
  ids = np.arange(24, dtype=np.int32).reshape(4, 6)
  path = tmp_path / 'sub' / 'prompts.jsonl'
  data.write_prompt_jsonl(path, ids)
  assert sorted(p.name for p in path.parent.iterdir()) == ['prompts.jsonl']  # No tmp left.
  got = data.read_prompt_jsonl(path)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, ids)
  np.testing.assert_array_equal(data.read_prompt_jsonl(path, length=6), ids)
  for length in (3, 7):  # Rows of another length are an error, never truncated.
    with pytest.raises(DtmError, match=f'prompts.jsonl:1: row has 6 ids but prompts.length is '
                                       f'{length}; every row must have exactly {length} ids'):
      data.read_prompt_jsonl(path, length=length)
  with pytest.raises(DtmError, match='calibration.length is 3'):
    data.read_prompt_jsonl(path, length=3, field='calibration')


def test_prompt_jsonl_bad_lines(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"ids": [1, 2, 3]}\n{"ids": [4, 5]}\n')
  with pytest.raises(DtmError, match='bad.jsonl:2: row has 2 ids but earlier lines have 3'):
    data.read_prompt_jsonl(path)
  path.write_text('{"ids": [1, 2]}\n\n{"tokens": [1, 2]}\n')
  with pytest.raises(DtmError, match='bad.jsonl:3: expected'):
    data.read_prompt_jsonl(path)
  path.write_text('{"ids": [1, "x"]}\n')
  with pytest.raises(DtmError, match='bad.jsonl:1: "ids" must be a list of ints'):
    data.read_prompt_jsonl(path)
  with pytest.raises(DtmError, match='not found: .*missing.jsonl; check prompts.jsonl'):
    data.read_prompt_jsonl(tmp_path / 'missing.jsonl')
