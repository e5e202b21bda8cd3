"""Tests for dtm.gguf_io: config, tensors and tokenizer of GGUF files, checked against
transformers' own GGUF loader (torch, test-only) and against tiny files written here."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from pathlib import Path

import gguf
import numpy as np
import pytest

from dtm import gguf_io
from gguf_files import TINY, write_gguf as _write_gguf
from dtm.errors import DtmError
from dtm.model_config import ModelConfig

WIKITEXT_TEST = (Path(__file__).resolve().parents[1].parent / "shared" / "data"
                 / "wikitext-2-raw" / "wiki.test.raw")
TORCH_REASON = "transformers' GGUF loader (the reference implementation) needs torch"

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm2_path() -> str:
  return gguf_io.find_smollm2_gguf()


# ----------------------------------------------------------------------------- tiny files


def _quant(w: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
  """(bytes as stored in GGUF, what dequantizing them gives) for an HF-layout float32 array."""
  q = gguf.quants.quantize(w, qtype)
  return q, gguf.quants.dequantize(q, qtype).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """(path, {hf_name: expected array}) of a tiny llama GGUF whose q/k weights are permuted
  llama.cpp-style, stored in F32/F16/BF16/Q8_0/Q4_0/Q4_1."""
  rng = np.random.default_rng(0)
  D, F, V, H, Hkv = TINY["hidden"], TINY["ffn"], TINY["vocab"], TINY["heads"], TINY["kv_heads"]
  Dh = D // H
  types = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
  tensors, expected = [], {}

  def add(gguf_name, hf_name, w, qtype, n_head=None):
    stored = gguf_io.permute_rotary(w, n_head) if n_head else w
    if qtype == Q.F32:
      data, deq = stored, w
    elif qtype == Q.F16:
      data, deq = stored.astype(np.float16), w.astype(np.float16).astype(np.float32)
    else:
      data, deq = _quant(stored, qtype)[0], _quant(w, qtype)[1]  # quant blocks run along rows
    tensors.append((gguf_name, data, None if qtype in (Q.F32, Q.F16) else qtype))
    expected[hf_name] = deq

  add("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((V, D), np.float32), Q.F32)
  add("output_norm.weight", "model.norm.weight", rng.standard_normal(D, np.float32), Q.F32)
  for l in range(TINY["layers"]):
    for i, (stem, hf, shape, n_head) in enumerate([
        ("attn_q", "self_attn.q_proj", (H * Dh, D), H),
        ("attn_k", "self_attn.k_proj", (Hkv * Dh, D), Hkv),
        ("attn_v", "self_attn.v_proj", (Hkv * Dh, D), None),
        ("attn_output", "self_attn.o_proj", (D, H * Dh), None),
        ("ffn_gate", "mlp.gate_proj", (F, D), None),
        ("ffn_up", "mlp.up_proj", (F, D), None),
        ("ffn_down", "mlp.down_proj", (D, F), None)]):
      w = rng.standard_normal(shape, np.float32)
      add(f"blk.{l}.{stem}.weight", f"model.layers.{l}.{hf}.weight", w, types[(i + l) % 6], n_head)
    for stem, hf in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
      add(f"blk.{l}.{stem}.weight", f"model.layers.{l}.{hf}.weight",
          rng.standard_normal(D, np.float32), Q.F32)
  path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
  return _write_gguf(path, tensors=tensors), expected


def test_tiny_round_trip_unpermutes_qk(tiny_model):
  path, expected = tiny_model
  got = dict(gguf_io.iter_gguf_tensors(path))
  assert got.keys() == expected.keys()
  for name, want in expected.items():
    np.testing.assert_array_equal(got[name], want, err_msg=name)
  # q and k were stored permuted, so reading without un-permuting would fail the check above
  q = expected["model.layers.0.self_attn.q_proj.weight"]
  assert not np.array_equal(gguf_io.permute_rotary(q, TINY["heads"]), q)


def test_permute_inverse():
  w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)
  np.testing.assert_array_equal(gguf_io.unpermute_rotary(gguf_io.permute_rotary(w, 6), 6), w)


def test_tiny_config_and_dtype(tiny_model):
  path, _ = tiny_model
  d = gguf_io.read_gguf_config(path)
  cfg = ModelConfig.from_hf_dict(d)
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
          cfg.num_key_value_heads, cfg.head_dim) == (2, 64, 4, 2, 16)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5
  name, arr = next(gguf_io.iter_gguf_tensors(path, dtype=np.float16))
  assert name == "model.embed_tokens.weight" and arr.dtype == np.float16 and arr.shape == (32, 64)


def test_llama3_rope_freqs(tmp_path):
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  freqs = gguf_io._llama3_rope_freqs(scaling, 500000.0, 16).astype(np.float32)
  embd = np.zeros((TINY["vocab"], TINY["hidden"]), np.float32)
  path = _write_gguf(tmp_path / "l3.gguf", tensors=[("rope_freqs.weight", freqs, None),
                                                    ("token_embd.weight", embd, None)])
  d = gguf_io.read_gguf_config(path)
  assert d["rope_scaling"] == scaling
  assert dict(ModelConfig.from_hf_dict(d).rope_scaling)["factor"] == 8.0
  assert [n for n, _ in gguf_io.iter_gguf_tensors(path)] == ["model.embed_tokens.weight"]


# ----------------------------------------------------------------------------- bad input


def test_wrong_architecture(tmp_path):
  path = _write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
  with pytest.raises(DtmError, match="gpt2"):
    gguf_io.read_gguf_config(path)
  with pytest.raises(DtmError, match="gpt2"):
    gguf_io.iter_gguf_tensors(path)  # checks before the first tensor is asked for


def test_unsupported_tensor_type(tmp_path):
  block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
  raw = np.zeros((48, 64 // block * size), np.uint8)  # [rows, bytes per row]
  path = _write_gguf(tmp_path / "q81.gguf", tensors=[("blk.0.attn_v.weight", raw, Q.Q8_1)])
  with pytest.raises(DtmError, match=r"blk\.0\.attn_v\.weight.*Q8_1"):
    gguf_io.iter_gguf_tensors(path)


def test_unknown_tensor(tmp_path):
  path = _write_gguf(tmp_path / "bias.gguf",
                     tensors=[("blk.0.attn_q.bias", np.zeros(64, np.float32), None)])
  with pytest.raises(DtmError, match=r"blk\.0\.attn_q\.bias"):
    list(gguf_io.iter_gguf_tensors(path))
  with pytest.raises(DtmError, match="attention_bias"):  # the config says so too
    ModelConfig.from_hf_dict(gguf_io.read_gguf_config(path))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.999])
def test_truncated_file(tiny_model, tmp_path, fraction):
  data = Path(tiny_model[0]).read_bytes()
  path = tmp_path / "cut.gguf"
  path.write_bytes(data[:int(len(data) * fraction)])
  with pytest.raises(DtmError, match="cut.gguf"):
    gguf_io.read_gguf_config(str(path))
  with pytest.raises(DtmError, match="cut.gguf"):
    list(gguf_io.iter_gguf_tensors(str(path)))


def test_missing_and_garbage_file(tmp_path):
  with pytest.raises(DtmError, match="nope.gguf"):
    gguf_io.read_gguf_config(str(tmp_path / "nope.gguf"))
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(DtmError, match="junk.gguf"):
    gguf_io.gguf_tokenizer(str(tmp_path / "junk.gguf"))


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
  """A tiny 'llama' (SentencePiece BPE, byte fallback, merges derived from scores) vocabulary."""
  pytest.importorskip("torch", reason=TORCH_REASON)
  pieces = ["\u2581", *"abcdefghijklmnopqrstuvwxyzTH.,", "\u2581t", "he", "\u2581the", "\u2581a",
            "in", "\u2581in", "er", "\u2581c", "at", "\u2581cat", "\u2581s", "\u2581sat", "on",
            "\u2581on", "\u2581\u2581", "\u2581T", "\u2581The", "ing"]
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
  tokenizer = {"model": "llama", "tokens": tokens,
               "scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
               "types": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
               "ids": {"bos": 1, "eos": 2, "unk": 0}}
  path = _write_gguf(tmp_path / "spm.gguf", tokenizer=tokenizer)
  ours = gguf_io.gguf_tokenizer(path)
  from transformers import AutoTokenizer
  ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
  for text in ["The cat sat on the mat", "  the  cat\nsat", "h\u00e9llo \u65e5\u672c \U0001f917", "",
               " ", "x</s>y <s>", "Theing,thecat."]:
    ids = ours(text)["input_ids"]
    assert ids == ref(text)["input_ids"], text
    assert ids[0] == 1  # add_bos defaults to True for SentencePiece vocabularies
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- SmolLM2


def test_smollm2_config(smollm2_path):
  cfg = ModelConfig.from_hf_dict(gguf_io.read_gguf_config(smollm2_path))
  assert cfg.num_hidden_layers == 30
  assert cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3 and cfg.head_dim == 64
  assert cfg.hidden_size == 576 and cfg.intermediate_size == 1536 and cfg.vocab_size == 49152
  assert cfg.tie_word_embeddings and cfg.rope_scaling is None
  assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
  assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
  return gguf_io.gguf_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_path, smollm2_tokenizer):
  """(ours, transformers' GGUF tokenizer)."""
  pytest.importorskip("torch", reason=TORCH_REASON)
  from transformers import AutoTokenizer
  ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path),
                                      gguf_file=os.path.basename(smollm2_path))
  return smollm2_tokenizer, ref


