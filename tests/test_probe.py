"""The probe sweep: `dtm.probe` (vmapped, prefix-reusing, sharded engine) and the
`dtm.jobs.probe` job (resumable store, outputs).

  * equivalence on SmolLM2: every probe of a mixed sample gives the same per-prompt
    FDT / SDT / top-1 agreement, and DPPL within 1e-5, as compressing the model with
    `compress.apply_spec` and running the evaluate job's teacher-forced pass;
  * the job on a tiny random model, in subprocesses (`main.py`): 1 vs 8 simulated
    devices, SIGKILL at random points then resume, refusal of a changed config, and
    the written outputs.

Subprocesses share one persistent compilation cache (per test module), so only the
first run of each shape compiles.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import tiny_model
from dtm import compress, data, evaluation, metrics, probe
from dtm.components import KINDS, Component, get_path, kernel_path
from dtm.errors import DtmError
from dtm.sweep_store import ProbeStore

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
from configs import probe as probe_config  # noqa: E402
from dtm.jobs import probe as probe_job  # noqa: E402

# ----------------------------------------------------------------------------- SmolLM2

P, C, N = 8, 32, 16

# (kind, method with the level as {}, layers, levels): each (kind, family) is one compile
# of the probe chunk; every (layer, level) pair is one probe (20 in all).
SAMPLE = (
    ("q", "magnitude({})", (3, 17), (0.5, 0.9)),
    ("k", "magnitude({})", (9,), (0.5, 0.9)),
    ("v", "magnitude({})", (26,), (0.5, 0.9)),
    ("o", "magnitude({})", (12, 28), (0.5, 0.9)),
    ("gate", "absmax({},granularity=channel)", (5,), (4, 3)),
    ("up", "absmax({},granularity=channel)", (21,), (4, 3)),
    ("down", "nm({},4)", (14, 29), (2, 3)),
)


@pytest.fixture(scope="module")
def smollm2_seq(smollm2, wikitext_path):
  """s = p ⊕ y for P WikiText prompts of C tokens and N greedy tokens: int32 [P, C + N]."""
  texts = data.load_texts("text", data_files=wikitext_path, max_docs=400)
  stream = data.tokenize_corpus(smollm2.tokenizer, texts, add_bos=False)
  prompts = data.prompt_windows(stream, num=P, length=C, seed=0, bos_id=None)
  y = evaluation.generate_references(smollm2.cfg, smollm2.params, prompts, N, P)
  return np.concatenate([prompts, y], axis=1)


def _numel(params, kind: str) -> int:
  shape = get_path(params, kernel_path(kind)).shape
  return int(shape[1] * shape[2])


def test_probes_equal_evaluate_path(smollm2, smollm2_seq):
  cfg, params, seq = smollm2.cfg, smollm2.params, smollm2_seq
  runner = probe.ProbeRunner(cfg, params, seq, C, probe.probe_mesh())
  dispatched = []  # (component, methods, device outputs): all chunks in flight at once
  for kind, template, layers, levels in SAMPLE:
    methods = [compress.parse_method(template.format(level)) for level in levels]
    family = probe.split_method(methods[0])[0]
    args = [probe.dynamic_arg(family, probe.split_method(m)[1], _numel(params, kind))
            for m in methods]
    for layer in layers:
      comp = Component(layer, kind)
      dispatched.append((comp, methods, runner.run(comp, family, args)))
  host = jax.device_get([out for _, _, out in dispatched])

  base = evaluation.base_reference(cfg, params, seq, C, P)
  failures, num_probes, diverged = [], 0, 0
  for (comp, methods, _), out in zip(dispatched, host):
    for i, method in enumerate(methods):
      num_probes += 1
      spec = f"{comp.kind}@{comp.layer}:{method.to_string()}"
      params_c, report = compress.apply_spec(params, spec)
      ev = evaluation.divergence(cfg, params_c, seq, C, batch_size=P, base=base)
      got = {k: np.asarray(v[i]) for k, v in out.items()}
      diverged += int(np.sum(ev["fdt"] < N))
      checks = {
          "fdt": np.array_equal(got["fdt"], ev["fdt"]),
          "sdt": np.array_equal(got["sdt"], ev["sdt"]),
          "top1_agree": np.array_equal(got["top1_agree"], ev["top1_agree"]),
          "nll": np.allclose(got["nll"], ev["nll"], rtol=1e-5, atol=1e-5),
          "kl": np.allclose(got["kl"], ev["kl"], rtol=1e-3, atol=1e-4),  # a small difference
          "dppl": np.isclose(metrics.aggregate(got)["dppl"], metrics.aggregate(ev)["dppl"],
                             rtol=1e-5, atol=0),
          "sparsity": abs(float(got["sparsity"]) - report[comp.name]["sparsity"]) <= 1e-6,
          "method": report[comp.name]["method"] == method.to_string(),
      }
      bad = [k for k, ok in checks.items() if not ok]
      if bad:
        failures.append(f"{spec}: {bad} (probe fdt {got['fdt']}, evaluate fdt {ev['fdt']})")
  assert num_probes >= 20
  assert not failures, "\n".join(failures)
  assert diverged > num_probes, "the sample barely changes the model; the check is vacuous"


# ----------------------------------------------------------------------------- tiny model

LEVELS = (0.3, 0.6, 0.9)  # 3 levels, 3 layers: on 8 devices a call has 6 slots (2 + 1 levels
# per layer) padded to 8
NUM_PROBES = 3 * len(KINDS) * len(LEVELS)  # 3 layers x 7 kinds x 3 levels = 63
TINY_N = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Paths of a tiny random HF model, its prompt JSONL and a shared compilation cache."""
  root = tmp_path_factory.mktemp("tiny")
  tiny_model.write_tiny_model(str(root / "model"))
  tiny_model.write_prompts(str(root / "prompts.jsonl"), num=4, length=12)
  return {"root": root, "model": str(root / "model"), "prompts": str(root / "prompts.jsonl"),
          "cache": str(root / "jax-cache")}


