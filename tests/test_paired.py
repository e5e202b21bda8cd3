"""dtm.paired: FDT profiles and the paired bootstrap, on hand-computed cases."""
import json

import numpy as np
import pytest

from dtm import paired
from dtm.errors import DtmError


def _per_prompt(fdt, n=4, seed=0):
  rng = np.random.default_rng(seed)
  fdt = np.asarray(fdt)
  return {"fdt": fdt, "sdt": np.clip(1 - fdt / n, 0, 1), "nll": rng.uniform(0, 2, (fdt.size, n))}


def test_fdt_profile_hand_computed():
  p = paired.fdt_profile([0, 0, 2, 32], new_tokens=32)
  assert p == {"mean": 8.5, "median": 1.0, "first_token": 0.5, "all_tokens": 0.25,
               "tail_share": 32 / 34}
  assert paired.fdt_profile([0, 0], 4)["tail_share"] == 0.0


def test_bootstrap_identical_models_and_a_constant_shift():
  a = _per_prompt([0, 1, 3, 4])
  same = paired.paired_bootstrap(a, a, "fdt_mean", resamples=200)
  assert same["diff"] == same["lo"] == same["hi"] == 0.0 and same["p_le_0"] == 1.0
  b = {**a, "fdt": a["fdt"] + 2}  # every prompt 2 tokens later: no noise in the difference
  shift = paired.paired_bootstrap(a, b, "fdt_mean", resamples=200)
  assert shift["diff"] == 2.0 and shift["lo"] == pytest.approx(2.0) and shift["hi"] == pytest.approx(2.0)
  assert shift["p_le_0"] == 0.0
  # DPPL of a model whose every NLL is 0.1 nats higher: exp(mean + 0.1) - exp(mean)
  c = {**a, "nll": a["nll"] + 0.1}
  d = paired.paired_bootstrap(a, c, "dppl", resamples=200)
  assert d["diff"] == pytest.approx(np.exp(a["nll"].mean()) * (np.exp(0.1) - 1))
  assert d["lo"] > 0


def test_bootstrap_interval_covers_a_noisy_difference():
  rng = np.random.default_rng(1)
  a = _per_prompt(rng.integers(0, 5, 64), n=4)
  b = _per_prompt(rng.integers(0, 5, 64), n=4, seed=2)
  r = paired.paired_bootstrap(a, b, "fdt_mean", resamples=2000)
  assert r["lo"] < r["diff"] < r["hi"]
  assert 0.0 < r["p_le_0"] < 1.0


def _write(path, per, settings):
  path.write_text(json.dumps({"settings": settings, "per_prompt": {
      "fdt": per["fdt"].tolist(), "sdt": per["sdt"].tolist(), "nll": per["nll"].tolist()}}))
  return str(path)


def test_compare_files_and_cli(tmp_path, capsys):
  s = {"prompt_source": "text", "num_prompts": 4, "prompt_length": 8, "new_tokens": 4,
       "bos_id": None, "prompt_seed": 1}
  a = _write(tmp_path / "a.json", _per_prompt([0, 1, 3, 4]), s)
  b = _write(tmp_path / "b.json", _per_prompt([1, 2, 4, 4]), s)
  r = paired.compare(a, b, resamples=100)
  assert r["bootstrap"]["fdt_mean"]["diff"] == 0.75
  assert r["bootstrap"]["fdt_ge_1"]["a"] == 0.75 and r["bootstrap"]["fdt_ge_1"]["b"] == 1.0
  assert r["profile"]["a"]["all_tokens"] == 0.25 and r["profile"]["b"]["all_tokens"] == 0.5
  assert paired.main([a, b, "--resamples", "100", "--json", str(tmp_path / "r.json")]) == 0
  out = capsys.readouterr().out
  assert "fdt_mean" in out and "dppl" in out
  assert json.loads((tmp_path / "r.json").read_text())["prompts"] == 4
  other = _write(tmp_path / "c.json", _per_prompt([1, 2, 4, 4]), {**s, "prompt_seed": 2})
  with pytest.raises(DtmError, match="different prompts"):
    paired.compare(a, other)
  assert paired.main([a, str(tmp_path / "missing.json")]) == 2
  assert "no results file" in capsys.readouterr().err
  (tmp_path / "bad.json").write_text("{}")
  assert paired.main([a, str(tmp_path / "bad.json")]) == 2
  assert "per-prompt" in capsys.readouterr().err


