"""Paired comparison of two compressed models on the same held-out prompts.

Two evaluate-job results (`results.json` with `per_prompt`) of models A and B against the
same F on the same prompts and references: how the per-prompt FDT distributions differ,
and whether a difference in mean FDT, SDT or DPPL is larger than the prompts' sampling
noise (a paired bootstrap over prompts: both models are scored on the same resampled
prompts, so the prompt-to-prompt spread common to both cancels).

  python -m dtm.paired runs/eval-a/results.json runs/eval-b/results.json [--resamples 10000]
      [--copy-threshold 0.5]
  python -m dtm.paired eval-s1-a/results.json,eval-s2-a/results.json \
      eval-s1-b/results.json,eval-s2-b/results.json      (two held-out sets, pooled)

--copy-threshold splits the prompts by how F continues them: a prompt is a *copy* prompt
when an induction rule (the next token is the one that followed the previous token's most
recent earlier occurrence) predicts at least that share of F's first 8 continuation tokens
(repetition loops, lists, names repeated from the prompt). The split needs the evaluate
job's prompts.jsonl and references.jsonl beside A's results.json.

Mean FDT is heavy-tailed when most prompts diverge early: at 50 % sparsity on SmolLM2 the
median FDT is 1 of 32 and a single prompt that survives all 32 tokens moves a 128-prompt
mean by 0.25, so its noise is far larger than that of DPPL, which every position of every
prompt contributes to.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Mapping, Sequence

import numpy as np

from dtm import data
from dtm.errors import DtmError

# Statistic name -> function of per-prompt arrays (fdt [P], sdt [P], nll [P, N]).
STATISTICS: dict[str, Callable[[Mapping[str, np.ndarray]], float]] = {
    "fdt_mean": lambda d: float(np.mean(d["fdt"])),
    # the share of prompts whose first generated token agrees (FDT >= 1): S(1)
    "fdt_ge_1": lambda d: float(np.mean(np.asarray(d["fdt"]) >= 1)),
    "sdt_mean": lambda d: float(np.mean(d["sdt"])),
    "dppl": lambda d: float(np.exp(np.mean(d["nll"]))),
}


def fdt_profile(fdt: Sequence[int], new_tokens: int) -> dict[str, float]:
  """Shape of one model's per-prompt FDT distribution.

  Args:
    fdt: int [P], each in 0..new_tokens (new_tokens = no divergence).
    new_tokens: N, the continuation length.
  Returns mean, median, the share of prompts diverging at the first token (FDT = 0) and
  reproducing all N tokens (FDT = N), and the share of the mean contributed by the
  prompts with FDT >= 8 ("tail_share").
  """
  f = np.asarray(fdt, np.float64).reshape(-1)
  if f.size == 0:
    raise DtmError("fdt_profile needs at least one prompt")
  total = float(np.sum(f))
  return {"mean": float(np.mean(f)), "median": float(np.median(f)),
          "first_token": float(np.mean(f == 0)), "all_tokens": float(np.mean(f == new_tokens)),
          "tail_share": float(np.sum(f[f >= 8]) / total) if total > 0 else 0.0}


def induction_share(prompt: Sequence[int], continuation: Sequence[int], n: int = 8) -> float:
  """Share of the first n continuation tokens an induction rule predicts.

  The rule predicts token t as the token that followed the most recent earlier occurrence
  of token t-1 in the context (prompt, then the continuation so far); no earlier
  occurrence predicts nothing. 1.0: the continuation copies (a loop, or text repeated from
  the prompt); about 0 for fresh text.

  Args:
    prompt: int [C] token ids; continuation: int [N] token ids (F's greedy continuation);
    n: how many continuation tokens are scored (min(n, N)).
  """
  ctx = [int(t) for t in prompt]
  cont = [int(t) for t in continuation][:n]
  if not ctx or not cont:
    raise DtmError("induction_share needs a non-empty prompt and continuation")
  last = {}  # token -> index of its most recent occurrence before the context's last token
  for i, t in enumerate(ctx[:-1]):
    last[t] = i
  hits = 0
  for t in cont:
    j = last.get(ctx[-1])
    hits += j is not None and ctx[j + 1] == t
    last[ctx[-1]] = len(ctx) - 1
    ctx.append(t)
  return hits / len(cont)


def copy_prompts(results_path: str, threshold: float, n: int = 8) -> np.ndarray:
  """bool [P]: the prompts whose F continuation is copied (induction_share >= threshold),
  from the prompts.jsonl and references.jsonl beside an evaluate job's results.json."""
  d = os.path.dirname(os.path.abspath(results_path))
  files = [os.path.join(d, f) for f in ("prompts.jsonl", "references.jsonl")]
  for f in files:
    if not os.path.exists(f):
      raise DtmError(f"--copy-threshold needs {f} (the evaluate job writes it beside "
                     "results.json)")
  prompts, refs = (data.read_prompt_jsonl(f) for f in files)
  if len(prompts) != len(refs):
    raise DtmError(f"{files[0]} has {len(prompts)} prompts, {files[1]} {len(refs)} references")
  return np.array([induction_share(p, r, n) >= threshold for p, r in zip(prompts, refs)])


def paired_bootstrap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], statistic: str,
                     resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
  """stat(B) - stat(A) and its 95 % percentile interval over prompts resampled with
  replacement (the same resample for both models).

  Args:
    a, b: per-prompt arrays 'fdt' [P], 'sdt' [P], 'nll' [P, N] of the same P prompts.
    statistic: a key of STATISTICS.
  Returns {'a', 'b', 'diff', 'lo', 'hi', 'p_le_0'}: p_le_0 is the share of resamples in
  which B - A <= 0 (a one-sided bootstrap p-value for "B is larger").
  """
  if statistic not in STATISTICS:
    raise DtmError(f"unknown statistic {statistic!r}; expected one of {', '.join(STATISTICS)}")
  fn = STATISTICS[statistic]
  p = len(np.asarray(a["fdt"]).reshape(-1))
  rng = np.random.default_rng(seed)
  diffs = np.empty(resamples)
  for i in range(resamples):
    idx = rng.integers(0, p, size=p)
    diffs[i] = fn({k: np.asarray(v)[idx] for k, v in b.items()}) - fn(
        {k: np.asarray(v)[idx] for k, v in a.items()})
  lo, hi = np.percentile(diffs, [2.5, 97.5])
  va, vb = fn(a), fn(b)
  return {"a": va, "b": vb, "diff": vb - va, "lo": float(lo), "hi": float(hi),
          "p_le_0": float(np.mean(diffs <= 0))}


