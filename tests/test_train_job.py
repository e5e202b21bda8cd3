"""The train job end to end on a tiny random Llama (SmolLM2's tokenizer, real WikiText-2
text): outputs, exact zeros (with and without AC/DC), quantized exports on their grid,
1 vs 8 devices, kill-and-resume, SIGTERM, and every bad input's one-line error."""
from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, SHARED
from dtm import compress, convert, gguf_io
from dtm.cli import run_job
from dtm.components import get_path, kernel_path
from dtm.loading import load_model
from dtm.model import init_params
from dtm.model_config import ModelConfig

TINY = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=256)
TRAIN_FILE = str(SHARED / "data" / "wikitext-2" / "wiki.valid.tokens")
EVAL_FILE = str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw")
SPEC = "mlp@*:magnitude(0.5); q@1:absmax(4)"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("tiny") / "model")
  tokenizer = gguf_io.gguf_tokenizer(gguf_io.find_smollm2_gguf())
  convert.export_hf(init_params(TINY, seed=1), TINY, directory, tokenizer=tokenizer)
  return directory


def base_overrides(model_dir: str) -> dict:
  return {"model": model_dir, "data.data_files": TRAIN_FILE, "eval.data.data_files": EVAL_FILE,
          "compression": SPEC}


def make_config(model_dir: str, **overrides):
  from configs import train as train_config
  config = train_config.get_config("runlocal")
  for key, value in {**base_overrides(model_dir), **overrides}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cli_args(model_dir: str, **overrides) -> list[str]:
  return [f"--config.{k}={v}" for k, v in {**base_overrides(model_dir), **overrides}.items()]


def run_subprocess(workdir, *args, env_extra=None, wait=True):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
         "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
  cmd = [sys.executable, "main.py", "--config=configs/train.py:runlocal", f"--workdir={workdir}",
         *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def kernel(params, kind):
  return np.asarray(get_path(params, kernel_path(kind)))


# ----------------------------------------------------------------------------- outputs


def test_train_job_keeps_zeros_quantizes_and_logs(tiny_dir, tmp_path, monkeypatch):
  from dtm.jobs import train as train_job
  workdir = str(tmp_path / "run")
  results = train_job.run(make_config(tiny_dir, export_hf=True), workdir)
  original = load_model(tiny_dir, load_tokenizer=False).params
  ref, _ = compress.apply_spec(original, "mlp@*:magnitude(0.5)")
  monkeypatch.chdir(workdir)  # the written model loads from a relative path too
  trained = load_model("model", load_tokenizer=False).params
  for kind in ("gate", "up", "down"):
    pruned_before = kernel(ref, kind) == 0
    after = kernel(trained, kind)
    assert np.all(after[pruned_before] == 0), kind            # every pruned zero stays zero
    assert np.mean(after == 0) == pytest.approx(0.5, abs=1e-9), kind
    assert not np.array_equal(after, kernel(ref, kind)), kind  # and the rest was trained
  q = kernel(trained, "q")
  requant, _ = compress.apply_spec(trained, "q@1:absmax(4)")
  np.testing.assert_array_equal(q[1], kernel(requant, "q")[1])  # on its 4-bit grid
  assert len(np.unique(q[1][:, 0])) <= 15
  hf = load_file(glob.glob(os.path.join(workdir, "hf", "*.safetensors"))[0])
  np.testing.assert_array_equal(hf["model.layers.0.mlp.down_proj.weight"], kernel(trained, "down")[0].T)
  steps = [r["step"] for r in records(workdir)]
  assert steps == list(range(0, 7))
  recs = records(workdir)
  assert "eval" in recs[0] and "eval" in recs[3] and "eval" in recs[6]
  assert recs[2]["sparsity"]["down"] == pytest.approx(0.5)
  assert {"loss", "ce", "kl", "lr", "grad_norm", "tokens_per_s", "flops_per_s"} <= set(recs[1]["train"])
  assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  assert results["heldout_before"]["dppl"] > 0 and results["steps"] == 6


def test_acdc_phases_and_final_zeros(tiny_dir, tmp_path):
  from dtm.jobs import train as train_job
  workdir = str(tmp_path / "acdc")
  config = make_config(tiny_dir, **{"compression": "mlp@*:magnitude(0.5)", "train.steps": 8,
                                    "train.acdc.dense_warmup": 1, "train.acdc.compressed": 2,
                                    "train.acdc.decompressed": 2,
                                    "train.acdc.final_compressed": 2, "train.eval_every": 0})
  train_job.run(config, workdir)
  phases = [r["train"]["compressed_phase"] for r in records(workdir) if "train" in r]
  assert phases == [0, 1, 1, 0, 0, 1, 1, 1]
  trained = load_model(os.path.join(workdir, "model"), load_tokenizer=False).params
  for kind in ("gate", "up", "down"):
    assert np.mean(kernel(trained, kind) == 0) == pytest.approx(0.5, abs=1e-9)


# ----------------------------------------------------------------------------- devices

DEVICES_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.getcwd())
    import jax, numpy as np
    from dtm import data
    from dtm.loading import load_model
    from dtm.train import sharding, trainer
    sys.path.insert(0, "tests")
    from test_train_job import make_config
    model_dir, root = sys.argv[1], sys.argv[2]
    m = load_model(model_dir)
    texts = data.load_texts("text", data_files=%r, max_docs=400)
    tokens = data.tokenize_corpus(m.tokenizer, texts, add_bos=False)
    out = {}
    for name, (d, f, n) in {"one": (1, 1, 1), "data": (8, 1, 8), "fsdp": (1, 8, 8)}.items():
      config = make_config(model_dir, **{"train.steps": 5, "train.batch_size": 8,
                                        "train.seq_len": 16, "train.eval_every": 0,
                                        "train.tensorboard": False,
                                        "train.objective.alpha": 0.5})
      mesh = sharding.make_mesh(d, f, jax.devices()[:n])
      res = trainer.train(m.cfg, m.params, "mlp@*:magnitude(0.5)", config.train, tokens=tokens,
                          workdir=os.path.join(root, name), mesh=mesh)
      with open(os.path.join(root, name, "metrics.jsonl")) as fh:
        losses = [json.loads(l)["train"]["loss"] for l in fh if "train" in l]
      gate = res.params["layers"]["mlp"]["gate"]["kernel"]
      embed = res.params["embed"]["embedding"]
      out[name] = {"losses": losses,
                   "gate_shard": list(gate.addressable_shards[0].data.shape),
                   "embed_shard": list(embed.addressable_shards[0].data.shape),
                   "gate_shape": list(gate.shape), "embed_shape": list(embed.shape)}
    print("RESULT" + json.dumps(out))
