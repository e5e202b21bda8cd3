"""Training from calibrated pruning (wanda, sparsegpt): the job compresses once with the
calibration windows and keeps those zeros; what the trainer cannot do is refused."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from test_train_job import TINY, kernel, make_config, tiny_dir  # noqa: F401 (fixture)
from dtm import compress
from dtm.cli import run_job
from dtm.errors import DtmError
from dtm.jobs import common
from dtm.loading import load_model
from dtm.train import trainer


def test_train_job_from_wanda_keeps_its_zeros(tiny_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  config = make_config(tiny_dir, compression="mlp@*:wanda(0.5); q@0:sparsegpt(2,4)")
  workdir = str(tmp_path / "w")
  assert run_job(config, workdir) == 0
  res = json.load(open(os.path.join(workdir, "results.json")))
  assert res["calibration"]["samples"] == config.calibration.samples
  model = load_model(tiny_dir)
  start, _, _ = common.compress_model(config, model, config.compression)
  trained = load_model(os.path.join(workdir, "model"), load_tokenizer=False).params
  for kind in ("gate", "up", "down", "q"):
    k0, k1 = np.asarray(kernel(start, kind)), np.asarray(kernel(trained, kind))
    layers = [0] if kind == "q" else range(TINY.num_layers)
    for l in layers:
      np.testing.assert_array_equal(k1[l] == 0, k0[l] == 0)  # the same zeros, exactly
      assert np.mean(k1[l] == 0) >= 0.5 - 1e-9
    assert not np.array_equal(k0, k1)  # and it did train
  # the zeros are wanda's, not magnitude's: the masks differ
  mag, _ = compress.apply_spec(model.params, "mlp@*:magnitude(0.5)")
  assert not np.array_equal(np.asarray(kernel(mag, "down")) == 0,
                            np.asarray(kernel(start, "down")) == 0)


def _tc(**acdc):
  config = make_config("unused")
  for k, v in acdc.items():
    config.train.acdc[k] = v
  return config.train


def test_trainer_refuses_what_it_cannot_do(tiny_dir, tmp_path):
  params = load_model(tiny_dir, load_tokenizer=False).params
  tokens = np.arange(5000, dtype=np.int32) % 1000
  with pytest.raises(DtmError, match="already compressed"):
    trainer.train(TINY, params, "down@*:wanda(0.5)", _tc(), tokens=tokens,
                  workdir=str(tmp_path / "a"))
  with pytest.raises(DtmError, match="AC/DC"):
    trainer.train(TINY, params, "down@*:sparsegpt(0.5)", _tc(compressed=2, decompressed=1),
                  tokens=tokens, workdir=str(tmp_path / "b"))
  with pytest.raises(DtmError, match="rtn"):
    trainer.train(TINY, params, "q@0:gptq(4)", _tc(), tokens=tokens, workdir=str(tmp_path / "c"))
  assert not os.path.exists(tmp_path / "a" / "ckpt")