@pytest.fixture(scope="module")
def wikitext_lines() -> list[str]:
  if not WIKITEXT_TEST.exists():
    pytest.fail(f"WikiText-2 test split not found at {WIKITEXT_TEST} (shared/ beside the repo)")
  import datasets
  ds = datasets.load_dataset("text", data_files=str(WIKITEXT_TEST), split="train")
  return ds["text"]


def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizers, wikitext_lines):
  ours, ref = smollm2_tokenizers
  from transformers import PreTrainedTokenizerFast
  assert isinstance(ours, PreTrainedTokenizerFast)
  assert (ours.bos_token, ours.eos_token, ours.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
  assert len(ours) == len(ref) == 49152
  extra = ["Hello world 12345 <|im_start|>user\nhi<|im_end|>", "  leading spaces\t tab",
           "naïve café — 日本語 🤗", "<|endoftext|>"]
  lines = list(wikitext_lines) + extra
  assert len(lines) > 2800
  got = ours(lines)["input_ids"]
  want = ref(lines)["input_ids"]
  mismatches = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
  assert not mismatches, f"{len(mismatches)} lines differ, first: {lines[mismatches[0]]!r}"
  for line, ids in list(zip(lines, got))[::97]:
    assert ours.decode(ids) == ref.decode(ids) == line


def test_smollm2_tokenizer_save(smollm2_tokenizer, tmp_path):
  tok = smollm2_tokenizer
  tok.save_pretrained(tmp_path)
  from transformers import AutoTokenizer
  back = AutoTokenizer.from_pretrained(tmp_path)
  text = "The quick brown fox <|im_end|> 42"
  assert back(text)["input_ids"] == tok(text)["input_ids"]
  assert (back.bos_token, back.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_smollm2_tensors_match_transformers(smollm2_path):
  pytest.importorskip("torch", reason=TORCH_REASON)
  from transformers import LlamaForCausalLM
  model = LlamaForCausalLM.from_pretrained(os.path.dirname(smollm2_path),
                                           gguf_file=os.path.basename(smollm2_path))
  ref = model.state_dict()
  del model
  names = {"model.embed_tokens.weight", "model.norm.weight",
           "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
           "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight",
           "model.layers.0.input_layernorm.weight", "model.layers.29.self_attn.k_proj.weight"}
  seen = set()
  for name, arr in gguf_io.iter_gguf_tensors(smollm2_path):
    assert name in ref, name
    if name in names:
      want = ref[name].float().numpy()
      assert arr.shape == want.shape, name
      np.testing.assert_allclose(arr, want, rtol=1e-6, atol=1e-7, err_msg=name)
      seen.add(name)
  assert seen == names