""") % TRAIN_FILE


def test_loss_trajectory_1_vs_8_devices_data_and_fsdp(tiny_dir, tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
  proc = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT, tiny_dir, str(tmp_path)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  one = np.asarray(out["one"]["losses"])
  assert len(one) == 5
  for name in ("data", "fsdp"):
    np.testing.assert_allclose(out[name]["losses"], one, rtol=1e-5, err_msg=name)
  fs = out["fsdp"]
  assert fs["gate_shard"] == [fs["gate_shape"][0], fs["gate_shape"][1], fs["gate_shape"][2] // 8]
  # the embedding splits its hidden axis (`sharding.leaf_pspec`)
  assert fs["embed_shard"] == [fs["embed_shape"][0], fs["embed_shape"][1] // 8]
  assert out["data"]["gate_shard"] == out["data"]["gate_shape"]  # replicated over data


# ----------------------------------------------------------------------------- resume


def _final(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  params = load_model(os.path.join(workdir, "model"), load_tokenizer=False).params
  return res, params


def test_kill_twice_then_resume_is_bit_identical(tiny_dir, tmp_path):
  args = cli_args(tiny_dir, **{"train.steps": 40, "train.checkpoint.every": 3,
                               "train.eval_every": 10, "train.log_every": 5})
  ref_dir = str(tmp_path / "uninterrupted")
  proc = run_subprocess(ref_dir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = str(tmp_path / "killed")
  rng = random.Random(0)
  kills = 0
  ckpt = os.path.join(workdir, "ckpt")

  def committed():
    return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []

  for attempt in range(2):
    p = run_subprocess(workdir, *args, wait=False)
    seen = committed()
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and p.poll() is None:
      new = [s for s in committed() if s not in seen]
      saving = os.path.isdir(ckpt) and any("tmp" in n for n in os.listdir(ckpt))
      if attempt == 0 and saving and committed():  # the first kill lands inside a save
        p.send_signal(signal.SIGKILL)
        killed = True
        break
      if attempt == 1 and new:  # the second at a random moment after this run's first save
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGKILL)
        killed = True
        break
      time.sleep(0.001)
    p.wait()
    kills += killed
  assert kills == 2, "the run finished before both kills"
  proc = run_subprocess(workdir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from checkpoint step" in proc.stdout
  res_ref, params_ref = _final(ref_dir)
  res, params = _final(workdir)
  assert res["params_fingerprint"] == res_ref["params_fingerprint"]
  for a, b in zip(*(np.asarray(x) for x in (params["layers"]["mlp"]["down"]["kernel"],
                                             params_ref["layers"]["mlp"]["down"]["kernel"]))):
    np.testing.assert_array_equal(a, b)
  recs, recs_ref = records(workdir), records(ref_dir)
  assert [r["step"] for r in recs] == list(range(41))
  assert [r.get("train", {}).get("loss") for r in recs] == [r.get("train", {}).get("loss")
                                                            for r in recs_ref]


def test_sigterm_saves_exits_0_and_resumes(tiny_dir, tmp_path):
  args = cli_args(tiny_dir, **{"train.steps": 400, "train.checkpoint.every": 100,
                               "train.eval_every": 0})
  workdir = str(tmp_path / "term")
  p = run_subprocess(workdir, *args, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path) and len(records(workdir)) >= 3:
      break
    time.sleep(0.01)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  assert "SIGTERM: saved a checkpoint at step" in err
  step = int(err.split("SIGTERM: saved a checkpoint at step")[1].split()[0])
  assert 0 < step < 400
  proc = run_subprocess(workdir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resuming from checkpoint step {step}" in proc.stdout
  assert [r["step"] for r in records(workdir)] == list(range(401))


# ----------------------------------------------------------------------------- bad input


def assert_error(capsys, config, workdir, *needles):
  with pytest.raises(SystemExit) as exc:
    run_job(config, str(workdir))
  assert exc.value.code == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, err[-3000:]
  for needle in needles:
    assert needle.lower() in lines[0].lower(), (needle, lines[0])
  return lines[0]


@pytest.fixture
def one_device(monkeypatch):
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")  # run_job must not touch the JAX backend


@pytest.mark.parametrize("overrides, needles", [
    ({"data.data_files": "/nonexistent/train.txt"}, ("data file not found", "/nonexistent")),
    ({"data.source": "no-such-owner/no-such-dataset"}, ("no-such-owner/no-such-dataset",)),
    ({"compression": "none"}, ("selects no component",)),
    ({"compression": "mlp@7:magnitude(0.5)"}, ("layer 7",)),
    ({"train.optim.lr": 0.0}, ("train.optim.lr must be > 0",)),
    ({"train.optim.lr": -1e-4}, ("train.optim.lr must be > 0",)),
    ({"train.steps": 0}, ("train.steps must be >= 1",)),
    ({"train.batch_size": 3, "train.microbatches": 2}, ("not divisible by train.microbatches",)),
])
def test_bad_inputs_one_line(tiny_dir, tmp_path, capsys, one_device, overrides, needles):
  assert_error(capsys, make_config(tiny_dir, **overrides), tmp_path / "w", *needles)
  assert not os.path.exists(tmp_path / "w" / "ckpt")


def test_batch_not_divisible_by_devices(tiny_dir, tmp_path):
  proc = run_subprocess(tmp_path / "w", *cli_args(tiny_dir, **{"train.batch_size": 3}),
                        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "not divisible by the 2 data-parallel devices" in errors[0]


def test_workdir_with_other_config_refused(tiny_dir, tmp_path, capsys, one_device):
  workdir = tmp_path / "w"
  from dtm.jobs import train as train_job
  train_job.run(make_config(tiny_dir, **{"train.steps": 2, "train.eval_every": 0}), str(workdir))
  before = sorted(os.listdir(workdir / "ckpt"))
  line = assert_error(capsys, make_config(tiny_dir, **{"train.steps": 3, "train.eval_every": 0}),
                      workdir, "different config", "config.train.steps")
  assert "2 -> 3" in line
  assert sorted(os.listdir(workdir / "ckpt")) == before


def _corrupt(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"not a checkpoint")


def test_corrupt_checkpoints(tiny_dir, tmp_path, capsys, caplog, one_device):
  from dtm.jobs import train as train_job
  workdir = tmp_path / "w"
  config = make_config(tiny_dir, **{"train.steps": 4, "train.eval_every": 0,
                                    "train.checkpoint.keep": 2})
  train_job.run(config, str(workdir))
  ckpt = workdir / "ckpt"
  assert sorted(os.listdir(ckpt)) == ["2", "4"]
  _corrupt(ckpt / "4")  # the latest is unreadable: fall back to step 2, with a warning
  with open(workdir / "metrics.jsonl") as f:
    n_before = len(f.readlines())
  train_job.run(config, str(workdir))
  out = capsys.readouterr()
  assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text
  assert "resuming from checkpoint step 2" in out.out
  assert os.listdir(workdir / "ckpt_unreadable")  # set aside, not deleted
  assert [r["step"] for r in records(workdir)] == list(range(5)) and n_before == 5
  for step in os.listdir(ckpt):
    _corrupt(ckpt / step)
  files = sorted(glob.glob(str(ckpt / "**"), recursive=True))
  assert_error(capsys, config, workdir, "no readable checkpoint", "nothing was deleted")
  assert sorted(glob.glob(str(ckpt / "**"), recursive=True)) == files


def test_nan_loss_stops_naming_the_step(tiny_dir, tmp_path, capsys, one_device):
  workdir = tmp_path / "w"
  config = make_config(tiny_dir, **{"train.steps": 30, "train.optim.lr": 1e30,
                                    "train.optim.warmup_steps": 0, "train.checkpoint.every": 1,
                                    "train.eval_every": 0, "train.optim.clip_norm": 0.0})
  line = assert_error(capsys, config, workdir, "non-finite training loss", "at step")
  bad_step = int(line.split("at step ")[1].split()[0])
  steps = sorted(int(s) for s in os.listdir(workdir / "ckpt") if s.isdigit())
  assert steps and max(steps) < bad_step  # no checkpoint of the bad state