def _command(tiny, workdir, *overrides, levels=LEVELS, kinds=KINDS) -> list[str]:
  return [sys.executable, "main.py", "--config=configs/probe.py:runlocal", f"--workdir={workdir}",
          f"--config.model={tiny['model']}", f"--config.prompts.jsonl={tiny['prompts']}",
          f"--config.prompts.new_tokens={TINY_N}", "--config.probe.layers=*",
          f"--config.probe.kinds={','.join(kinds)}",
          f"--config.probe.levels=({','.join(map(str, levels))},)", *overrides]


def _env(tiny, devices: int = 1) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env["JAX_NUM_CPU_DEVICES"] = str(devices)
  env.update(JAX_PLATFORMS="cpu", DTM_JAX_CACHE="", JAX_COMPILATION_CACHE_DIR=tiny["cache"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _start(tiny, workdir, *overrides, levels=LEVELS, kinds=KINDS,
           devices: int = 1) -> subprocess.Popen:
  """main.py in a subprocess; stdout + stderr go to <workdir>.log."""
  log = open(f"{workdir}.log", "ab")
  try:
    return subprocess.Popen(_command(tiny, workdir, *overrides, levels=levels, kinds=kinds),
                            cwd=REPO,
                            env=_env(tiny, devices), stdout=log, stderr=subprocess.STDOUT)
  finally:
    log.close()


def _log(workdir) -> str:
  return Path(f"{workdir}.log").read_text(errors="replace")


def _wait_ok(proc: subprocess.Popen, workdir, timeout: float = 300) -> str:
  rc = proc.wait(timeout)
  assert rc == 0, f"probe job failed (rc={rc}):\n{_log(workdir)[-3000:]}"
  return _log(workdir)


def _records(workdir) -> list[dict]:
  """All lines of probes.jsonl, each of which must be valid JSON."""
  lines = (Path(workdir) / "probes.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def _by_id(records: list[dict]) -> dict[str, dict]:
  ids = [r["probe"] for r in records]
  assert len(ids) == len(set(ids)), "duplicate probe records"
  return {r["probe"]: r for r in records}


def _num_lines(path: Path) -> int:
  try:
    return path.read_bytes().count(b"\n")
  except FileNotFoundError:
    return 0


@pytest.fixture(scope="module")
def reference_run(tiny):
  """An uninterrupted sweep, one probe per call (the kill/resume test's chunking)."""
  workdir = tiny["root"] / "reference"
  _wait_ok(_start(tiny, workdir, "--config.probe.chunk_size=1"), workdir)
  return workdir


def test_same_results_on_1_and_8_devices(tiny):
  """Auto chunking: 1 device runs each component's 3 levels in one call; 8 devices run a
  kind's 3 layers in one call, each layer's levels split 2 + 1 over two devices, two
  devices padding. Uses absmax so the job-level tests cover two families,
  and four kinds (both attention and MLP shapes) to keep compiles few."""
  run = dict(levels=(8, 4, 3), kinds=("q", "k", "gate", "down"))
  method = ("--config.probe.method=absmax", "--config.probe.method_args=granularity=channel")
  one, eight = tiny["root"] / "devices1", tiny["root"] / "devices8"
  procs = [(_start(tiny, one, *method, **run), one),
           (_start(tiny, eight, *method, **run, devices=8), eight)]
  logs = [_wait_ok(p, w) for p, w in procs]
  assert "1 device(s)" in logs[0] and "8 device(s)" in logs[1]
  a, b = _by_id(_records(one)), _by_id(_records(eight))
  assert len(a) == 3 * 4 * 3 and a.keys() == b.keys()
  for pid, ra in a.items():
    rb, pa, pb = b[pid], a[pid]["per_prompt"], b[pid]["per_prompt"]
    assert pa["fdt"] == pb["fdt"] and pa["sdt"] == pb["sdt"], pid
    assert pa["top1_agree"] == pb["top1_agree"], pid
    assert ra["sparsity"] == rb["sparsity"], pid
    # Stored per-token NLL is rounded to 5 decimals, so a sub-1e-6 difference can show as
    # one rounding step; the aggregate is computed before rounding and must agree to 1e-6.
    np.testing.assert_allclose(pa["nll"], pb["nll"], rtol=0, atol=1e-5 + 1e-6, err_msg=pid)
    np.testing.assert_allclose(pa["kl_mean"], pb["kl_mean"], rtol=0, atol=2e-6, err_msg=pid)
    assert abs(ra["aggregate"]["nll_mean"] - rb["aggregate"]["nll_mean"]) <= 1e-6, pid
    assert ra["aggregate"]["fdt_alpha_0.9"] == rb["aggregate"]["fdt_alpha_0.9"], pid


def test_kill_and_resume_equals_uninterrupted_run(tiny, reference_run):
  """SIGKILL twice at random points, tear the last line, resume: same records as one run."""
  workdir = tiny["root"] / "killed"
  jsonl = workdir / "probes.jsonl"
  rng = random.Random(0)
  for _ in range(2):
    before = _num_lines(jsonl)
    proc = _start(tiny, workdir, "--config.probe.chunk_size=1")
    # Kill once this run has appended a random number of records (up to a third of what
    # is left: a call of the tiny model takes milliseconds, so a random delay could
    # outlast the whole sweep), at a random moment within the next call.
    target = before + rng.randint(1, max(1, (NUM_PROBES - before) // 3))
    deadline = time.time() + 120
    while _num_lines(jsonl) < target:
      assert proc.poll() is None, f"run ended before writing a record:\n{_log(workdir)}"
      assert time.time() < deadline, "no record appeared in time"
      time.sleep(0.001)
    time.sleep(rng.uniform(0.0, 0.003))
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert before < _num_lines(jsonl) < NUM_PROBES
    _records(workdir)  # whole records only
  # a torn append: half of a record, no newline
  last = jsonl.read_bytes().splitlines()[-1]
  with open(jsonl, "ab") as f:
    f.write(last[: len(last) // 2])
  done_before = _num_lines(jsonl)
  log = _wait_ok(_start(tiny, workdir, "--config.probe.chunk_size=1"), workdir)
  assert f"({done_before} done)" in log
  got, want = _by_id(_records(workdir)), _by_id(_records(reference_run))
  assert len(want) == NUM_PROBES
  assert got.keys() == want.keys()
  for pid in want:
    assert got[pid] == want[pid], pid  # same chunking and devices: bit-identical records
  assert jsonl.read_bytes().endswith(b"\n")


@pytest.mark.parametrize("num_devices,layers,levels,cap", [
    (1, 5, 3, 3), (2, 7, 1, 8), (8, 3, 3, 8), (8, 1, 11, 8), (8, 30, 7, 2), (4, 2, 1, 8)])
def test_schedule(num_devices, layers, levels, cap):
  """Every probe in exactly one slot; a slot is one layer with at most `cap` probes; calls
  have at most one slot per device; idle devices take levels when layers are few."""
  work = {Component(3 * l, "q"): [((l, j), float(j)) for j in range(levels)]
          for l in range(layers)}
  calls = probe.schedule(work, num_devices, cap)
  keys = [key for call in calls for slot in call for key in slot.keys]
  assert sorted(keys) == sorted(key for items in work.values() for key, _ in items)
  for call in calls:
    assert 1 <= len(call) <= num_devices
    for slot in call:
      assert 1 <= len(slot.args) == len(slot.keys) <= cap
      assert {key[0] for key in slot.keys} == {slot.component.layer // 3}
      assert list(slot.args) == [float(key[1]) for key in slot.keys]
  spread = max(1, num_devices // layers)  # devices per layer when layers are few
  k = min(cap, -(-levels // spread))
  slots = layers * -(-levels // k)
  assert len(calls) == -(-slots // num_devices)
  assert len(calls[0]) == min(num_devices, slots)  # no device idles that could work
  if num_devices > layers and levels > 1 and cap > 1:
    assert max(len(slot.args) for call in calls for slot in call) < levels  # levels spread


def test_store_cuts_partial_last_line(tmp_path):
  ident = {"levels": [0.5]}
  store = ProbeStore.open(str(tmp_path), ident)
  store.add([{"probe": "a", "v": 1}, {"probe": "b", "v": 2}])
  good = Path(store.path).read_bytes()
  for tail in (b'{"probe": "c", "v"', b'{"probe": "c", "v": 3}'):  # torn; newline lost
    Path(store.path).write_bytes(good + tail)
    store = ProbeStore.open(str(tmp_path), ident)
    assert sorted(store.records) == ["a", "b"]
    assert Path(store.path).read_bytes() == good
  store.add([{"probe": "c", "v": 3}])
  assert [json.loads(l)["probe"] for l in Path(store.path).read_text().splitlines()] == [
      "a", "b", "c"]
  assert sorted(ProbeStore.open(str(tmp_path), ident).records) == ["a", "b", "c"]


def test_changed_config_is_refused(tiny, reference_run, tmp_path):
  workdir = tmp_path / "reused"
  shutil.copytree(reference_run, workdir)
  before = {f: (workdir / f).read_bytes() for f in ("probes.jsonl", "sweep.json")}
  proc = subprocess.run(_command(tiny, workdir, levels=(0.3, 0.6)), cwd=REPO,
                        env=_env(tiny), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "differs in: levels" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  # in-process, through the job's run(): another field, same refusal
  config = _tiny_config(tiny)
  config.prompts.new_tokens = TINY_N + 1
  with pytest.raises(DtmError, match="differs in: new_tokens"):
    probe_job.run(config, str(workdir))
  for f, content in before.items():
    assert (workdir / f).read_bytes() == content, f"{f} changed"


def _tiny_config(tiny):
  config = probe_config.get_config("runlocal")
  config.model = tiny["model"]
  config.prompts.jsonl = tiny["prompts"]
  config.prompts.new_tokens = TINY_N
  config.probe.layers = "*"
  config.probe.kinds = ",".join(KINDS)
  config.probe.levels = LEVELS
  config.probe.chunk_size = 1
  return config


def test_outputs(reference_run):
  records = _by_id(_records(reference_run))
  with open(reference_run / "summary.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == NUM_PROBES
  assert {(r["component"], float(r["level"])) for r in rows} == {
      (r["component"], r["level"]) for r in records.values()}
  for r in rows:
    assert 0 <= float(r["fdt_alpha_0.9"]) <= TINY_N and float(r["dppl"]) >= 1.0
    assert abs(float(r["sparsity"]) - float(r["level"])) < 1e-3  # magnitude: rate = sparsity
  for r in records.values():
    assert len(r["per_prompt"]["fdt"]) == 4 and len(r["per_prompt"]["nll"][0]) == TINY_N

  png = (reference_run / "heatmap.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n")
  from PIL import Image
  with Image.open(reference_run / "heatmap.png") as im:
    im.verify()

  cands = json.loads((reference_run / "candidates.json").read_text())
  names = {Component(l, k).name for l in range(3) for k in KINDS}
  assert set(cands["candidates"]) == names
  assert cands["min_fdt"] == TINY_N / 2 and cands["alpha"] == 0.9
  for name, level in cands["candidates"].items():  # largest level with FDT_0.9 >= min_fdt
    ok = [float(r["level"]) for r in rows
          if r["component"] == name and float(r["fdt_alpha_0.9"]) >= cands["min_fdt"]]
    assert level == (max(ok) if ok else None), name
  shares = {r["group"]: r for r in cands["shares"]}  # counted again from the candidates
  for group, kinds in [*((k, (k,)) for k in KINDS), ("attention (q,k,v,o)", KINDS[:4]),
                       ("mlp (gate,up,down)", KINDS[4:]), ("all", KINDS)]:
    members = [lv for nm, lv in cands["candidates"].items() if nm.split(".")[1] in kinds]
    assert shares[group]["components"] == len(members), group
    for lv, count in shares[group]["reach"].items():
      assert count == sum(m is not None and m >= float(lv) for m in members), (group, lv)
  assert (reference_run / "summary.txt").read_text().startswith("FDT_0.9")


def test_candidate_shares_hand_computed():
  from dtm import report
  cands = {"L00.q": 0.99, "L00.down": 0.9, "L01.q": None, "L01.up": 0.95}
  rows = {r["group"]: (r["components"], r["reach"])
          for r in report.candidate_shares(cands, (0.9, 0.95, 0.99), descending=False)}
  assert rows == {"q": (2, {0.9: 1, 0.95: 1, 0.99: 1}), "up": (1, {0.9: 1, 0.95: 1, 0.99: 0}),
                  "down": (1, {0.9: 1, 0.95: 0, 0.99: 0}),
                  "attention (q,k,v,o)": (2, {0.9: 1, 0.95: 1, 0.99: 1}),
                  "mlp (gate,up,down)": (2, {0.9: 2, 0.95: 1, 0.99: 0}),
                  "all": (4, {0.9: 3, 0.95: 2, 0.99: 1})}
  bits = report.candidate_shares({"L00.q": 4, "L00.k": 8, "L00.v": None}, (8, 4), descending=True)
  assert [(r["group"], r["reach"]) for r in bits][:3] == [
      ("q", {8.0: 1, 4.0: 1}), ("k", {8.0: 1, 4.0: 0}), ("v", {8.0: 0, 4.0: 0})]
  table = report.shares_table(bits, descending=True)
  assert table.splitlines()[0].split()[-2:] == ["<=8", "<=4"] and "all" in table