def load(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """An evaluate job's results.json -> (per-prompt arrays, its settings)."""
  try:
    with open(path) as f:
      r = json.load(f)
  except FileNotFoundError:
    raise DtmError(f"no results file at {path}") from None
  except json.JSONDecodeError as e:
    raise DtmError(f"{path} is not valid JSON ({e})") from None
  if "per_prompt" not in r:
    raise DtmError(f"{path} has no per-prompt metrics (it must be an evaluate job's "
                   "results.json)")
  pp = r["per_prompt"]
  return ({"fdt": np.asarray(pp["fdt"], np.int64), "sdt": np.asarray(pp["sdt"], np.float64),
           "nll": np.asarray(pp["nll"], np.float64)}, r.get("settings", {}))


def _load_pair(path_a: str, path_b: str):
  a, set_a = load(path_a)
  b, set_b = load(path_b)
  if a["nll"].shape != b["nll"].shape:
    raise DtmError(f"{path_a} and {path_b} score different prompt sets "
                   f"({a['nll'].shape[0]} x {a['nll'].shape[1]} against "
                   f"{b['nll'].shape[0]} x {b['nll'].shape[1]} prompts x tokens)")
  keys = ("prompt_source", "num_prompts", "prompt_length", "new_tokens", "bos_id", "prompt_seed")
  pa, pb = ({k: s.get(k) for k in keys} for s in (set_a, set_b))
  if pa != pb:
    raise DtmError(f"{path_a} and {path_b} were evaluated on different prompts "
                   f"({pa} against {pb})")
  return a, b, pa


def _paths(p: str | Sequence[str]) -> list[str]:
  return [x for x in p.split(",") if x] if isinstance(p, str) else list(p)


def compare(path_a: str | Sequence[str], path_b: str | Sequence[str], resamples: int = 10_000,
            seed: int = 0, copy_threshold: float | None = None) -> dict:
  """Both models' FDT profiles and the paired bootstrap of every statistic (B - A); with
  copy_threshold, also mean FDT and DPPL of the copy prompts and the rest ('strata').

  path_a / path_b: one results.json each, or equally long lists (or comma-separated
  strings) of results of several held-out sets, pooled: the i-th files of A and B must
  score the same prompts, and no prompt set may appear twice.
  """
  paths_a, paths_b = _paths(path_a), _paths(path_b)
  if not paths_a or len(paths_a) != len(paths_b):
    raise DtmError(f"A and B need the same number of results files (one per held-out set), "
                   f"got {len(paths_a)} and {len(paths_b)}")
  pairs = [_load_pair(pa, pb) for pa, pb in zip(paths_a, paths_b)]
  seen = []
  for (_, _, settings), pa in zip(pairs, paths_a):
    if settings in seen:
      raise DtmError(f"{pa} scores the same prompts as an earlier file; pooling it would "
                     "count them twice")
    seen.append(settings)
  widths = {p[0]["nll"].shape[1] for p in pairs}
  if len(widths) > 1:
    raise DtmError(f"the pooled sets have different continuation lengths {sorted(widths)}")
  a = {k: np.concatenate([p[0][k] for p in pairs]) for k in pairs[0][0]}
  b = {k: np.concatenate([p[1][k] for p in pairs]) for k in pairs[0][1]}
  n = a["nll"].shape[1]
  out = {"a": ",".join(paths_a), "b": ",".join(paths_b), "prompts": int(a["nll"].shape[0]),
         "new_tokens": int(n),
         "profile": {"a": fdt_profile(a["fdt"], n), "b": fdt_profile(b["fdt"], n)},
         "bootstrap": {s: paired_bootstrap(a, b, s, resamples, seed) for s in STATISTICS},
         "resamples": resamples}
  if copy_threshold is not None:
    masks = []
    for pa, (pair_a, _, _) in zip(paths_a, pairs):
      m = copy_prompts(pa, copy_threshold)
      if m.size != pair_a["fdt"].size:
        raise DtmError(f"prompts.jsonl beside {pa} has {m.size} prompts, its results "
                       f"{pair_a['fdt'].size}")
      masks.append(m)
    mask = np.concatenate(masks)
    out["copy_threshold"] = copy_threshold
    out["strata"] = {name: _stratum(a, b, m) for name, m in (("copy", mask), ("rest", ~mask))}
  return out


def _stratum(a, b, mask) -> dict:
  pick = lambda d: {k: np.asarray(v)[mask] for k, v in d.items()}  # noqa: E731
  sa, sb = pick(a), pick(b)
  r = {"prompts": int(mask.sum())}
  if mask.any():
    for s in ("fdt_mean", "dppl"):
      r[s] = {"a": STATISTICS[s](sa), "b": STATISTICS[s](sb)}
  return r


def format_report(r: dict) -> str:
  lines = [f"A: {r['a']}", f"B: {r['b']}",
           f"{r['prompts']} prompts x {r['new_tokens']} tokens; paired bootstrap, "
           f"{r['resamples']} resamples",
           "", f"{'FDT':<14}{'mean':>8}{'median':>8}{'FDT=0':>8}{'FDT=N':>8}{'>=8 share':>11}"]
  for k in ("a", "b"):
    p = r["profile"][k]
    lines.append(f"{k.upper():<14}{p['mean']:>8.2f}{p['median']:>8.1f}{p['first_token']:>8.3f}"
                 f"{p['all_tokens']:>8.3f}{p['tail_share']:>11.2f}")
  lines += ["", f"{'statistic':<14}{'A':>9}{'B':>9}{'B - A':>9}{'95 % interval':>22}"
                f"{'P(B-A<=0)':>11}"]
  for s, v in r["bootstrap"].items():
    lines.append(f"{s:<14}{v['a']:>9.3f}{v['b']:>9.3f}{v['diff']:>9.3f}"
                 f"{'[' + format(v['lo'], '.3f') + ', ' + format(v['hi'], '.3f') + ']':>22}"
                 f"{v['p_le_0']:>11.3f}")
  if "strata" in r:
    lines += ["", f"copy prompts: induction share of F's first 8 tokens >= {r['copy_threshold']}",
              f"{'prompts':<14}{'count':>7}{'FDT A':>9}{'FDT B':>9}{'B - A':>9}{'DPPL A':>9}"
              f"{'DPPL B':>9}"]
    for name, v in r["strata"].items():
      if v["prompts"] == 0:
        lines.append(f"{name:<14}{0:>7}")
        continue
      f, d = v["fdt_mean"], v["dppl"]
      lines.append(f"{name:<14}{v['prompts']:>7}{f['a']:>9.3f}{f['b']:>9.3f}"
                   f"{f['b'] - f['a']:>9.3f}{d['a']:>9.3f}{d['b']:>9.3f}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m dtm.paired", description=__doc__.split("\n")[0])
  ap.add_argument("a", help="results.json of model A (an evaluate job); several held-out "
                              "sets pooled: comma-separated")
  ap.add_argument("b", help="results.json of model B, same prompts and references (the same "
                              "number of files, in the same order)")
  ap.add_argument("--resamples", type=int, default=10_000)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--copy-threshold", type=float, default=None,
                  help="also split the prompts into copy prompts (induction share of F's "
                       "first 8 tokens >= this) and the rest")
  ap.add_argument("--json", default="", help="also write the comparison to this file")
  args = ap.parse_args(argv)
  try:
    if args.resamples < 1:
      raise DtmError(f"--resamples must be >= 1, got {args.resamples}")
    if args.copy_threshold is not None and not 0 < args.copy_threshold <= 1:
      raise DtmError(f"--copy-threshold must be in (0, 1], got {args.copy_threshold}")
    r = compare(args.a, args.b, args.resamples, args.seed, args.copy_threshold)
  except DtmError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_report(r))
  if args.json:
    from dtm import io_utils
    io_utils.atomic_write_json(args.json, r)
  return 0


if __name__ == "__main__":
  sys.exit(main())
