"""The evaluate job and its teacher-forced DTM pass on SmolLM2-135M (real weights, WikiText-2).

One prompt set for the whole module: P=16 WikiText-2 (raw, test) prompts of c=32 tokens,
N=32 reference tokens, batch 16, so every jitted function compiles once per shape.

  * identity: F' = F gives FDT = N, SDT = 0, DPPL = F's own perplexity on y;
  * teacher forcing is exact: FDT from one teacher-forced pass equals the FDT of free
    greedy decoding with F', prompt by prompt, for mild to strong compressions;
  * an independent PyTorch computation (HF LlamaForCausalLM from the same GGUF, the
    compression re-implemented in numpy) agrees on references, FDT and DPPL;
  * the job end to end: JSONL prompts, results.json contents, cached references.
"""
import functools
import json
import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_or_skip
from configs import evaluate as evaluate_config
from dtm import compress, data, evaluation
from dtm.generate import greedy_generate
from dtm.jobs import common
from dtm.jobs import evaluate as evaluate_job
from dtm.model import Llama

P, C, N, BATCH = 16, 32, 32, 16

# Mild to strong (mean FDT on these prompts roughly 17, 7.5 and 1 of 32).
SPECS = ("*@*:absmax(bits=8,granularity=channel)", "down@*:magnitude(0.2)",
         "*@*:absmax(bits=4,granularity=channel)")


def _config(data_files: str, **prompt_overrides):
  """configs/evaluate.py:runlocal with the module's prompt shape and WikiText-2 data."""
  config = evaluate_config.get_config("runlocal")
  config.data.source = "text"
  config.data.data_files = data_files
  config.prompts.num = P
  config.prompts.length = C
  config.prompts.new_tokens = N
  config.prompts.batch_size = BATCH
  for key, value in prompt_overrides.items():
    config.prompts[key] = value
  return config


@pytest.fixture(scope="module")
def use_loaded_model(smollm2):
  """Make the job reuse the session's SmolLM2 instead of loading it again."""
  mp = pytest.MonkeyPatch()
  mp.setattr(common, "load", lambda config, shardings_fn=None: smollm2)
  yield smollm2
  mp.undo()


@pytest.fixture(scope="module")
def identity_run(use_loaded_model, wikitext_path, tmp_path_factory):
  """The evaluate job with no compression on WikiText-2 prompts: (results, workdir)."""
  workdir = str(tmp_path_factory.mktemp("identity"))
  results = evaluate_job.run(_config(wikitext_path), workdir)
  return results, workdir


@pytest.fixture(scope="module")
def prompts_and_refs(identity_run):
  """(prompts [P, c], y [P, N]) as written by the identity run."""
  _, workdir = identity_run
  prompts = data.read_prompt_jsonl(os.path.join(workdir, "prompts.jsonl"))
  y = data.read_prompt_jsonl(os.path.join(workdir, "references.jsonl"))
  return prompts, y


@pytest.fixture(scope="module")
def compressed(smollm2):
  """spec -> (params', report), computed once per spec."""
  cache = {}

  def get(spec):
    if spec not in cache:
      cache[spec] = compress.apply_spec(smollm2.params, spec)
    return cache[spec]
  return get


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward_jit(cfg, params, seq_BS):
  return Llama(cfg).apply({"params": params}, seq_BS)


def _forward(cfg, params, seq_BS: np.ndarray) -> np.ndarray:
  """Logits of an ordinary full forward pass on s (no cache, no head slicing): [B, c+N, V]."""
  return np.asarray(_forward_jit(cfg, params, jnp.asarray(seq_BS)))


