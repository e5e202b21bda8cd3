"""The prune job (FDT-guided iterative magnitude pruning) end to end on a tiny random Llama
with SmolLM2's tokenizer and real WikiText-2 text: the chosen increments are the best
candidates by a direct evaluation of each, sparsity grows monotonically, pruned zeros stay
zero through training, a run SIGKILLed twice resumes to the same records and model, a
workdir with another config is refused, and bad settings fail with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, SHARED
from dtm import compress, convert, evaluation, gguf_io, metrics
from dtm.components import get_path, kernel_path, parse_component
from dtm.errors import DtmError
from dtm.loading import load_model
from dtm.model import init_params
from dtm.model_config import ModelConfig
from dtm.search import prune_rounds

TINY = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=256)
TRAIN_FILE = str(SHARED / "data" / "wikitext-2" / "wiki.valid.tokens")
EVAL_FILE = str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw")
# Selection prompts from the valid split, held-out prompts from the test split.
OVERRIDES = {"data.data_files": TRAIN_FILE, "select.data.data_files": TRAIN_FILE,
             "eval.data.data_files": EVAL_FILE, "select.prompts.num": 8,
             "prune.ladder": (0.5, 0.75, 0.9)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  """Random params with the LM head scaled up, so greedy tokens have clear margins."""
  directory = str(tmp_path_factory.mktemp("tiny") / "model")
  params = init_params(TINY, seed=1)
  params = {**params, "lm_head": jax.tree.map(lambda x: x * 50.0, params["lm_head"])}
  convert.export_hf(params, TINY, directory,
                    tokenizer=gguf_io.gguf_tokenizer(gguf_io.find_smollm2_gguf()))
  return directory


def make_config(model_dir: str, **overrides):
  from configs import prune as prune_config
  config = prune_config.get_config("runlocal")
  for key, value in {"model": model_dir, **OVERRIDES, **overrides}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cli_args(model_dir: str, **overrides) -> list[str]:
  items = {"model": model_dir, **OVERRIDES, **overrides}
  return [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
          for k, v in items.items()]


def subprocess_env() -> dict:
  return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
          "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def main_cmd(workdir, args) -> list[str]:
  return [sys.executable, "main.py", "--config=configs/prune.py:runlocal",
          f"--workdir={workdir}", *args]


def rounds(workdir) -> list[dict]:
  with open(os.path.join(workdir, "rounds.jsonl")) as f:
    return [json.loads(line) for line in f]


def without_timing(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in ("seconds", "phase_seconds")}
          for r in records]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
  """One uninterrupted in-process run: (workdir, results)."""
  from dtm.jobs import prune as prune_job
  workdir = str(tmp_path_factory.mktemp("prune") / "reference")
  results = prune_job.run(make_config(tiny_dir), workdir)
  return workdir, results


def test_outputs_and_monotone_sparsity(reference):
  workdir, results = reference
  recs = rounds(workdir)
  assert [r["round"] for r in recs] == [0, 1, 2]
  assert recs[0]["sparsity"] == 0.0 and recs[0]["heldout"]["fdt_alpha_0.75"] == 6.0
  sparsity = [r["sparsity"] for r in recs]
  assert all(b > a for a, b in zip(sparsity, sparsity[1:])), sparsity
  for prev, cur in zip(recs, recs[1:]):
    assert len(cur["chosen"]) == 2
    for name, level in prev["levels"].items():  # levels never go down
      assert cur["levels"][name] >= level
    assert cur["spec"] == prune_rounds.spec_of(prune_rounds.levels_from_json(cur["levels"]))
  assert results["final_spec"] == recs[-1]["spec"] and results["stop_reason"] == "max_rounds"
  for name in ("sparsity_heatmap.png", "curves.png", "results.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  assert not os.path.exists(os.path.join(prune_rounds.round_dir(workdir, 1), "model"))


def test_selection_is_the_best_by_direct_evaluation(reference, tiny_dir):
  """Round 1 (base = the original model): every candidate applied with apply_spec and
  evaluated by the evaluate job's teacher-forced pass; the probes agree per prompt and
  the chosen components are the top k of that direct evaluation."""
  workdir, _ = reference
  model = load_model(tiny_dir)
  with open(os.path.join(workdir, "select", "prompts.jsonl")) as f:
    prompts = np.asarray([json.loads(line)["ids"] for line in f], np.int32)
  with open(os.path.join(workdir, "select", "references.jsonl")) as f:
    y = np.asarray([json.loads(line)["ids"] for line in f], np.int32)
  seq = np.concatenate([prompts, y], axis=1)
  with open(os.path.join(prune_rounds.round_dir(workdir, 1), "probe", "probes.jsonl")) as f:
    probed = {r["component"]: r for r in map(json.loads, f)}
  assert len(probed) == 14
  direct = {}
  for name, rec in probed.items():
    params, _ = compress.apply_spec(model.params, f"{parse_component(name).kind}@"
                                    f"{parse_component(name).layer}:magnitude({rec['level']})")
    per = evaluation.divergence(model.cfg, params, seq, prompts.shape[1], batch_size=8)
    assert per["fdt"].tolist() == rec["fdt"], name
    direct[parse_component(name)] = metrics.aggregate(per, (0.75,))
    np.testing.assert_allclose(rec["aggregate"]["dppl"], direct[parse_component(name)]["dppl"],
                               rtol=1e-4)
  assert len({a["fdt_alpha_0.75"] for a in direct.values()}) > 1  # FDT decides, not ties only
  best = sorted(direct, key=lambda c: (prune_rounds.rank_key(direct[c], 0.75), c))[:2]
  chosen = [parse_component(c["component"]) for c in rounds(workdir)[1]["chosen"]]
  assert chosen == best


def test_pruned_zeros_stay_zero_through_training(reference, tiny_dir):
  """The final model holds exactly floor(level * numel) zeros per component, and they
  include every weight round 1 pruned from the original model (trained twice since)."""
  workdir, _ = reference
  original = load_model(tiny_dir).params
  final = load_model(os.path.join(workdir, "model")).params
  recs = rounds(workdir)
  for name, level in recs[-1]["levels"].items():
    comp = parse_component(name)
    kernel = np.asarray(get_path(final, kernel_path(comp.kind))[comp.layer])
    assert int(np.sum(kernel == 0)) == compress.num_pruned(level, kernel.size), name
  first, _ = compress.apply_spec(original, recs[1]["spec"])
  for name in recs[1]["levels"]:
    comp = parse_component(name)
    was = np.asarray(get_path(first, kernel_path(comp.kind))[comp.layer]) == 0
    now = np.asarray(get_path(final, kernel_path(comp.kind))[comp.layer]) == 0
    assert was.any() and np.all(now[was]), name
  dense = next(cm for cm in prune_rounds.prunable("*@*", TINY.num_layers)
               if cm.name not in recs[-1]["levels"])  # never pruned, but trained
  assert not np.array_equal(np.asarray(get_path(final, kernel_path(dense.kind))[dense.layer]),
                            np.asarray(get_path(original, kernel_path(dense.kind))[dense.layer]))


def _run_until(workdir, args, log_path, ready, delay: float) -> int:
  """Start the job; SIGKILL it `delay` seconds after `ready()` first holds. Returns the
  exit code (-SIGKILL when killed)."""
  with open(log_path, "w") as log:
    p = subprocess.Popen(main_cmd(workdir, args), cwd=REPO, env=subprocess_env(), stdout=log,
                         stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
      if ready():
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        break
      time.sleep(0.01)
    return p.wait()


def _has_lines(path) -> bool:
  return os.path.exists(path) and os.path.getsize(path) > 0


def _has_step(ckpt) -> bool:
  return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def test_two_kills_then_resume_give_the_same_model_and_records(reference, tiny_dir, tmp_path):
  """SIGKILL once during round 1's selection (after its first probe record, plus a random
  delay) and once during round 2's training (after its first checkpoint, plus a random
  delay); the third invocation of the same command resumes (probe store, trainer
  checkpoint, stored rounds) and ends with the uninterrupted run's rounds.jsonl, final spec
  and final model, bit for bit."""
  import random
  rng = random.Random(11)
  ref_dir, _ = reference
  workdir = str(tmp_path / "killed")
  args = cli_args(tiny_dir)
  probes1 = os.path.join(prune_rounds.round_dir(workdir, 1), "probe", "probes.jsonl")
  ckpt2 = os.path.join(prune_rounds.round_dir(workdir, 2), "train", "ckpt")
  code = _run_until(workdir, args, tmp_path / "log1", lambda: _has_lines(probes1),
                    rng.uniform(0.0, 0.3))
  assert code == -signal.SIGKILL, "the first run ended before the kill"
  assert len(rounds(workdir)) == 1  # round 0 only
  code = _run_until(workdir, args, tmp_path / "log2", lambda: _has_step(ckpt2),
                    rng.uniform(0.0, 0.3))
  assert code == -signal.SIGKILL, "the second run ended before the kill"
  assert len(rounds(workdir)) == 2  # rounds 0-1
  proc = subprocess.run(main_cmd(workdir, args), cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from checkpoint step" in proc.stdout
  assert without_timing(rounds(workdir)) == without_timing(rounds(ref_dir))
  with open(os.path.join(workdir, "results.json")) as f, \
       open(os.path.join(ref_dir, "results.json")) as g:
    assert json.load(f)["final_spec"] == json.load(g)["final_spec"]
  got = load_model(os.path.join(workdir, "model")).params
  want = load_model(os.path.join(ref_dir, "model")).params
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_other_config_is_refused(reference, tiny_dir):
  from dtm.jobs import prune as prune_job
  workdir, _ = reference
  before = open(os.path.join(workdir, "rounds.jsonl")).read()
  with pytest.raises(DtmError, match=r"different config \(differs in: config\.prune\.k\)"):
    prune_job.run(make_config(tiny_dir, **{"prune.k": 3}), workdir)
  assert open(os.path.join(workdir, "rounds.jsonl")).read() == before


def test_fsdp_layout_and_2d_probe_mesh_choose_as_one_device(reference, tiny_dir, tmp_path):
  """The pod configs' layout on 2 CPU devices: F and each round's params in the trainer's
  FSDP layout (train.mesh.fsdp=2), the selection probes on the ('probe', 'model') mesh of
  select.mesh_model=2 (the preflight compiles that plan first). Round 1, chosen on F, picks
  the same increments as the 1-device run; held-out metrics agree to float noise (the
  split reorders sums)."""
  ref_dir, _ = reference
  workdir = str(tmp_path / "fsdp")
  args = cli_args(tiny_dir, **{"cpu_devices": 2, "train.mesh.data": 1, "train.mesh.fsdp": 2,
                               "select.mesh_model": 2})
  proc = subprocess.run(main_cmd(workdir, args), cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 device(s)" in proc.stdout
  got, want = rounds(workdir), rounds(ref_dir)
  assert len(got) == len(want)
  for g, w in zip(got[:2], want[:2]):
    assert (g["spec"], g["sparsity"]) == (w["spec"], w["sparsity"])
    assert [c["component"] for c in g["chosen"]] == [c["component"] for c in w["chosen"]]
    for key, value in w["heldout"].items():
      assert g["heldout"][key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


@pytest.mark.parametrize("overrides, message", [
    ({"prune.ladder": (0.5, 0.25)}, "strictly increasing"),
    ({"prune.ladder": (0.5, 1.0)}, r"must lie in \(0, 1\)"),
    ({"prune.k": 0}, r"prune.k .* must be >= 1"),
    ({"prune.fdt_bound": 7.0}, r"fdt_bound must be in 0..N = 0..6"),
    ({"prune.fdt_bound": -1.0}, r"fdt_bound must be in 0..N"),
    ({"prune.target_sparsity": 1.0}, r"target_sparsity must be in \(0, 1\)"),
    ({"prune.target_sparsity": 0.0}, r"target_sparsity must be in \(0, 1\)"),
    ({"select.prompts.num": 0}, "select prompt set is empty"),
    ({"prune.components": "qq@*"}, "unknown component kind"),
    ({"prune.components": "q@5"}, "names layer 5"),
    ({"select.mesh_model": 0}, r"select.mesh_model=0 must be >= 1 and divide"),
    ({"select.data.data_files": EVAL_FILE, "select.prompts.seed": 0, "select.prompts.num": 4},
     "selection and held-out prompts overlap"),
])
def test_bad_inputs(tiny_dir, tmp_path, overrides, message):
  from dtm.jobs import prune as prune_job
  with pytest.raises(DtmError, match=message):
    prune_job.run(make_config(tiny_dir, **overrides), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "rounds.jsonl")


def test_bad_input_cli_one_line(tiny_dir, tmp_path):
  proc = subprocess.run(main_cmd(tmp_path / "w", cli_args(tiny_dir, **{"prune.k": 0})), cwd=REPO,
                        env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: prune.k (increments per round)")


def test_spec_of_and_candidates():
  c = parse_component
  levels = {c("L01.q"): 0.5, c("L00.q"): 0.5, c("L02.q"): 0.5, c("L00.down"): 0.25,
            c("L01.k"): 0.0}
  spec = prune_rounds.spec_of(levels)
  assert spec == ("q@0-2:magnitude(rate=0.5); down@0:magnitude(rate=0.25)")
  assert compress.parse_spec(spec).resolve(3) == {
      k: compress.Method("magnitude", {"rate": v}) for k, v in sorted(levels.items()) if v}
  s = prune_rounds.PruneSettings(ladder=(0.25, 0.5), k=1, alpha=0.75, fdt_bound=0,
                                 target_sparsity=0.5, max_rounds=3,
                                 components=(c("L00.q"), c("L00.down"), c("L01.k")))
  assert prune_rounds.candidates(levels, s) == [(c("L00.down"), 0.5), (c("L01.k"), 0.25)]
  with pytest.raises(DtmError, match="overlap"):
    x = np.arange(40).reshape(2, 20)
    prune_rounds.check_disjoint(x, x[:, 3:])
  with pytest.raises(DtmError, match="empty prompt set"):
    prune_rounds.check_disjoint(np.zeros((0, 8), np.int32), np.zeros((2, 8), np.int32))


def test_stop_reasons():
  c = parse_component
  s = prune_rounds.PruneSettings(ladder=(0.5,), k=1, alpha=0.75, fdt_bound=3, target_sparsity=0.4,
                                 max_rounds=5, components=(c("L00.q"), c("L00.k")))

  def rec(r, sparsity, fdt, levels):
    return {"round": r, "sparsity": sparsity, "heldout": {"fdt_alpha_0.75": fdt},
            "levels": levels}
  base = rec(0, 0.0, 6, {})
  assert prune_rounds.stop_reason([base], s) is None
  assert prune_rounds.stop_reason([base, rec(1, 0.1, 3, {"L00.q": 0.5})], s) is None
  assert prune_rounds.stop_reason([base, rec(1, 0.1, 2, {"L00.q": 0.5})], s) == "fdt_bound"
  assert prune_rounds.stop_reason([base, rec(1, 0.4, 6, {"L00.q": 0.5})], s) == "target_sparsity"
  assert prune_rounds.stop_reason([base, rec(1, 0.1, 6, {"L00.q": 0.5, "L00.k": 0.5})],
                                  s) == "ladder_exhausted"
  assert prune_rounds.stop_reason([rec(5, 0.1, 6, {"L00.q": 0.5})], s) == "max_rounds"


def test_no_training_rounds_apply_the_spec_exactly(tiny_dir, tmp_path):
  """train.steps = 0: a round's model is the spec applied to the current params (saved
  and restored from the round's model directory)."""
  import ml_collections
  model = load_model(tiny_dir)
  ctx = prune_rounds.Context(cfg=model.cfg, params=model.params, select_seq=None, c=0,
                             heldout=None, tc=ml_collections.ConfigDict({"steps": 0, "seed": 0}),
                             tokens=np.zeros((0,), np.int32))
  start, _ = compress.apply_spec(model.params, "q@0:magnitude(0.5)")
  spec = "q@0:magnitude(rate=0.75); down@1:magnitude(rate=0.5)"
  out = prune_rounds._prune_and_train(ctx, start, spec, 1, str(tmp_path / "r001"))
  expected, _ = compress.apply_spec(start, spec)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.isfile(tmp_path / "r001" / "model" / "dtm_model.json")
