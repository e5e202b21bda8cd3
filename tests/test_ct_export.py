"""compressed-tensors export (dtm/export/compressed_tensors.py) loaded by transformers.

On a tiny random Llama (float32): transformers (with the compressed-tensors package, a
test-only dependency) loads the export and its logits equal dtm's fake-quantized logits
  * weight-only (int8 per channel, int-quantized; 4-bit group-wise absmax and sym rtn and
    per-channel sym rtn, pack-quantized; a pruned component dense): within 1e-5 absolute
    (float rounding only: every dequantized weight is dtm's bit for bit);
  * W8A8 (int8 per-channel weights, dynamic per-token int8 activations): dtm with the
    activation scale convention of compressed-tensors' reference forward (absmax / 127.5,
    codes -128..127, emulated here) agrees on 95% of the logits within 1e-5, max 5e-3
    (measured 1.1e-3: torch-vs-XLA float differences flip a few codes at rounding ties);
    dtm's own w8a8 (absmax / 127) within 0.05 (measured 9e-3, mean 1.3e-3; max |logit|
    ~0.6, and dtm's w8a8 differs from the float model by about as much);
  * asymmetric 4-bit rtn (zero points packed along the output axis) decompresses, by
    compressed-tensors' own PackedQuantizationCompressor, to dtm's rtn weights exactly
    (transformers 5.24 + compressed-tensors 0.20.1 cannot load asymmetric pack-quantized
    checkpoints: it expects the zero point unpacked, [out, G], while the format and vLLM
    store it packed, as the package's own compressor writes it).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_or_skip
from tests.tiny_model import TINY
from dtm import compress
from dtm.compress import act_quant, gptq, int8
from dtm.components import Component, get_path
from dtm.errors import DtmError
from dtm.export import compressed_tensors as ct
from dtm.model import Llama, init_params

CFG = TINY
WEIGHT_ONLY = ("attn@*:absmax(8); gate,up@*:rtn(4,32,sym=True); down@0,2:absmax(4,granularity=group,"
               "group_size=32); down@1:magnitude(0.5); o@1:rtn(4,sym=True)")


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, seed=3)


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16))


def _dtm_logits(p, tokens):
  return np.asarray(jax.jit(lambda p, t: Llama(CFG).apply({"params": p}, t))(p, jnp.asarray(tokens)))


def _hf_logits(directory, tokens):
  torch = torch_or_skip()
  pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (test extra)")
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_weight_only_export_matches_dtm_in_transformers(params, tokens, tmp_path):
  pc, _ = compress.apply_spec(params, WEIGHT_ONLY)
  qconfig = ct.export(str(tmp_path), CFG, params, WEIGHT_ONLY, compressed_params=pc)
  cfg_json = json.loads((tmp_path / "config.json").read_text())
  assert cfg_json["quantization_config"] == qconfig
  assert qconfig["format"] == "mixed-precision"
  assert {g["format"] for g in qconfig["config_groups"].values()} == {"int-quantized",
                                                                      "pack-quantized"}
  assert "model.layers.1.mlp.down_proj" not in str(qconfig)  # pruned: dense
  got = _hf_logits(str(tmp_path), tokens)
  want = _dtm_logits(pc, tokens)
  float_logits = _dtm_logits(params, tokens)
  assert np.abs(want - float_logits).max() > 1e-2  # the compression is visible
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _ct_w8a8_branch(x, w_IO, threshold):
  """W8A8 as compressed-tensors' reference forward fake-quantizes: per-token scale
  absmax / 127.5, q = round(clamp(x / scale, -128, 127)); weights dtm's int8 grid."""
  del threshold
  x32 = x.astype(jnp.float32)
  # IEEE divisions as torch computes them (XLA would multiply by reciprocals)
  scale = gptq._exact_div(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), 127.5)
  xq = jnp.round(jnp.clip(gptq._exact_div(x32, scale), -128, 127)) * scale
  qw, aw = int8.quantize_weight(w_IO.T)
  wq = qw.astype(jnp.float32) * (aw / jnp.float32(127))[:, None]
  return jnp.dot(xq, wq.T, preferred_element_type=jnp.float32)


