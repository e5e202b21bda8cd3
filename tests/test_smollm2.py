"""The real embedded model (SmolLM2-135M-Instruct, GGUF Q4_1, float32) against HF transformers
loading the same GGUF file (the oracle), plus HF export and orbax round trips."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_or_skip
from dtm import checkpoint, convert, data, evaluation
from dtm.generate import greedy_generate
from dtm.loading import load_model
from dtm.model import Llama

LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def hf_gguf(smollm2_gguf):
  """transformers' LlamaForCausalLM built from the same GGUF file, float32, once per module.

  torch runs single-threaded here: on a small, shared CPU box its 2-thread OpenMP
  barriers made `generate` ~10x slower than one thread.
  """
  torch = torch_or_skip()
  from transformers import LlamaForCausalLM
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  model = LlamaForCausalLM.from_pretrained(
      os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf),
      torch_dtype=torch.float32)
  yield model.eval()
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wikitext_tokens(smollm2, wikitext_path) -> np.ndarray:
  """WikiText-2 raw test split as one SmolLM2 token stream: int32 [N]."""
  texts = data.load_texts("text", data_files=wikitext_path)
  return data.tokenize_corpus(smollm2.tokenizer, texts, add_bos=False)


def flax_logits(m, tokens_BT: np.ndarray) -> np.ndarray:
  """float32 logits [B, T, V] of the Flax model."""
  return np.asarray(Llama(m.cfg).apply({"params": m.params}, jnp.asarray(tokens_BT)))


def torch_logits(hf, tokens_BT: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return hf(torch.as_tensor(tokens_BT, dtype=torch.long)).logits.float().numpy()


def assert_same_params(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # exact


def test_logits_match_hf_gguf(smollm2, hf_gguf, wikitext_tokens):
  prompts = data.prompt_windows(wikitext_tokens, num=4, length=64, seed=0, bos_id=None)
  ours = flax_logits(smollm2, prompts)
  ref = torch_logits(hf_gguf, prompts)
  assert ours.shape == ref.shape == (4, 64, smollm2.cfg.vocab_size)
  diff = np.abs(ours - ref).max()
  assert diff < LOGIT_ATOL, diff


def test_greedy_continuations_match_hf_generate(smollm2, hf_gguf, wikitext_tokens):
  import torch
  from transformers import GenerationConfig
  prompts = data.prompt_windows(wikitext_tokens, num=8, length=32, seed=1, bos_id=None)
  ours = np.asarray(greedy_generate(smollm2.cfg, smollm2.params, jnp.asarray(prompts), 32))
  # eos_token_id=None: no stopping and no EOS suppression, like greedy_generate.
  gen = GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=2)
  input_ids = torch.as_tensor(prompts, dtype=torch.long)
  with torch.no_grad():
    out = hf_gguf.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                           generation_config=gen)
  ref = out[:, prompts.shape[1]:].numpy()
  assert ref.shape == ours.shape == (8, 32)
  np.testing.assert_array_equal(ours, ref)


def test_mixed_length_references_equal_one_at_a_time(smollm2, wikitext_tokens):
  """Prompts of mixed lengths in one batch (right-padded, a cache index per row) give,
  token for token, what each prompt gives alone through the equal-length path."""
  windows = data.prompt_windows(wikitext_tokens, num=4, length=40, seed=3, bos_id=None)
  prompts = [w[:n] for w, n in zip(windows, (40, 7, 23, 1))]
  got = evaluation.generate_references(smollm2.cfg, smollm2.params, prompts, 16, batch_size=4)
  assert got.shape == (4, 16)
  for p, row in zip(prompts, got):
    alone = greedy_generate(smollm2.cfg, smollm2.params, jnp.asarray(p[None]), 16)
    np.testing.assert_array_equal(row, np.asarray(alone)[0])


def test_export_hf_loads_in_transformers_and_round_trips(smollm2, wikitext_tokens, tmp_path):
  torch = torch_or_skip()
  from transformers import AutoTokenizer, LlamaForCausalLM
  out = str(tmp_path / "smollm2-hf")
  convert.export_hf(smollm2.params, smollm2.cfg, out, tokenizer=smollm2.tokenizer)
  hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
  assert hf.config.tie_word_embeddings == smollm2.cfg.tie_word_embeddings
  prompts = data.prompt_windows(wikitext_tokens, num=2, length=64, seed=2, bos_id=None)
  diff = np.abs(torch_logits(hf, prompts) - flax_logits(smollm2, prompts)).max()
  assert diff < LOGIT_ATOL, diff
  del hf
  text = "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building."
  assert AutoTokenizer.from_pretrained(out).encode(text) == smollm2.tokenizer.encode(text)
  back = load_model(out)
  assert back.cfg == smollm2.cfg
  assert_same_params(smollm2.params, back.params)


def test_orbax_save_and_load_round_trip(smollm2, tmp_path):
  out = str(tmp_path / "smollm2-orbax")
  checkpoint.save_model(out, smollm2.cfg, smollm2.params, tokenizer=smollm2.tokenizer,
                        source=smollm2.source)
  back = load_model(out)
  assert back.source == out and back.cfg == smollm2.cfg
  assert_same_params(smollm2.params, back.params)
  text = "Robert Boulter is an English film, television and theatre actor.\n\n = Career ="
  assert back.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