def _log_softmax64(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _fdt_from_tokens(pred_PN: np.ndarray, y_PN: np.ndarray) -> np.ndarray:
  """FDT by a plain loop: first j with pred_j != y_j, else N."""
  out = []
  for pred, ref in zip(pred_PN, y_PN):
    diff = np.nonzero(pred != ref)[0]
    out.append(int(diff[0]) if diff.size else len(ref))
  return np.asarray(out)


# ------------------------------------------------------------------------------- identity


def test_identity_full_fdt_zero_sdt_and_dppl_is_own_ppl(smollm2, identity_run, prompts_and_refs):
  results, _ = identity_run
  prompts, y = prompts_and_refs
  assert prompts.shape == (P, C) and y.shape == (P, N)
  pp = results["per_prompt"]
  assert pp["fdt"] == [N] * P
  assert pp["sdt"] == [0.0] * P
  agg = results["aggregate"]
  assert agg["fdt_alpha_0.75"] == N and agg["fdt_alpha_0.9"] == N and agg["sdt_mean"] == 0
  assert agg["kl_mean"] < 1e-6 and agg["top1_agree"] == 1.0
  # F's own perplexity on its continuations, from an ordinary full forward pass on s.
  seq = np.concatenate([prompts, y], axis=1)
  logp = _log_softmax64(_forward(smollm2.cfg, smollm2.params, seq)[:, C - 1:C + N - 1])
  nll = -np.take_along_axis(logp, y[..., None].astype(np.int64), axis=-1)[..., 0]
  own_ppl = float(np.exp(nll.mean()))
  assert agg["dppl"] == pytest.approx(own_ppl, rel=1e-5)
  np.testing.assert_allclose(np.asarray(pp["nll"]), nll, atol=2e-5)
  assert results["ppl"]["base"]["ppl"] == results["ppl"]["compressed"]["ppl"]
  assert results["compression"] == "none" and results["components"] == {}


def test_wikitext_prompts_and_ppl_settings(smollm2, identity_run, prompts_and_refs, wikitext_path):
  """Prompts come from the real WikiText-2 raw test split (data.source='text')."""
  results, _ = identity_run
  prompts, _ = prompts_and_refs
  s = results["settings"]
  assert s["prompt_source"] == "text" and s["num_prompts"] == P and s["prompt_length"] == C
  assert s["new_tokens"] == N and s["ppl"]["data_files"] == wikitext_path
  assert len(set(map(tuple, prompts.tolist()))) == P  # distinct windows
  with open(wikitext_path, encoding="utf-8") as f:
    raw = " ".join(f.read().split())
  for row in prompts[:4]:
    text = " ".join(smollm2.tokenizer.decode(row).split())
    # drop the first and last word: window edges may cut a word in the middle
    inner = " ".join(text.split(" ")[1:-1])
    assert inner and inner in raw, text
  ppl = results["ppl"]["base"]
  assert ppl["tokens"] == s["ppl"]["num_windows"] * (s["ppl"]["window"] - s["ppl"]["ctx"])
  assert 3.0 < ppl["ppl"] < 200.0


# ---------------------------------------------------------------------- teacher forcing


@pytest.mark.parametrize("spec", SPECS)
def test_teacher_forced_fdt_equals_free_running_fdt(smollm2, prompts_and_refs, compressed, spec):
  prompts, y = prompts_and_refs
  cfg = smollm2.cfg
  params_c, _ = compressed(spec)
  seq = np.concatenate([prompts, y], axis=1)
  stats = evaluation.divergence(cfg, params_c, seq, C, BATCH)
  # free greedy decoding with F', compared token by token with y
  y_free = np.asarray(greedy_generate(cfg, params_c, jnp.asarray(prompts), N))
  fdt_free = _fdt_from_tokens(y_free, y)
  np.testing.assert_array_equal(stats["fdt"], fdt_free)
  assert stats["fdt"].min() < N  # the compression does change something
  # brute force SDT / FDT from the argmax of a full forward pass on s
  pred = _forward(cfg, params_c, seq)[:, C - 1:C + N - 1].argmax(-1)
  np.testing.assert_array_equal(stats["sdt"], (pred != y).mean(-1).astype(np.float32))
  np.testing.assert_array_equal(stats["fdt"], _fdt_from_tokens(pred, y))


# -------------------------------------------------------------- independent PyTorch oracle


def _np_magnitude(w_OI: np.ndarray, rate: float) -> np.ndarray:
  """Zero the floor(rate * numel) smallest |w|; ties: lower flat [out, in] index first."""
  k = math.floor(rate * w_OI.size * (1 + 1e-12))
  order = np.argsort(np.abs(w_OI).reshape(-1), kind="stable")
  out = w_OI.copy().reshape(-1)
  out[order[:k]] = 0.0
  return out.reshape(w_OI.shape)


def _np_absmax_channel(w_OI: np.ndarray, bits: int) -> np.ndarray:
  """Per-output-row symmetric AbsMax fake quantization (round half to even), float32."""
  qmax = np.float32(2 ** (bits - 1) - 1)
  scale = np.abs(w_OI).max(axis=1, keepdims=True).astype(np.float32) / qmax
  q = np.clip(np.round(w_OI / np.where(scale == 0, 1, scale)), -qmax, qmax)
  return (q * scale).astype(np.float32)


HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}