def test_w8a8_export_matches_dtm_in_transformers(params, tokens, tmp_path, monkeypatch):
  spec = "*@*:w8a8"
  pc, _ = compress.apply_spec(params, spec)
  qconfig = ct.export(str(tmp_path), CFG, params, spec)
  (group,) = qconfig["config_groups"].values()
  assert qconfig["format"] == "int-quantized" and len(group["targets"]) == 7 * CFG.num_layers
  assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
  got = _hf_logits(str(tmp_path), tokens)
  own = _dtm_logits(pc, tokens)
  float_logits = _dtm_logits(params, tokens)
  np.testing.assert_allclose(got, own, rtol=0, atol=0.05)
  branches = list(act_quant._BRANCHES)
  branches[act_quant.MODES["w8a8"]] = _ct_w8a8_branch
  monkeypatch.setattr(act_quant, "_BRANCHES", tuple(branches))
  ct_convention = _dtm_logits(pc, tokens)
  assert np.abs(ct_convention - float_logits).max() > 1e-3
  # float-level differences (torch vs XLA) flip a few codes at rounding ties, and a flip
  # propagates: most logits agree to 1e-5, the worst to about 1e-3 (measured 1.1e-3,
  # mean 1e-5, 95% within 1e-5)
  diff = np.abs(got - ct_convention)
  assert diff.max() < 5e-3 and diff.mean() < 5e-5 and (diff < 1e-5).mean() > 0.9, (
      diff.max(), diff.mean(), (diff < 1e-5).mean())


def test_asymmetric_rtn_decompresses_exactly_and_errors(params):
  torch = torch_or_skip()
  pytest.importorskip("compressed_tensors")
  from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
  from compressed_tensors.quantization import QuantizationScheme
  w_OI = np.asarray(get_path(params, Component(1, "up").param_path)[1]).T
  for method, group in ((compress.Method("rtn", {"bits": 4, "group_size": 32}), 32),
                        (compress.Method("rtn", {"bits": 3}), None)):
    tensors = ct.quantized_tensors(w_OI, method, "L01.up")
    sch = ct.scheme(method, "L01.up")
    scheme = QuantizationScheme(targets=["Linear"], weights=sch["weights"], format=sch["format"])
    out = PackedQuantizationCompressor.decompress(
        {k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}, scheme)
    want = gptq.rtn(jnp.asarray(w_OI), method.kwargs["bits"], group).w
    np.testing.assert_array_equal(out["weight"].numpy(), np.asarray(want))
  bits = np.random.default_rng(1).integers(-8, 8, (5, 70))
  packed = ct.pack_int32(bits, 4)
  from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
  np.testing.assert_array_equal(packed, pack_to_int32(torch.from_numpy(bits).to(torch.int8), 4).numpy())
  for spec, what in (("down@1:llm_int8(6.0)", "llm_int8"), ("q@0:gptq(4)", "gptq"),
                     ("q@0:absmax(8,granularity=tensor)", "tensor")):
    with pytest.raises(DtmError, match=what):
      ct.export("/nonexistent/never-written", CFG, params, spec)


def test_convert_job_writes_compressed_tensors_and_refuses_what_it_cannot(params, tmp_path):
  from configs import convert as convert_config
  from dtm import convert, safetensors_io
  from dtm.jobs import convert as convert_job
  model_dir = str(tmp_path / "model")
  convert.export_hf(params, CFG, model_dir)

  def config(spec, **overrides):
    c = convert_config.get_config("runlocal")
    c.model, c.compression, c.save_orbax, c.export_hf = model_dir, spec, False, True
    c.export_format = "compressed-tensors"
    for k, v in overrides.items():
      c[k] = v
    return c

  convert_job.run(config("attn@*:absmax(8); down@*:w8a8"), str(tmp_path / "out"))
  hf = tmp_path / "out" / "hf"
  qconfig = json.loads((hf / "config.json").read_text())["quantization_config"]
  assert qconfig["quant_method"] == "compressed-tensors" and len(qconfig["config_groups"]) == 2
  header = safetensors_io.read_header(str(hf / "model.safetensors"))
  assert header["model.layers.2.mlp.down_proj.weight"]["dtype"] == "I8"
  assert header["model.layers.2.mlp.down_proj.weight_scale"]["shape"] == [CFG.hidden_size, 1]
  assert json.loads((tmp_path / "out" / "compression.json").read_text())["components"][
      "L02.down"]["method"] == "w8a8"
  with pytest.raises(DtmError, match="llm_int8"):
    convert_job.run(config("down@1:llm_int8(6.0)"), str(tmp_path / "bad1"))
  with pytest.raises(DtmError, match="orbax model directory"):
    convert_job.run(config("down@1:w8a8", save_orbax=True, export_hf=False), str(tmp_path / "bad2"))
  with pytest.raises(DtmError, match="dense safetensors"):
    convert_job.run(config("down@1:w8a8", export_format="safetensors"), str(tmp_path / "bad3"))
  with pytest.raises(DtmError, match="export_format must be one of"):
    convert_job.run(config("", export_format="gguf"), str(tmp_path / "bad4"))
  assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir())
                 for d in ("bad1", "bad2", "bad3"))