def test_induction_share_hand_computed():
  # prompt "a b c a": the rule predicts b (what followed the earlier a), then c, then a
  assert paired.induction_share([1, 2, 3, 1], [2, 3, 1, 2], n=4) == 1.0
  # b (hit), 9 (miss: 3 followed b), 1 (nothing followed 9), 2 (hit: b followed the last a)
  assert paired.induction_share([1, 2, 3, 1], [2, 9, 1, 2], n=4) == 0.5
  assert paired.induction_share([1, 2, 3, 4], [5, 6, 7, 8], n=4) == 0.0  # nothing repeats
  # a loop the continuation itself starts: x y x y ... (the rule sees its own earlier tokens)
  assert paired.induction_share([7, 8, 9], [5, 6, 5, 6, 5], n=5) == 0.4  # the last two
  # only the first n tokens count
  assert paired.induction_share([1, 2, 3, 1], [2, 3, 9, 9], n=2) == 1.0
  with pytest.raises(DtmError, match="non-empty"):
    paired.induction_share([], [1])


def test_copy_strata_from_the_evaluate_jobs_files(tmp_path, capsys):
  s = {"prompt_source": "text", "num_prompts": 3, "prompt_length": 4, "new_tokens": 4,
       "bos_id": None, "prompt_seed": 1}
  (tmp_path / "a").mkdir()
  a = _write(tmp_path / "a" / "results.json", _per_prompt([4, 0, 1]), s)
  b = _write(tmp_path / "b.json", _per_prompt([1, 2, 3]), s)
  with pytest.raises(DtmError, match="prompts.jsonl"):
    paired.compare(a, b, resamples=10, copy_threshold=0.5)
  from dtm import data
  data.write_prompt_jsonl(tmp_path / "a" / "prompts.jsonl",
                          np.array([[1, 2, 3, 1], [1, 2, 3, 4], [5, 6, 5, 6]]))
  data.write_prompt_jsonl(tmp_path / "a" / "references.jsonl",
                          np.array([[2, 3, 1, 2], [5, 6, 7, 8], [5, 9, 8, 7]]))
  r = paired.compare(a, b, resamples=10, copy_threshold=0.5)
  # prompt 0 copies (share 1.0); prompt 1 does not (0.0); prompt 2: 5 then 9 -> 0.25
  assert r["strata"]["copy"]["prompts"] == 1 and r["strata"]["rest"]["prompts"] == 2
  assert r["strata"]["copy"]["fdt_mean"] == {"a": 4.0, "b": 1.0}
  assert r["strata"]["rest"]["fdt_mean"] == {"a": 0.5, "b": 2.5}
  assert paired.main([a, b, "--resamples", "10", "--copy-threshold", "0.5"]) == 0
  assert "copy" in capsys.readouterr().out
  assert paired.main([a, b, "--copy-threshold", "0"]) == 2
  assert "--copy-threshold" in capsys.readouterr().err


def test_pooling_held_out_sets(tmp_path, capsys):
  s1 = {"prompt_source": "text", "num_prompts": 2, "prompt_length": 8, "new_tokens": 4,
        "bos_id": None, "prompt_seed": 1}
  s2 = {**s1, "prompt_seed": 2}
  a1 = _write(tmp_path / "a1.json", _per_prompt([0, 4]), s1)
  b1 = _write(tmp_path / "b1.json", _per_prompt([1, 4]), s1)
  a2 = _write(tmp_path / "a2.json", _per_prompt([2, 2], seed=3), s2)
  b2 = _write(tmp_path / "b2.json", _per_prompt([2, 3], seed=4), s2)
  r = paired.compare(f"{a1},{a2}", [b1, b2], resamples=50)
  assert r["prompts"] == 4
  assert r["bootstrap"]["fdt_mean"]["a"] == 2.0 and r["bootstrap"]["fdt_mean"]["b"] == 2.5
  assert paired.main([f"{a1},{a2}", f"{b1},{b2}", "--resamples", "20"]) == 0
  capsys.readouterr()
  with pytest.raises(DtmError, match="same number"):
    paired.compare(f"{a1},{a2}", b1)
  with pytest.raises(DtmError, match="twice"):
    paired.compare(f"{a1},{a1}", f"{b1},{b1}")
  with pytest.raises(DtmError, match="different prompts"):
    paired.compare(f"{a1},{a2}", f"{b2},{b1}")
  assert paired.main([f"{a1},{a2}", b1]) == 2
  assert "same number" in capsys.readouterr().err