# spec -> (kinds, per-matrix numpy compression)
TORCH_CASES = {
    "down@*:magnitude(0.2)": (("down",), lambda w: _np_magnitude(w, 0.2)),
    "*@*:absmax(bits=8,granularity=channel)": (tuple(HF_MODULES),
                                               lambda w: _np_absmax_channel(w, 8)),
}


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
  torch = torch_or_skip()
  from transformers import LlamaForCausalLM
  threads = torch.get_num_threads()
  # One thread: on a busy 2-core machine torch's OpenMP barriers make 2 threads 3-6x slower
  # (HF decoding 16 x 32 tokens: ~9 s with one thread, 33-59 s with two at load average 5).
  torch.set_num_threads(1)
  model = LlamaForCausalLM.from_pretrained(os.path.dirname(smollm2_gguf),
                                           gguf_file=os.path.basename(smollm2_gguf),
                                           dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None  # exactly N tokens, no stop at EOS
  model.generation_config.pad_token_id = 0
  yield model
  torch.set_num_threads(threads)


def _torch_stats(hf, seq: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
  """FDT, SDT, NLL of the HF model teacher-forced on s = p ⊕ y (float64 log-softmax)."""
  import torch
  with torch.no_grad():
    logits = hf(torch.as_tensor(seq[:, :-1], dtype=torch.long), logits_to_keep=N).logits
  logits = logits.float().numpy()
  pred = logits.argmax(-1)
  logp = _log_softmax64(logits)
  nll = -np.take_along_axis(logp, y[..., None].astype(np.int64), axis=-1)[..., 0]
  return {"fdt": _fdt_from_tokens(pred, y), "sdt": (pred != y).mean(-1), "nll": nll}


def _assert_weights_match(ours: np.ndarray, theirs: np.ndarray) -> None:
  """Equal up to float32 rounding, except on rare exact rounding ties of AbsMax.

  XLA on CPU turns `w / scale` (scale broadcast per row) into `w * (1 / scale)`, which is
  not IEEE division: where w / scale lies within an ulp of k + 1/2, dtm and numpy round to
  neighbouring levels (about 15 of 331,776 weights of one q_proj at 8 bits). Such a weight
  differs by exactly one quantization step; everything else agrees to float32 precision.
  """
  close = np.isclose(ours, theirs, rtol=1e-6, atol=1e-8)
  assert np.mean(~close) < 1e-4, f"{np.sum(~close)} of {ours.size} weights differ"
  step = np.abs(theirs).max(axis=1, keepdims=True) / 127.0  # 8-bit channel scale
  one_step = np.isclose(np.abs(ours - theirs), np.broadcast_to(step, ours.shape), rtol=1e-4)
  assert np.all(close | one_step)


def _set_weights(hf, kinds, fn, originals) -> None:
  """Replace every layer's weights of `kinds` by fn(original HF [out, in] weight)."""
  import torch
  for l, layer in enumerate(hf.model.layers):
    for kind in kinds:
      lin = layer.get_submodule(HF_MODULES[kind])
      key = (l, kind)
      originals.setdefault(key, lin.weight.detach().clone())
      new = fn(originals[key].numpy()) if fn is not None else originals[key].numpy()
      with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(new)))


def test_hf_greedy_references_match(hf_model, prompts_and_refs):
  import torch
  prompts, y = prompts_and_refs
  with torch.no_grad():
    out = hf_model.generate(torch.as_tensor(prompts, dtype=torch.long),
                            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                            do_sample=False, max_new_tokens=N)
  y_hf = out[:, C:].numpy()
  assert y_hf.shape == (P, N)
  assert np.mean(np.all(y_hf == y, axis=1)) >= 0.95


@pytest.mark.parametrize("spec", [None, *TORCH_CASES])
def test_torch_independent_metrics(smollm2, hf_model, prompts_and_refs, compressed, spec):
  prompts, y = prompts_and_refs
  seq = np.concatenate([prompts, y], axis=1)
  originals = {}
  if spec is None:
    params_c = smollm2.params
  else:
    kinds, fn = TORCH_CASES[spec]
    params_c, _ = compressed(spec)
    _set_weights(hf_model, kinds, fn, originals)
    # the independent compression gives the same weights as dtm's (HF layout = kernel.T)
    for l in (0, 17, 29):
      for kind in kinds:
        ours = np.asarray(params_c["layers"][compress.kernel_path(kind)[1]][kind]["kernel"][l]).T
        theirs = hf_model.model.layers[l].get_submodule(HF_MODULES[kind]).weight.detach().numpy()
        np.testing.assert_array_equal(ours == 0, theirs == 0)
        _assert_weights_match(ours, theirs)
  try:
    ref = _torch_stats(hf_model, seq, y)
  finally:
    if originals:
      _set_weights(hf_model, {k for _, k in originals}, None, originals)
  ours = evaluation.divergence(smollm2.cfg, params_c, seq, C, BATCH)
  assert np.mean(ours["fdt"] == ref["fdt"]) >= 0.95, (ours["fdt"], ref["fdt"])
  assert np.mean(np.abs(ours["sdt"] - ref["sdt"])) <= 0.02
  dppl_ours = float(np.exp(np.mean(ours["nll"].astype(np.float64))))
  dppl_torch = float(np.exp(np.mean(ref["nll"])))
  assert dppl_ours == pytest.approx(dppl_torch, rel=1e-3)
  if spec is None:
    assert list(ref["fdt"]) == [N] * P


