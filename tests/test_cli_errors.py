"""Bad input to `main.py` gives one `error: ...` line on stderr, exit status 2, no traceback,
and never touches an existing workdir/results.json.

Each case runs `main.py --config=configs/evaluate.py:runlocal` in a subprocess. Cases that
need a valid model use a tiny random Llama (2 layers, hidden 32) exported as an HF
directory together with SmolLM2's GGUF tokenizer (hence vocab 49152); no torch needed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

from conftest import REPO
from dtm import convert, gguf_io, safetensors_io
from gguf_files import write_gguf
from dtm.model import init_params
from dtm.model_config import ModelConfig

SENTINEL = {"sentinel": "results of an earlier run"}
TINY = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  """An HF checkpoint directory (config.json, model.safetensors, tokenizer files)."""
  directory = str(tmp_path_factory.mktemp("tiny") / "model")
  tokenizer = gguf_io.gguf_tokenizer(gguf_io.find_smollm2_gguf())
  convert.export_hf(init_params(TINY), TINY, directory, tokenizer=tokenizer)
  return directory


def run_main(workdir, *overrides: str,
             config: str = "configs/evaluate.py:runlocal") -> subprocess.CompletedProcess:
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
  cmd = [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def assert_user_error(tmp_path, *overrides: str, match: tuple[str, ...]) -> str:
  """Run main.py with `overrides` in a workdir holding a sentinel results.json; check the
  clean failure and that the sentinel survives. Returns the error line."""
  workdir = tmp_path / "workdir"
  workdir.mkdir(exist_ok=True)
  results = workdir / "results.json"
  results.write_text(json.dumps(SENTINEL))
  proc = run_main(workdir, *overrides)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  for needle in match:
    assert needle.lower() in errors[0].lower(), (needle, errors[0])
  assert json.loads(results.read_text()) == SENTINEL
  return errors[0]


def copy_model(tiny_dir: str, tmp_path) -> str:
  target = str(tmp_path / "model_copy")
  shutil.copytree(tiny_dir, target)
  return target


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, field", [
    ("--config.nonexistent=3", "'nonexistent'"),
    ("--config.prompts.bogus=1", "'prompts.bogus'"),
])
def test_unknown_config_field(tmp_path, override, field):
  assert_user_error(tmp_path, override, match=("unknown config field", field))


@pytest.mark.parametrize("override, message", [
    ("--config.prompts.lenght=5",
     "error: unknown config field 'prompts.lenght' (did you mean 'prompts.length'?)"),
    ("--config.promts.length=5",
     "error: unknown config field 'promts.length' (did you mean 'prompts.length'?)"),
    ("--config.prompts.bogus=1",
     "error: unknown config field 'prompts.bogus' (prompts has: batch_size, jsonl, length, "
     "new_tokens, num, seed)"),
])
def test_misspelt_config_field_suggests_the_declared_one(tmp_path, override, message):
  assert assert_user_error(tmp_path, override, match=()) == message


def test_missing_prompt_file_names_the_config_field(tiny_dir, tmp_path):
  assert_user_error(tmp_path, f"--config.model={tiny_dir}",
                    f"--config.prompts.jsonl={tmp_path / 'nope.jsonl'}",
                    match=("not found", "nope.jsonl", "check prompts.jsonl"))


def test_bad_config_value_and_variant(tmp_path):
  assert_user_error(tmp_path, "--config.prompts.num=abc", match=("config.prompts.num", "abc"))
  proc = run_main(tmp_path, config="configs/evaluate.py:bogus=1")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert "error: bad config:" in proc.stderr and "unknown config arg 'bogus'" in proc.stderr
  proc = run_main(tmp_path, config="configs/nope.py")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert "error: bad config:" in proc.stderr and "configs/nope.py" in proc.stderr


# ----------------------------------------------------------------------------- model


def test_nonexistent_model_path(tmp_path):
  assert_user_error(tmp_path, "--config.model=/nonexistent/dir",
                    match=("model not found", "/nonexistent/dir"))


def test_hub_id_offline_says_how_to_use_local_files(tmp_path):
  assert_user_error(tmp_path, "--config.model=meta-llama/Llama-2-7b-hf",
                    match=("meta-llama/Llama-2-7b-hf", "HF_HUB_OFFLINE", "local",
                           "config.json + *.safetensors", ".gguf"))


def test_unsupported_architecture_config(tmp_path):
  model = tmp_path / "gpt2"
  model.mkdir()
  (model / "config.json").write_text(json.dumps({
      "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257,
      "n_embd": 768, "n_layer": 12, "n_head": 12}))
  assert_user_error(tmp_path, f"--config.model={model}",
                    match=("unsupported architecture", "gpt2", "LlamaForCausalLM"))


def test_config_without_model_type_names_the_missing_field(tmp_path):
  model = tmp_path / "llama-no-type"
  model.mkdir()
  (model / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 32,
      "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}))
  line = assert_user_error(tmp_path, f"--config.model={model}",
                           match=("no model_type", "expected 'llama' for LlamaForCausalLM"))
  assert "unsupported architecture" not in line


def test_gguf_unknown_architecture(tmp_path):
  path = write_gguf(tmp_path / "falcon.gguf", "falcon")
  assert_user_error(tmp_path, f"--config.model={path}",
                    match=("falcon.gguf", "architecture 'falcon'", "supports only 'llama'"))


def test_gguf_unknown_tensor_type(tmp_path):
  q81 = gguf.GGMLQuantizationType.Q8_1
  block, size = gguf.GGML_QUANT_SIZES[q81]
  raw = np.zeros((32, 64 // block * size), np.uint8)  # v_proj [out=32, in=64] as Q8_1 blocks
  path = write_gguf(tmp_path / "q81.gguf", "llama", [("blk.0.attn_v.weight", raw, q81)])
  assert_user_error(tmp_path, f"--config.model={path}",
                    match=("blk.0.attn_v.weight", "unsupported type Q8_1"))


def test_truncated_safetensors(tiny_dir, tmp_path):
  model = copy_model(tiny_dir, tmp_path)
  weights = os.path.join(model, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  assert_user_error(tmp_path, f"--config.model={model}", match=("truncated", "model.safetensors"))


def test_truncated_safetensors_without_torch_written_by_hand(tmp_path):
  """A single-tensor file cut inside its data, written with dtm's own writer."""
  model = tmp_path / "hand"
  model.mkdir()
  (model / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
  arr = np.ones((64, 32), np.float32)
  path = str(model / "model.safetensors")
  safetensors_io.write_file(path, [("model.embed_tokens.weight", arr.shape, arr.dtype)],
                            lambda name: arr)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  assert_user_error(tmp_path, f"--config.model={model}",
                    match=("truncated", "model.embed_tokens.weight"))


def test_shape_mismatch_between_config_and_tensors(tiny_dir, tmp_path):
  model = copy_model(tiny_dir, tmp_path)
  config_path = os.path.join(model, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["intermediate_size"] = 48
  with open(config_path, "w") as f:
    json.dump(config, f)
  assert_user_error(tmp_path, f"--config.model={model}",
                    match=("shape mismatch", "mlp", "(64, 32)", "(48, 32)"))


# ----------------------------------------------------------------------------- data


def test_empty_data_file(tiny_dir, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert_user_error(tmp_path, f"--config.model={tiny_dir}", "--config.data.source=text",
                    f"--config.data.data_files={empty}", match=("no data", "empty.txt"))


def test_too_short_data(tiny_dir, tmp_path):
  short = tmp_path / "short.txt"
  short.write_text("Hello world.\nA short line.\n")
  assert_user_error(tmp_path, f"--config.model={tiny_dir}", "--config.data.source=text",
                    f"--config.data.data_files={short}",
                    match=("not enough data", "4 prompts of 16 tokens", "64 are needed"))


# ----------------------------------------------------------------------------- compression


@pytest.mark.parametrize("spec, match", [
    ("q@*:zap(0.5)", ("unknown compression method 'zap'", "magnitude")),
    ("foo@*:magnitude(0.5)", ("unknown component kind 'foo'",)),
    ("down@*:magnitude(1.5)", ("sparsity rate", "1.5")),
])
def test_bad_compression_spec(tmp_path, spec, match):
  assert_user_error(tmp_path, f"--config.compression={spec}", match=match)  # before model load


def test_compression_layer_out_of_range(tiny_dir, tmp_path):
  assert_user_error(tmp_path, f"--config.model={tiny_dir}", "--config.compression=q@7:magnitude(0.5)",
                    match=("layer 7", "2 layers"))


def test_continuation_longer_than_model_context(tiny_dir, tmp_path):
  assert_user_error(tmp_path, f"--config.model={tiny_dir}", "--config.prompts.new_tokens=300",
                    match=("exceeds the model's context", "256"))


@pytest.mark.parametrize("spec, match", [
    ("q@*:absmax(bits=9)", ("bits", "9")),
    ("q@*:absmax(bits=4,granularity=group,group_size=5)", ("group_size 5", "does not divide")),
])
def test_bad_quantization_spec(tiny_dir, tmp_path, spec, match):
  assert_user_error(tmp_path, f"--config.model={tiny_dir}", f"--config.compression={spec}",
                    match=match)


def test_probe_sweep_impossible_sparsity(tmp_path):
  workdir = tmp_path / "probe"
  proc = run_main(workdir, "--config.probe.levels=(0.5,1.0)", config="configs/probe.py:runlocal")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "sparsity rate" in proc.stderr and "1" in proc.stderr


def test_probe_negative_cpu_devices(tmp_path):
  proc = run_main(tmp_path / "probe", "--config.cpu_devices=-1", config="configs/probe.py:runlocal")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "cpu_devices must be >= 0" in errors[0], proc.stderr[-2000:]
