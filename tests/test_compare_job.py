"""The compare job on a tiny random Llama with SmolLM2's tokenizer: prose and code domains,
greedy and sampled DTMs, resumable records, rank correlations; code prompts from the stdlib."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dtm import compress, convert, data, evaluation, gguf_io, report
from dtm.cli import run_job
from dtm.errors import DtmError
from dtm.jobs import compare
from dtm.loading import load_model
from dtm.model import init_params
from dtm.model_config import ModelConfig

TINY = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("tiny") / "model")
  tokenizer = gguf_io.gguf_tokenizer(gguf_io.find_smollm2_gguf())
  params = init_params(TINY, seed=2)
  params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 30.0}}
  convert.export_hf(params, TINY, directory, tokenizer=tokenizer)
  return directory


def make_config(model_dir: str, **overrides):
  from configs import compare as compare_config
  config = compare_config.get_config("runlocal")
  config.model = model_dir
  config.prompts.num = 6
  config.domains.code.max_docs = 20
  config.compressions = tuple(config.compressions) + ("down@1:wanda(0.5)",)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_compare_job_records_resume_and_correlations(tiny_dir, tmp_path):
  workdir = str(tmp_path / "cmp")
  config = make_config(tiny_dir)
  assert run_job(config, workdir) == 0
  res = json.load(open(os.path.join(workdir, "results.json")))
  specs = ["none"] + compare.parse_compressions(config.compressions)
  assert [(r["compression"], r["domain"]) for r in res["rows"]] == [
      (s, d) for s in specs for d in ("prose", "code")]
  base = [r for r in res["rows"] if r["compression"] == "none"]
  n = config.prompts.new_tokens
  for r in base:  # F' = F: nothing diverges, greedy or sampled
    assert r["fdt_mean"] == n and r["sampled_fdt_mean"] == n and r["sampled_sdt_mean"] == 0
  # the greedy DTMs of a row are the evaluate job's (HeldOut on the domain's prompts)
  m = load_model(tiny_dir)
  prompts = data.read_prompt_jsonl(os.path.join(workdir, "code", "prompts.jsonl"))
  y = data.read_prompt_jsonl(os.path.join(workdir, "code", "references.jsonl"))
  held = evaluation.HeldOut(m.cfg, m.params, prompts, y, batch_size=config.prompts.batch_size)
  spec = specs[1]
  agg = held.evaluate(compress.apply_spec(m.params, spec)[0])
  row = next(r for r in res["rows"] if r["compression"] == spec and r["domain"] == "code")
  assert row["fdt_mean"] == agg["fdt_mean"] and row["sdt_mean"] == pytest.approx(agg["sdt_mean"])
  assert set(res["rank_correlations"]["prose"]) >= {"fdt_mean", "dppl", "sampled_fdt_mean"}
  assert "fdt_mean" in res["cross_domain"]
  assert json.load(open(os.path.join(workdir, "sweep.json")))["identity"]["calibration"]["samples"] == 4
  # rerun: nothing recomputed; add a spec: only it is evaluated
  lines = open(os.path.join(workdir, "probes.jsonl")).read().splitlines()
  assert len(lines) == 2 * len(specs)
  config2 = make_config(tiny_dir, compressions=tuple(config.compressions) + ("k@1:magnitude(0.7)",))
  assert run_job(config2, workdir) == 0
  lines2 = open(os.path.join(workdir, "probes.jsonl")).read().splitlines()
  assert lines2[:len(lines)] == lines and len(lines2) == len(lines) + 2
  # other sampling settings: refused with the differing field named
  config3 = make_config(tiny_dir, **{"sampling.temperature": 0.5})
  with pytest.raises(DtmError, match="sampling"):
    compare.run(config3, workdir)


def test_task_accuracy_joins_the_table(tiny_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  config = make_config(tiny_dir, compressions=("mlp@*:magnitude(0.5)",), domain_names="prose",
                       **{"sampling.enabled": False, "tasks.names": "piqa", "tasks.limit": 6,
                          "tasks.batch_size": 4})
  workdir = str(tmp_path / "tasks")
  assert run_job(config, workdir) == 0
  res = json.load(open(os.path.join(workdir, "results.json")))
  assert [r["compression"] for r in res["rows"]] == ["none", "gate,up,down@*:magnitude(rate=0.5)"]
  for r in res["rows"]:
    assert 0 <= r["acc_piqa"] <= 1 and r["task_acc_mean"] == r["acc_piqa"]
  # the accuracy is lm-eval's through the dtm adapter on the same documents
  from lm_eval import simple_evaluate
  from dtm.tasks import offline
  from dtm.tasks.lm_eval_model import DtmLM
  tm = offline.task_manager()
  tasks, _ = offline.task_configs(["piqa"], "local", tm)
  m = load_model(tiny_dir)
  params = compress.apply_spec(m.params, "mlp@*:magnitude(0.5)")[0]
  out = simple_evaluate(model=DtmLM(loaded=m, params=params, batch_size=4), tasks=tasks, limit=6,
                        task_manager=tm, bootstrap_iters=0, log_samples=False)
  assert res["rows"][1]["acc_piqa"] == out["results"]["piqa"]["acc,none"]


def test_code_prompts_come_from_the_stdlib_sources():
  texts = data.load_texts("python-stdlib", max_docs=3)
  files = data.python_stdlib_files()[:3]
  assert texts == [open(f, encoding="utf-8").read().rstrip("\r") for f in files] or \
      all(t.strip() for t in texts)
  assert any("def " in t or "import " in t for t in texts)
  with pytest.raises(DtmError, match="not found"):
    data.load_texts("text-files", data_files="/nonexistent/*.py")


def test_spearman():
  assert report.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # ties get average ranks: matches the textbook value
  assert report.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)
  assert report.spearman([1, 1, 1], [1, 2, 3]) is None
  assert report.spearman([1, 2], [1, 2]) is None


@pytest.mark.parametrize("value, match", [("", "empty"), ("q@0:bogus(1)", "unknown compression")])
def test_bad_compressions(value, match):
  with pytest.raises(DtmError, match=match):
    compare.parse_compressions(value)
