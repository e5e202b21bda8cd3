"""The Flax Llama against HF transformers' PyTorch LlamaForCausalLM (the oracle)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_or_skip
from dtm import convert
from dtm.generate import greedy_generate
from dtm.loading import load_model
from dtm.model import KVCache, Llama, apply_layer, init_params
from dtm.model_config import ModelConfig
import hf_utils

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "mha_untied": dict(heads=4, kv_heads=4, tie=False),
    "gqa_tied": dict(heads=4, kv_heads=2, tie=True),
    "gqa_theta": dict(heads=8, kv_heads=2, tie=False, rope_theta=500000.0),
    "llama3_scaling": dict(heads=4, kv_heads=1, tie=False, rope_theta=500000.0,
                           rope_scaling=LLAMA3_SCALING),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf(name, tmp_path):
  torch_or_skip()
  hf = hf_utils.tiny_hf_model(**CASES[name])
  directory = hf_utils.save_tiny(hf, tmp_path / name)
  m = load_model(directory)
  tokens = np.random.default_rng(1).integers(0, 256, (2, 96))
  ours = np.asarray(Llama(m.cfg).apply({"params": m.params}, jnp.asarray(tokens)))
  ref = hf_utils.hf_logits(hf, tokens)
  assert np.abs(ours - ref).max() < 1e-4


def test_sharded_safetensors_with_index(tmp_path):
  torch_or_skip()
  hf = hf_utils.tiny_hf_model(heads=4, kv_heads=2)
  directory = hf_utils.save_tiny(hf, tmp_path / "sharded", shard_size="100KB")
  files = os.listdir(directory)
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 3
  m = load_model(directory)
  tokens = np.random.default_rng(2).integers(0, 256, (1, 64))
  ours = np.asarray(Llama(m.cfg).apply({"params": m.params}, jnp.asarray(tokens)))
  assert np.abs(ours - hf_utils.hf_logits(hf, tokens)).max() < 1e-4


def test_export_round_trip_and_transformers_loads_it(tmp_path):
  torch = torch_or_skip()
  from transformers import LlamaForCausalLM
  hf = hf_utils.tiny_hf_model(heads=4, kv_heads=2, tie=False)
  m = load_model(hf_utils.save_tiny(hf, tmp_path / "src"))
  out = tmp_path / "exported"
  convert.export_hf(m.params, m.cfg, str(out), max_shard_bytes=200_000)
  back = load_model(str(out))
  for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # exact
  reloaded = LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
  tokens = np.random.default_rng(3).integers(0, 256, (2, 40))
  ours = np.asarray(Llama(m.cfg).apply({"params": m.params}, jnp.asarray(tokens)))
  assert np.abs(hf_utils.hf_logits(reloaded, tokens) - ours).max() < 1e-4


def test_kv_cache_decoding_equals_full_forward():
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  params = init_params(cfg, seed=3)
  model = Llama(cfg)
  prompts = jax.random.randint(jax.random.PRNGKey(0), (3, 7), 0, cfg.vocab_size)
  n = 9
  y = greedy_generate(cfg, params, prompts, n)
  # brute force: recompute the full forward pass at every step
  seq = prompts
  for _ in range(n):
    logits = model.apply({"params": params}, seq)
    seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None].astype(seq.dtype)], 1)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(seq[:, 7:]))
  # and the cached logits themselves equal the uncached ones
  full = model.apply({"params": params}, seq)
  cache = KVCache.zeros(cfg, 3, seq.shape[1])
  first, cache = model.apply({"params": params}, seq[:, :7], cache, 0)
  steps = [first]
  for i in range(7, seq.shape[1]):
    lg, cache = model.apply({"params": params}, seq[:, i:i + 1], cache, i)
    steps.append(lg)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("query_start", [0, 1, 6, 10])
def test_layer_query_rows_equal_full_layer_rows(query_start):
  """apply_layer with query_start q (keys/values from all rows, queries from rows q..)
  equals rows q.. of the full layer (the probe's last layer uses it at the N rows)."""
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=8)
  params = init_params(cfg, seed=5)
  lp = jax.tree.map(lambda x: x[1], params["layers"])
  h = jax.random.normal(jax.random.PRNGKey(1), (3, 11, 32))
  positions = jnp.arange(11, dtype=jnp.int32)
  full = apply_layer(cfg, lp, h, positions)
  part = apply_layer(cfg, lp, h, positions, query_start)
  assert part.shape == (3, 11 - query_start, 32)
  np.testing.assert_allclose(part, full[:, query_start:], rtol=1e-6, atol=1e-6)


def test_attention_blocks_equal_whole_attention():
  """attention_chunk (query rows per block, the training memory bound) changes no logit
  and no gradient: each query row's arithmetic is the same."""
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=8)
  params = init_params(cfg, seed=5)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg.vocab_size)
  loss = lambda c: lambda p: jnp.sum(Llama(c).apply({"params": p}, tokens) ** 2)
  whole = Llama(cfg).apply({"params": params}, tokens)
  g_whole = jax.grad(loss(cfg))(params)
  for chunk in (3, 4):
    blocked = cfg.replace(attention_chunk=chunk, remat=True)
    np.testing.assert_allclose(Llama(blocked).apply({"params": params}, tokens), whole,
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(loss(blocked))(params)), jax.tree.leaves(g_whole)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_params_run():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    param_dtype="bfloat16", dtype="bfloat16")
  params = init_params(cfg)
  assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
  logits = Llama(cfg).apply({"params": params}, jnp.zeros((1, 5), jnp.int32))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_non_finite_logits_are_an_error_not_token_0():
  """A NaN's argmax is token 0, a valid id: greedy decoding marks such rows NON_FINITE and
  the references refuse them (one-length and ragged paths), naming the prompts."""
  from dtm import evaluation
  from dtm.errors import DtmError
  from dtm.generate import NON_FINITE
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  params = init_params(cfg, seed=3)
  emb = params["embed"]["embedding"]
  params = {**params, "embed": {"embedding": emb.at[5].set(jnp.nan)}}  # token 5 poisons a row
  prompts = np.array([[1, 2, 3, 4], [6, 5, 7, 8], [9, 10, 11, 12]], np.int32)
  y = np.asarray(greedy_generate(cfg, params, jnp.asarray(prompts), 6))
  assert np.all(y[1] == NON_FINITE) and not np.any(y[[0, 2]] == NON_FINITE)
  with pytest.raises(DtmError, match=r"non-finite logits .* 1 of 3 prompts \(rows \[1\]"):
    evaluation.generate_references(cfg, params, prompts, 6, batch_size=4)
  with pytest.raises(DtmError, match=r"1 of 3 prompts"):
    evaluation.generate_references(cfg, params, [prompts[0], prompts[1, :3], prompts[2]], 6,
                                   batch_size=4)
