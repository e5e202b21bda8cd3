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
from dtm.compress import act_quant, calibration, gptq, int8
from dtm.components import Component, get_path
from dtm.errors import DtmError
from dtm.export import compressed_tensors as ct
from dtm.model import Llama, init_params
from dtm.model_config import ModelConfig

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


# ---------------------------------------------------------------------------------- GPTQ

# hidden 128, MLP 256, o's input 4 x 32: group_size 128 divides every component's input
CFG128 = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     max_position_embeddings=128, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def gptq_setup():
  """(params, calibration statistics of every component) of the g128-sized tiny Llama."""
  p = init_params(CFG128, seed=3)
  windows = np.random.default_rng(1).integers(0, CFG128.vocab_size, (8, 32))
  return p, calibration.collect_statistics(CFG128, p, windows, batch_size=4)


def _hf_logits_decompressed(directory, dense_dir, tokens):
  """transformers' float Llama (from `dense_dir`) whose quantized modules hold the weights
  that compressed-tensors' own PackedQuantizationCompressor decompresses from the export
  in `directory` -> (logits, {module: decompressed weight})."""
  torch = torch_or_skip()
  pytest.importorskip("compressed_tensors")
  import transformers
  from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
  from compressed_tensors.quantization import QuantizationScheme
  from safetensors.numpy import load_file
  qconfig = json.loads((directory / "config.json").read_text())["quantization_config"]
  tensors = load_file(str(directory / "model.safetensors"))
  model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
  weights = {}
  for group in qconfig["config_groups"].values():
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                format=group["format"])
    for module in group["targets"]:
      state = {k[len(module) + 1:]: torch.from_numpy(v) for k, v in tensors.items()
               if k.startswith(module + ".")}
      weights[module] = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
      model.get_submodule(module).weight.data.copy_(weights[module])
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy(), weights


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_4bit_g128_export_matches_dtm(gptq_setup, tokens, tmp_path, sym, act_order):
  """transformers loads symmetric pack-quantized; asymmetric goes through the package's
  decompressor (transformers 5.25 still expects an unpacked zero point)."""
  from dtm import convert
  params, stats = gptq_setup
  spec = f"*@*:gptq(4,128,act_order={act_order},sym={sym})"
  grids = {}
  pc, _ = compress.apply_spec(params, spec, calibration=stats, grids=grids)
  plain, _ = compress.apply_spec(params, spec, calibration=stats)
  assert jax.tree.all(jax.tree.map(np.array_equal, pc, plain))  # keeping grids changes nothing
  assert len(grids) == 7 * CFG128.num_layers
  qconfig = ct.export(str(tmp_path / "ct"), CFG128, params, spec, compressed_params=pc,
                      grids=grids)
  (group,) = qconfig["config_groups"].values()
  assert group["format"] == "pack-quantized" and group["weights"]["group_size"] == 128
  assert group["weights"].get("actorder") == ("weight" if act_order else None)
  want = np.asarray(Llama(CFG128).apply({"params": pc}, jnp.asarray(tokens)))
  assert np.abs(want - np.asarray(Llama(CFG128).apply({"params": params}, jnp.asarray(tokens)))
                ).max() > 1e-2  # the quantization is visible
  if sym:
    got = _hf_logits(str(tmp_path / "ct"), tokens)
  else:
    convert.export_hf(params, CFG128, str(tmp_path / "dense"))  # float: every module replaced
    got, weights = _hf_logits_decompressed(tmp_path / "ct", str(tmp_path / "dense"), tokens)
    comp = Component(1, "down")
    np.testing.assert_array_equal(weights[comp.hf_name[:-len(".weight")]].numpy(),
                                  np.asarray(get_path(pc, comp.param_path)[1]).T)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_gptq_8bit_sequential_export_and_refusals(gptq_setup, tokens, tmp_path):
  """gptq(8) per channel and g128 through calibrate_and_compress, pack-quantized 8-bit,
  loaded by transformers; dynamic act-order groups and missing grids are refused."""
  params, _ = gptq_setup
  spec = "attn@*:gptq(8,sym=True); mlp@*:gptq(8,128,act_order=True,sym=True)"
  windows = np.random.default_rng(1).integers(0, CFG128.vocab_size, (8, 32))
  grids = {}
  pc, _ = calibration.calibrate_and_compress(CFG128, params, spec, windows, batch_size=4,
                                             grids=grids)
  assert grids[Component(0, "q")].scale.shape == (CFG128.hidden_size, 1)
  qconfig = ct.export(str(tmp_path), CFG128, params, spec, compressed_params=pc, grids=grids)
  assert {g["format"] for g in qconfig["config_groups"].values()} == {"pack-quantized"}
  np.testing.assert_allclose(_hf_logits(str(tmp_path), tokens),
                             np.asarray(Llama(CFG128).apply({"params": pc}, jnp.asarray(tokens))),
                             rtol=0, atol=1e-5)
  with pytest.raises(DtmError, match="no GPTQ grid for L00.q"):
    ct.export(str(tmp_path / "never"), CFG128, params, spec, compressed_params=pc,
              grids={c: g for c, g in grids.items() if c != Component(0, "q")})
  with pytest.raises(DtmError, match="static_groups=True"):
    ct.export(str(tmp_path / "never"), CFG128, params,
              "q@0:gptq(4,128,act_order=True,static_groups=False)", compressed_params=pc,
              grids=grids)
  bad = grids[Component(0, "up")]
  down = grids[Component(0, "down")]  # [128, 256]: two groups
  with pytest.raises(DtmError, match="grid of L00.down has shapes"):  # another method's grid
    ct.export(str(tmp_path / "never"), CFG128, params, spec, compressed_params=pc,
              grids={**grids, Component(0, "down"): down._replace(scale=down.scale[:, :1])})
  assert not (tmp_path / "never").exists()
  with pytest.raises(DtmError, match="reproduce"):  # a grid that is not the weights'
    ct.export(str(tmp_path / "bad"), CFG128, params, spec, compressed_params=pc,
              grids={**grids, Component(0, "up"): bad._replace(scale=bad.scale * 2)})
  assert not (tmp_path / "bad" / "config.json").exists()
  assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_convert_job_exports_gptq(tmp_path, tokens):
  """configs/convert.py with a gptq spec and export_format=compressed-tensors: the job keeps
  the grids of its (sequential) calibration and writes pack-quantized tensors that
  transformers loads with the logits of the job's own compressed model."""
  from configs import convert as convert_config
  from dtm import checkpoint, convert, data
  from dtm.jobs import convert as convert_job
  model_dir = str(tmp_path / "model")
  convert.export_hf(init_params(CFG, seed=3), CFG, model_dir)
  c = convert_config.get_config("runlocal")
  c.model, c.compression, c.export_hf = model_dir, "q,down@0:gptq(4,32,sym=True)", True
  c.export_format = "compressed-tensors"
  c.calibration.jsonl = str(tmp_path / "calib.jsonl")
  data.write_prompt_jsonl(c.calibration.jsonl, np.random.default_rng(2).integers(
      0, CFG.vocab_size, (c.calibration.samples, c.calibration.length)))
  convert_job.run(c, str(tmp_path / "out"))
  qconfig = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())["quantization_config"]
  (group,) = qconfig["config_groups"].values()
  assert sorted(group["targets"]) == ["model.layers.0.mlp.down_proj",
                                      "model.layers.0.self_attn.q_proj"]
  saved = checkpoint.restore_params(str(tmp_path / "out"), CFG)  # the job's orbax model
  want = _dtm_logits(saved, tokens)
  assert np.abs(want - _dtm_logits(init_params(CFG, seed=3), tokens)).max() > 1e-3
  np.testing.assert_allclose(_hf_logits(str(tmp_path / "out" / "hf"), tokens), want,
                             rtol=0, atol=1e-5)
