"""Pieces shared by the job configs: `parse_arg` and the model / data / prompt blocks.

Every field is declared here or in the job config with a one-line comment; library
code reads fields directly (never `config.get(key, default)`).
"""
from __future__ import annotations

import ml_collections

# The shared data folder beside the checkout (CI has it too), relative to the repo root.
SHARED_DATA = "../shared/data"
WIKITEXT_VALID_TOKENS = f"{SHARED_DATA}/wikitext-2/wiki.valid.tokens"

# Named models: what `model=<name>` in a config arg selects.
MODELS = {
    "smollm2": "smollm2-135m",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'model=llama2-7b,runlocal' -> ConfigDict(model='llama2-7b', runlocal=True).

  Only keys present in `defaults` are accepted; values are cast to the default's type.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


def model_name(arg_model: str) -> str:
  return MODELS.get(arg_model, arg_model)


def model_fields(config: ml_collections.ConfigDict, name: str) -> None:
  # Model: 'smollm2-135m', a .gguf path, an HF dir, a converted dtm dir, or a hub id.
  config.model = name
  # Dtype of stored params ('float32' on CPU; 'bfloat16' on TPU/GPU).
  config.param_dtype = "float32"
  # Dtype of activations and matmuls.
  config.dtype = "float32"


def data_fields(config: ml_collections.ConfigDict) -> None:
  data = config.data = ml_collections.ConfigDict()
  # 'default' (prompts shipped with dtm), 'wikitext-2-raw-v1', 'c4', a hub id, or a
  # local builder 'text' | 'json' | 'parquet' | 'auto' together with data_files.
  data.source = "default"
  # Local file(s) for the local builders (comma-separated for several).
  data.data_files = ""
  # Split of hub datasets.
  data.split = "test"
  # Column holding the text.
  data.text_field = "text"
  # Keep only the first max_docs documents (0 = all).
  data.max_docs = 0
  # BOS handling: 'auto' (tokenizer's own add_bos_token), 'yes' or 'no'.
  data.bos = "auto"


def prompt_fields(config: ml_collections.ConfigDict) -> None:
  prompts = config.prompts = ml_collections.ConfigDict()
  # Number of prompts P.
  prompts.num = 32
  # Prompt length c in tokens (BOS included when data.bos adds one).
  prompts.length = 32
  # Reference continuation length N (greedy tokens of the base model).
  prompts.new_tokens = 32
  # Seed for drawing prompt windows.
  prompts.seed = 0
  # JSONL file of token-id prompts ({"ids": [...]} per line, all of length c);
  # overrides the data pipeline when set.
  prompts.jsonl = ""
  # Prompts per forward pass (generation and teacher-forced pass).
  prompts.batch_size = 16


def ppl_fields(config: ml_collections.ConfigDict) -> None:
  ppl = config.ppl = ml_collections.ConfigDict()
  # Window length T in tokens.
  ppl.window = 128
  # Stride between windows (0 = disjoint windows, stride = window).
  ppl.stride = 0
  # Context-aware PPL scores only positions i >= ctx of each window (1 = ordinary PPL).
  ppl.ctx = 64
  # Number of windows (0 = all that fit).
  ppl.max_windows = 16
  # Windows per forward pass.
  ppl.batch_size = 8


def calibration_fields(config: ml_collections.ConfigDict) -> None:
  """Calibration windows for the methods that need input statistics (wanda, sparsegpt,
  gptq); unused unless config.compression (or probe.method) names one of them."""
  cal = config.calibration = ml_collections.ConfigDict()
  # Corpus of the windows, as data.source: 'wikitext-2-raw-v1', 'c4', a hub id, or a local
  # builder 'text' | 'json' | 'parquet' | 'auto' with data_files (the references use C4 or
  # WikiText-2 train).
  cal.source = "wikitext-2-raw-v1"
  # Local file(s) for the local builders (comma-separated for several).
  cal.data_files = ""
  # Split of hub datasets (keep it apart from the evaluation data).
  cal.split = "train"
  # Column holding the text.
  cal.text_field = "text"
  # Keep only the first max_docs documents (0 = all; 'c4' needs it, it is streamed).
  cal.max_docs = 0
  # BOS at the start of every window: 'auto' (tokenizer's own add_bos_token), 'yes' or 'no'.
  cal.bos = "auto"
  # JSONL file of token-id windows ({"ids": [...]} per line, each of `length` ids); overrides
  # the corpus when set (the only source for a model without a tokenizer).
  cal.jsonl = ""
  # Number of windows (the references' nsamples).
  cal.samples = 128
  # Window length in tokens (the references' seqlen: 2048); at most the model's context.
  cal.length = 2048
  # Seed for the window offsets.
  cal.seed = 0
  # 'sequential' (the references: layer l's statistics from the compressed layers < l) or
  # 'parallel' (every statistic from the original model).
  cal.mode = "sequential"
  # Windows per forward pass while collecting statistics (must divide samples).
  cal.batch_size = 8


def local_calibration_fields(config: ml_collections.ConfigDict, samples: int,
                             length: int = 512) -> None:
  """`calibration_fields` on `samples` x `length` windows of the WikiText-2 valid tokens
  beside the checkout (the jobs' local calibration data; the references use C4)."""
  calibration_fields(config)
  config.calibration.source = "text"
  config.calibration.data_files = WIKITEXT_VALID_TOKENS
  config.calibration.samples = samples
  config.calibration.length = length
