"""Calibrated compression in the jobs: the gptq / rtn grammar, config.calibration's windows
(dtm.jobs.common), the evaluate job with wanda / sparsegpt / gptq, and the probe sweep with
calibrated methods, all on the tiny random Llama (tests/tiny_model.py).

  * grammar: gptq(...) / rtn(...) round-trip through Spec.to_string(), bad arguments and
    shapes are one-line DtmErrors; spec results equal the pure gptq.gptq / gptq.rtn;
  * windows: JSONL and corpus sources, and every bad-input error the brief names;
  * evaluate job (its run(); main.py for the one-line error): results.json holds the
    calibration settings, and its metrics equal the library path (collect_statistics /
    calibrate_and_compress + HeldOut) on the same windows;
  * probes: every calibrated family's probe equals evaluating the same single-component
    spec with the same (original-model) statistics.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_model
from conftest import REPO
from configs import evaluate as evaluate_config
from configs import probe as probe_config
from dtm import compress, data, evaluation, metrics, probe
from dtm.components import Component, get_path, kernel_path
from dtm.compress import calibration as cal
from dtm.compress import gptq as gptq_lib
from dtm.errors import DtmError
from dtm.jobs import common
from dtm.jobs import evaluate as evaluate_job
from dtm.jobs import probe as probe_job
from dtm.loading import load_model
from dtm.train import masks

CFG = tiny_model.TINY
P, C, N = 4, 16, 8          # evaluate prompts
CAL_N, CAL_T = 4, 32        # calibration windows (configs/evaluate.py:runlocal)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_cal")
  tiny_model.write_tiny_model(str(root / "model"))
  tiny_model.write_prompts(str(root / "prompts.jsonl"), num=P, length=C)
  tiny_model.write_prompts(str(root / "cal.jsonl"), num=CAL_N, length=CAL_T, seed=1)
  model = load_model(str(root / "model"))
  return {"root": root, "model": str(root / "model"), "prompts": str(root / "prompts.jsonl"),
          "cal": str(root / "cal.jsonl"), "loaded": model}


@pytest.fixture(scope="module")
def stats(tiny):
  """Parallel statistics (with Hessians) of the original tiny model on the windows."""
  windows = data.read_prompt_jsonl(tiny["cal"])
  return cal.collect_statistics(CFG, tiny["loaded"].params, windows, batch_size=CAL_N)


# ----------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("text", [
    "q@*:gptq(4)", "q,down@0-2:gptq(3,group_size=16,act_order=true)",
    "mlp@1:gptq(bits=8,sym=True,damp=0.1,block_size=32,static_groups=False,act_order=1)",
    "*@*:rtn(4)", "k@0:rtn(2, 32, sym=yes)"])
def test_gptq_rtn_round_trip(text):
  spec = compress.parse_spec(text)
  assert compress.parse_spec(spec.to_string()) == spec
  assert compress.parse_spec(spec.to_string()).to_string() == spec.to_string()


def test_gptq_static_groups_default_is_act_order():
  a = compress.parse_method("gptq(4,act_order=True)")
  assert a == compress.parse_method("gptq(4,act_order=True,static_groups=True)")
  assert a.kwargs["static_groups"] is True
  assert compress.parse_method("gptq(4)").kwargs["static_groups"] is False


@pytest.mark.parametrize("text, message", [
    ("q@*:gptq(9)", "gptq bits must be in 2..8, got 9"),
    ("q@*:gptq(1)", "gptq bits must be in 2..8, got 1"),
    ("q@*:rtn(16)", "rtn bits must be in 2..8, got 16"),
    ("q@*:rtn(4,group_size=0)", "rtn group_size must be >= 1"),
    ("q@*:gptq(4,group_size=-2)", "gptq group_size must be >= 1"),
    ("q@*:gptq(4,damp=-0.1)", "gptq damp"),
    ("q@*:gptq(4,block_size=0)", "gptq block_size must be >= 1"),
    ("q@*:gptq(4,act_order=perhaps)", "bad value 'perhaps' for argument 'act_order'"),
    ("q@*:rtn(4,percdamp=0.1)", "unknown argument 'percdamp'"),
    ("q@*:gptq()", "missing argument 'bits'"),
])
def test_gptq_rtn_argument_errors(text, message):
  with pytest.raises(DtmError, match=message.replace("(", r"\(").replace(")", r"\)")):
    compress.parse_spec(text)


def test_gptq_rtn_shape_and_calibration_errors(tiny):
  params = tiny["loaded"].params
  with pytest.raises(DtmError, match=r"gptq group_size 48 does not divide the input dimension "
                                     r"of L00.q \(HF weight \[out=64, in=64\]\)"):
    compress.apply_spec(params, "q@*:gptq(4,group_size=48)")
  with pytest.raises(DtmError, match="rtn group_size 96 does not divide .* L00.down"):
    compress.apply_spec(params, "down@0:rtn(4,group_size=96)")
  with pytest.raises(DtmError, match=r"gptq \(L00.q, ...\) needs calibration statistics"):
    compress.apply_spec(params, "q@*:gptq(4,act_order=True)")
  with pytest.raises(DtmError, match="needs calibration statistics of the weight's input"):
    compress.compress(jnp.ones((4, 8)), compress.parse_method("gptq(4,act_order=True)"))
  # the trainer's fake quantization goes through compress: a clear error, not a KeyError
  plan = masks.make_plan("q@0:gptq(4)", params)
  with pytest.raises(DtmError, match="needs calibration statistics"):
    masks.quantize(plan, params, ste=True)


def test_rtn_spec_and_fake_quantization(tiny):
  """rtn through apply_spec equals gptq.rtn per layer (up to one float32 ulp: the layer
  vmap fuses scale * (code - zero) differently, as for absmax); the trainer's STE fake
  quantization forwards the same values and passes the gradient straight through."""
  params = tiny["loaded"].params
  spec = "q,down@*:rtn(3,group_size=16,sym=True)"
  new, report = compress.apply_spec(params, spec)
  for kind in ("q", "down"):
    kernel = get_path(params, kernel_path(kind))
    for layer in range(CFG.num_layers):
      ref = gptq_lib.rtn(kernel[layer].T, 3, 16, sym=True).w.T
      np.testing.assert_allclose(get_path(new, kernel_path(kind))[layer], ref, rtol=0,
                                 atol=1e-7)
  assert report["L01.down"]["bits"] == 3 and report["L01.down"]["method"] == (
      "rtn(bits=3,group_size=16,sym=True)")
  plan = masks.make_plan(spec, params)
  assert [m.name for _, m, _ in plan.quantized] == ["rtn", "rtn"] and not plan.pruned
  fake = masks.quantize(plan, params, ste=True)
  np.testing.assert_array_equal(get_path(fake, kernel_path("q")), get_path(new, kernel_path("q")))
  grad = jax.grad(lambda p: jnp.sum(get_path(masks.quantize(plan, p, ste=True),
                                             kernel_path("q"))))(params)
  np.testing.assert_array_equal(get_path(grad, kernel_path("q")), 1.0)


def test_gptq_spec_equals_gptq_function(tiny, stats):
  """Groups, act order (so static groups) and a symmetric grid, bit for bit."""
  method = "gptq(3,group_size=16,act_order=True,sym=True)"
  params = tiny["loaded"].params
  new, report = compress.apply_spec(params, f"q,down@0,2:{method}", calibration=stats)
  m = compress.parse_method(method)
  for comp in (Component(0, "q"), Component(2, "down")):
    kernel = get_path(params, kernel_path(comp.kind))[comp.layer]
    ref = gptq_lib.gptq(kernel.T, stats[comp].hessian, **m.kwargs).w.T
    np.testing.assert_array_equal(get_path(new, kernel_path(comp.kind))[comp.layer], ref)
    assert report[comp.name] == {"method": m.to_string(), "sparsity": report[comp.name]["sparsity"],
                                 "bits": m.kwargs["bits"], "damp": 0.01}
  assert "L01.q" not in report


def test_gptq_unfactorable_hessian_names_component(tiny, stats):
  bad = dict(stats)
  st = stats[Component(1, "o")]
  bad[Component(1, "o")] = cal.InputStats(st.sq_norms, jnp.full_like(st.hessian, jnp.nan),
                                          st.tokens, st.windows)
  with pytest.raises(DtmError, match=r"gptq: the input Hessian of L01.o is not positive "
                                     r"definite even after dampening .*1\b.*rtn instead"):
    compress.apply_spec(tiny["loaded"].params, "o@1:gptq(4)", calibration=bad)


# ----------------------------------------------------------------------------- windows


class ByteTokenizer:
  """UTF-8 bytes as token ids (a vocabulary of 256: the tiny model's)."""
  bos_token_id = 1
  add_bos_token = True

  def __call__(self, texts, add_special_tokens=False):
    if isinstance(texts, str):
      return {"input_ids": list(texts.encode())}
    return {"input_ids": [list(t.encode()) for t in texts]}


def _cal_config(**overrides):
  config = evaluate_config.get_config("runlocal")
  for key, value in overrides.items():
    config.calibration[key] = value
  return config


def test_windows_from_a_corpus(tmp_path):
  text = tmp_path / "corpus.txt"
  lines = [f"line {i}: some calibration text for the byte tokenizer" for i in range(20)]
  text.write_text("\n".join(lines) + "\n")
  model = types.SimpleNamespace(cfg=CFG, tokenizer=ByteTokenizer())
  config = _cal_config(source="text", data_files=str(text), seed=3)
  windows, settings = common.calibration_data(config, model)
  stream = data.tokenize_corpus(ByteTokenizer(), lines, add_bos=False)
  np.testing.assert_array_equal(windows, data.prompt_windows(stream, num=4, length=32, seed=3,
                                                             bos_id=1))
  assert settings == {"source": "text", "data_files": str(text), "split": "train",
                      "text_field": "text", "max_docs": 0, "stream_tokens": int(stream.size),
                      "seed": 3, "bos_id": 1, "samples": 4, "length": 32,
                      "mode": "sequential", "batch_size": 4,
                      "tokens": settings["tokens"]}
  assert len(settings["tokens"]) == 16
  # too few tokens: says how many there are; never fewer windows
  config = _cal_config(source="text", data_files=str(text), samples=64, batch_size=4)
  with pytest.raises(DtmError, match=rf"64 windows of 32 tokens need {64 * 31} stream tokens, "
                                     rf"the corpus has {stream.size}"):
    common.calibration_data(config, model)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n")
  with pytest.raises(DtmError, match="no calibration tokens in calibration.source='text'"):
    common.calibration_data(_cal_config(source="text", data_files=str(empty)), model)


def test_window_errors(tiny, tmp_path):
  model = tiny["loaded"]
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  short = tmp_path / "short.jsonl"
  tiny_model.write_prompts(str(short), num=2, length=CAL_T)
  ragged = tmp_path / "ragged.jsonl"
  ragged.write_text('{"ids": [1, 2, 3]}\n' * 4)
  cases = [
      (dict(jsonl=str(empty)), "holds no rows"),
      (dict(jsonl=str(short)), r"has 2 rows of 32 tokens, 4 are needed"),
      (dict(jsonl=str(ragged)), r"ragged.jsonl:1: row has 3 ids but calibration.length is 32"),
      (dict(jsonl=tiny["cal"], length=CFG.max_position_embeddings + 1),
       r"calibration.length=129 exceeds the model's context of 128 tokens"),
      (dict(jsonl=tiny["cal"], batch_size=3), "batch_size=3 must divide calibration.samples=4"),
      (dict(jsonl=tiny["cal"], samples=0), "must be >= 1"),
      (dict(jsonl=tiny["cal"], mode="greedy"), "calibration.mode must be one of"),
      (dict(), "the model has no tokenizer to tokenize calibration.source"),
  ]
  for overrides, message in cases:
    with pytest.raises(DtmError, match=message):
      common.calibration_data(_cal_config(**overrides), model)


# ----------------------------------------------------------------------------- evaluate job


def _eval_config(tiny, spec: str, mode: str):
  config = evaluate_config.get_config("runlocal")
  config.model = tiny["model"]
  config.prompts.jsonl = tiny["prompts"]
  config.prompts.new_tokens = N
  config.calibration.jsonl = tiny["cal"]
  config.calibration.mode = mode
  config.compression = spec
  return config


@pytest.mark.parametrize("spec, mode", [
    ("q,down@*:wanda(0.5)", "sequential"),
    ("*@*:sparsegpt(2,4)", "parallel"),
    ("mlp@*:gptq(4,group_size=32); q@1:rtn(4)", "sequential"),
])
def test_evaluate_job_calibrated(tiny, tmp_path, spec, mode):
  """The job's metrics equal the library path on the same windows; results.json records
  the calibration settings and every component's report."""
  workdir = str(tmp_path / "eval")
  results = evaluate_job.run(_eval_config(tiny, spec, mode), workdir)
  on_disk = json.loads(open(os.path.join(workdir, "results.json")).read())
  windows = data.read_prompt_jsonl(tiny["cal"])
  assert on_disk["calibration"] == {
      "source": f"jsonl:{os.path.abspath(tiny['cal'])}", "samples": CAL_N, "length": CAL_T,
      "mode": mode, "batch_size": CAL_N, "tokens": __import__("dtm").io_utils.array_fingerprint(
          windows)}
  model = tiny["loaded"]
  if mode == "sequential":
    params_c, report = cal.calibrate_and_compress(CFG, model.params, spec, windows, batch_size=4)
  else:
    st = cal.collect_statistics(CFG, model.params, windows, batch_size=4)
    params_c, report = compress.apply_spec(model.params, spec, calibration=st)
  assert on_disk["components"] == json.loads(json.dumps(report))
  prompts = data.read_prompt_jsonl(os.path.join(workdir, "prompts.jsonl"))
  y = data.read_prompt_jsonl(os.path.join(workdir, "references.jsonl"))
  held = evaluation.HeldOut(CFG, model.params, prompts, y, batch_size=16, kl=False)
  per = held.per_prompt(params_c)
  assert on_disk["per_prompt"]["fdt"] == per["fdt"].tolist()
  assert on_disk["per_prompt"]["sdt"] == per["sdt"].tolist()
  np.testing.assert_allclose(on_disk["per_prompt"]["nll"], np.round(per["nll"], 6), atol=2e-6)
  assert results["aggregate"]["sdt_mean"] > 0, "the compression changed nothing; vacuous"


def test_main_py_one_line_error_before_any_work(tiny, tmp_path):
  """main.py: too few calibration rows is one line, non-zero exit, no results (the job
  checks the calibration input before the references and the compression)."""
  base = [sys.executable, "main.py", "--config=configs/evaluate.py:runlocal",
          f"--config.model={tiny['model']}", f"--config.prompts.jsonl={tiny['prompts']}",
          f"--config.prompts.new_tokens={N}", f"--config.calibration.jsonl={tiny['cal']}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  bad = subprocess.run(base + [f"--workdir={tmp_path / 'bad'}", "--config.calibration.samples=8",
                               "--config.compression=*@*:gptq(4,act_order=True)"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  last = bad.stderr.strip().splitlines()[-1]
  assert "not enough calibration data" in last and "has 4 rows of 32 tokens, 8 are needed" in last
  assert not (tmp_path / "bad" / "results.json").exists()
  assert not (tmp_path / "bad" / "references.jsonl").exists()


# ----------------------------------------------------------------------------- probes


PROBE_METHODS = (("q", ("wanda(0.5)", "wanda(0.9)")), ("down", ("wanda(2,4)",)),
                 ("o", ("sparsegpt(0.6)",)), ("k", ("gptq(3,group_size=16)", "gptq(2,group_size=16)")),
                 ("up", ("rtn(3)", "rtn(2)")))


def test_probe_calibrated_equals_evaluate_path(tiny, stats):
  """Every probe of every calibrated family (and rtn) gives the per-prompt FDT / SDT /
  top-1 of compressing the model with apply_spec and the same statistics, NLL within
  1e-5, on the layers before the last and the last."""
  model = tiny["loaded"]
  cfg, params = CFG, model.params
  prompts = data.read_prompt_jsonl(tiny["prompts"])
  y = evaluation.generate_references(cfg, params, prompts, N, P)
  seq = np.concatenate([prompts, y], axis=1)
  kinds = tuple(sorted({kind for kind, _ in PROBE_METHODS}))
  runner = probe.ProbeRunner(cfg, params, seq, C, probe.probe_mesh(), kinds=kinds,
                             statistics=stats)
  base = evaluation.base_reference(cfg, params, seq, C, P)
  failures, diverged, count = [], 0, 0
  for kind, texts in PROBE_METHODS:
    methods = [compress.parse_method(t) for t in texts]
    family = probe.split_method(methods[0])[0]
    shape = get_path(params, kernel_path(kind)).shape
    args = [probe.dynamic_arg(family, probe.split_method(m)[1], shape[1] * shape[2], shape[1])
            for m in methods]
    for layer in (0, CFG.num_layers - 1):
      comp = Component(layer, kind)
      out = runner.run(comp, family, args)
      for i, method in enumerate(methods):
        count += 1
        assert probe.family_method(family, probe.split_method(method)[1]) == method
        spec = f"{kind}@{layer}:{method.to_string()}"
        params_c, report = compress.apply_spec(params, spec, calibration=stats)
        ev = evaluation.divergence(cfg, params_c, seq, C, batch_size=P, base=base)
        diverged += int(np.sum(ev["fdt"] < N))
        checks = {
            "fdt": np.array_equal(out["fdt"][i], ev["fdt"]),
            "sdt": np.array_equal(out["sdt"][i], ev["sdt"]),
            "top1": np.array_equal(out["top1_agree"][i], ev["top1_agree"]),
            "nll": np.allclose(out["nll"][i], ev["nll"], rtol=1e-5, atol=1e-5),
            "sparsity": abs(float(out["sparsity"][i]) - report[comp.name]["sparsity"]) <= 1e-6,
        }
        bad = [k for k, good in checks.items() if not good]
        if bad:
          failures.append(f"{spec}: {bad} (probe fdt {out['fdt'][i]}, evaluate {ev['fdt']})")
  assert count == 16
  assert not failures, "\n".join(failures)
  assert diverged > count, "the probes barely change the model; the check is vacuous"


def test_probe_job_wanda_resumes_and_records_calibration(tiny, tmp_path):
  config = probe_config.get_config("runlocal")
  config.model = tiny["model"]
  config.prompts.jsonl = tiny["prompts"]
  config.prompts.length = C
  config.prompts.new_tokens = N
  config.calibration.jsonl = tiny["cal"]
  config.calibration.length = CAL_T
  config.probe.method = "wanda"
  config.probe.method_args = "m=4"
  config.probe.levels = (2, 1)
  config.probe.layers = "0,2"
  workdir = str(tmp_path / "probe")
  out = probe_job.run(config, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, "probes.jsonl"))]
  assert sorted(r["probe"] for r in records) == sorted(
      f"L0{l}.{k}:wanda(n={n},m=4)" for l in (0, 2) for k in ("q", "down") for n in (2, 1))
  assert all(r["sparsity"] == 1 - r["level"] / 4 for r in records)
  sweep = json.loads(open(os.path.join(workdir, "sweep.json")).read())
  text = json.dumps(sweep)
  assert "calibration" in text and os.path.abspath(tiny["cal"]) in text
  # n levels: fewer kept = more aggressive, so candidates take the smallest passing n
  levels = {r["component"]: [] for r in records}
  for r in records:
    if r["aggregate"][f"fdt_alpha_{config.probe.candidate_alpha:g}"] >= N / 2:
      levels[r["component"]].append(r["level"])
  assert out["candidates"] == {c: (min(v) if v else None) for c, v in levels.items()}
  again = probe_job.run(config, workdir)  # resumes: every probe done, same outputs
  assert again["rows"] == out["rows"]
  other = tmp_path / "other.jsonl"
  tiny_model.write_prompts(str(other), num=CAL_N, length=CAL_T, seed=7)
  config.calibration.jsonl = str(other)
  with pytest.raises(DtmError):
    probe_job.run(config, workdir)
  config.calibration.jsonl = tiny["cal"]
  config.calibration.mode = "sequential"
  with pytest.raises(DtmError, match="set calibration.mode=parallel"):
    probe_job.run(config, str(tmp_path / "seq"))