# ---------------------------------------------------------------------- end to end job


E2E_SPEC = "down@0-9:magnitude(0.2); q@0:nm(2,4)"
E2E_DOWN_LAYERS = range(10)


def test_job_end_to_end_jsonl_and_cached_references(
    smollm2, use_loaded_model, prompts_and_refs, wikitext_path, tmp_path, monkeypatch, caplog):
  prompts, y = prompts_and_refs
  jsonl = tmp_path / "in.jsonl"
  jsonl.write_text("".join(json.dumps({"ids": [int(t) for t in row]}) + "\n" for row in prompts))
  config = _config(wikitext_path, jsonl=str(jsonl))
  config.compression = E2E_SPEC
  workdir = str(tmp_path / "run")
  first = evaluate_job.run(config, workdir)

  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  assert res["compression"] == compress.parse_spec(E2E_SPEC).to_string()
  assert res["settings"]["prompt_source"].startswith("jsonl:")
  assert res["settings"]["num_prompts"] == P and res["settings"]["new_tokens"] == N
  pp = res["per_prompt"]
  assert len(pp["fdt"]) == P and len(pp["sdt"]) == P and np.shape(pp["nll"]) == (P, N)
  agg = res["aggregate"]
  for key in ("fdt_alpha_0.75", "fdt_alpha_0.9", "dppl", "kl_mean", "top1_agree"):
    assert math.isfinite(agg[key]), key
  nll = np.asarray(pp["nll"], np.float64)
  assert agg["dppl"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-5)
  fdt_desc = np.sort(pp["fdt"])[::-1]
  assert agg["fdt_alpha_0.75"] == fdt_desc[math.ceil(0.75 * P) - 1]
  assert agg["fdt_alpha_0.9"] == fdt_desc[math.ceil(0.9 * P) - 1]
  assert 0 < agg["top1_agree"] < 1 and agg["kl_mean"] > 0
  assert set(res["ppl"]) == {"base", "compressed"}
  assert res["ppl"]["compressed"]["ppl"] > res["ppl"]["base"]["ppl"] > 1

  # written prompts / references, in {"ids": [...]} form; y is the identity run's y
  for name, want in (("prompts.jsonl", prompts), ("references.jsonl", y)):
    with open(os.path.join(workdir, name)) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    assert all(set(r) == {"ids"} for r in rows)
    np.testing.assert_array_equal(np.asarray([r["ids"] for r in rows]), want)

  # achieved sparsity per component matches the spec
  comps = res["components"]
  assert set(comps) == {f"L{l:02d}.down" for l in E2E_DOWN_LAYERS} | {"L00.q"}
  down = smollm2.params["layers"]["mlp"]["down"]["kernel"]
  numel = down[0].size
  k = math.floor(0.2 * numel)
  for l in E2E_DOWN_LAYERS:
    zeros = int(np.sum(np.asarray(down[l]) == 0))
    c = comps[f"L{l:02d}.down"]
    assert c["method"] == "magnitude(rate=0.2)" and c["bits"] == 32
    assert c["sparsity"] == pytest.approx(max(k, zeros) / numel, abs=1e-7)
  assert comps["L00.q"]["method"] == "nm(n=2,m=4)"
  assert comps["L00.q"]["sparsity"] == pytest.approx(0.5, abs=1e-3)

  # second run: references come from the cache, results are identical
  caches = [f for f in os.listdir(os.path.join(workdir, "cache")) if re.match(r"references-.*\.npy", f)]
  assert len(caches) == 1
  cache_path = os.path.join(workdir, "cache", caches[0])
  mtime = os.stat(cache_path).st_mtime_ns

  def no_generation(*args, **kwargs):
    raise AssertionError("references were regenerated instead of read from the cache")
  monkeypatch.setattr(evaluation, "generate_references", no_generation)
  caplog.set_level(logging.INFO, logger="dtm")
  second = evaluate_job.run(config, workdir)
  assert "reusing cached reference continuations" in caplog.text
  assert os.stat(cache_path).st_mtime_ns == mtime
  assert second["per_prompt"] == first["per_prompt"]
  assert second["aggregate"] == first["aggregate"]
