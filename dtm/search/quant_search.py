"""The paper's quantization search tree: the largest share of linear parameters that can be
quantized while the held-out FDT_α stays at or above a bound.

Given a ranking of the components (most harmless first: by their single-component probe
FDT error, or by DPPL, KL, or a seeded random order for comparison) and one or more
methods applied in stages (e.g. int4 first, then int8 for what int4 could not take):

  accepted = {}                                  # component -> method
  for method in stages:
    for comp in ranking(method) not in accepted:
      candidate = accepted + {comp: method}
      if FDT_α(held-out, candidate) >= bound:    # one DTM pass of the combined model
        accepted = candidate                     # descend
      else:
        rejected += 1                            # backtrack: drop comp, branch to the next
        if rejected in a row == patience: next stage

`search` is a pure function of the ranking, the bound and an `evaluate(spec_text) ->
aggregate` callback. The job memoizes `evaluate` in an append-only store keyed by the
canonical spec, so a killed run replays the same decisions from the store and ends with
the same recipe; searches with other bounds or rankings reuse every configuration they
share.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from dtm import compress
from dtm.components import KINDS, Component, parse_component
from dtm.errors import DtmError

RANKINGS: tuple[str, ...] = ("fdt", "dppl", "kl", "random")


def spec_text(assignment: Mapping[Component, str]) -> str:
  """{Component: method text} -> canonical spec string (one rule per component)."""
  rules = [f"{c.kind}@{c.layer}:{m}" for c, m in sorted(assignment.items())]
  return compress.parse_spec("; ".join(rules)).to_string()


def rank(probe_rows: Sequence[Mapping], by: str, alpha: float, seed: int = 0) -> list[str]:
  """Component names, most harmless first, from single-component probe aggregates.

  probe_rows: {'component': name, 'aggregate': {...}} per component (one method level).
  by 'fdt': FDT_α descending, then mean FDT descending, then DPPL ascending; 'dppl':
  DPPL ascending; 'kl': mean KL(F‖F') ascending; 'random': a permutation seeded by
  `seed`. Ties always end in the component's (layer, kind) order, so rankings are
  deterministic.
  """
  if by not in RANKINGS:
    raise DtmError(f"search ranking must be one of {', '.join(RANKINGS)}, got {by!r}")
  rows = sorted(probe_rows, key=lambda r: _order(r["component"]))
  if by == "random":
    perm = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i]["component"] for i in perm]
  def key(r):
    a = r["aggregate"]
    if by == "fdt":
      return (-a[f"fdt_alpha_{alpha:g}"], -a["fdt_mean"], a["dppl"])
    if by == "dppl":
      return (a["dppl"],)
    if "kl_mean" not in a:
      raise DtmError("ranking by KL needs probes with kl=True")
    return (a["kl_mean"],)
  return [r["component"] for r in sorted(rows, key=key)]  # stable: ties keep layer order


def _order(name: str):
  c = parse_component(name)
  return c.layer, KINDS.index(c.kind)


@dataclasses.dataclass
class SearchResult:
  assignment: dict[Component, str]      # component -> method text
  spec: str                             # canonical spec of the recipe
  share: float                          # fraction of linear parameters quantized
  aggregate: dict                       # held-out aggregate of the recipe (the last accepted)
  steps: list[dict]                     # one per evaluated configuration, in order


def search(stages: Sequence[tuple[str, Sequence[str]]], numel: Mapping[str, int], total: int,
           evaluate: Callable[[str], dict], *, alpha: float, bound: float, patience: int,
           base_aggregate: dict, max_evals: int | None = None) -> SearchResult:
  """Run the search tree (module docstring).

  stages: (method text, component names in rank order) per stage; numel: component name
  -> parameter count; total: parameter count of all linear components (the share's
  denominator). evaluate(spec) -> held-out aggregate with 'fdt_alpha_<alpha>'.
  patience: consecutive rejections that end a stage (0 = try every component).
  max_evals: stop after this many evaluations (None = no limit).
  """
  key = f"fdt_alpha_{alpha:g}"
  accepted: dict[Component, str] = {}
  agg = dict(base_aggregate)
  steps: list[dict] = []
  for method, order in stages:
    streak = 0
    for name in order:
      comp = parse_component(name)
      if comp in accepted:
        continue
      if max_evals is not None and len(steps) >= max_evals:
        break
      candidate = {**accepted, comp: method}
      text = spec_text(candidate)
      result = evaluate(text)
      ok = result[key] >= bound
      steps.append({"step": len(steps), "component": name, "method": method, "spec": text,
                    "accepted": bool(ok), key: result[key], "dppl": result["dppl"],
                    "share": _share(candidate if ok else accepted, numel, total)})
      if ok:
        accepted, agg, streak = candidate, result, 0
      else:
        streak += 1
        if patience and streak >= patience:
          break
  return SearchResult(accepted, spec_text(accepted) if accepted else "none",
                      _share(accepted, numel, total), agg, steps)


def _share(assignment: Mapping[Component, str], numel: Mapping[str, int], total: int) -> float:
  return sum(numel[c.name] for c in assignment) / total
