"""Sweep outputs: summary table, FDT_α heatmap, compression candidates."""
from __future__ import annotations

import csv
import os

import numpy as np

from dtm.components import KINDS, block_of, parse_component


def summary_rows(records: list[dict], alphas) -> list[dict]:
  rows = []
  for r in records:
    row = {"component": r["component"], "level": r["level"], "method": r["method"],
           "sparsity": r["sparsity"]}
    row.update(r["aggregate"])
    rows.append(row)
  return sorted(rows, key=lambda x: (_order(x["component"]), x["level"]))


def _order(name: str):
  c = parse_component(name)
  return c.layer, KINDS.index(c.kind)


def write_csv(path: str, rows: list[dict]) -> None:
  keys = list(rows[0]) if rows else []
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


def candidates(rows: list[dict], alpha: float, min_fdt: float, descending: bool) -> dict:
  """Per component: the most aggressive level whose FDT_α >= min_fdt (None if none).
  Levels are more aggressive when larger (sparsity) or smaller (bits: descending=True)."""
  key = f"fdt_alpha_{alpha:g}"
  out = {}
  for row in rows:
    comp = row["component"]
    out.setdefault(comp, None)
    if row[key] >= min_fdt:
      best = out[comp]
      better = best is None or (row["level"] < best if descending else row["level"] > best)
      if better:
        out[comp] = row["level"]
  return out


def candidate_shares(cands: dict, levels, descending: bool) -> list[dict]:
  """How many components reach each level, per kind, per block and overall.

  cands: component name -> its candidate level (or None), as `candidates` returns; a
  component counts for level L when its candidate is at least as aggressive as L. Rows:
  one per kind present, then 'attention (q,k,v,o)', 'mlp (gate,up,down)' and 'all', each
  {"group", "components", "reach": {level: count}}.
  """
  def reaches(c, level):
    return c is not None and (c <= level if descending else c >= level)

  parsed = [(parse_component(name), c) for name, c in cands.items()]
  groups = [(k, lambda comp, k=k: comp.kind == k) for k in KINDS
            if any(comp.kind == k for comp, _ in parsed)]
  groups += [("attention (q,k,v,o)", lambda comp: block_of(comp.kind) == "attn"),
             ("mlp (gate,up,down)", lambda comp: block_of(comp.kind) == "mlp"),
             ("all", lambda comp: True)]
  rows = []
  for name, member in groups:
    sel = [c for comp, c in parsed if member(comp)]
    rows.append({"group": name, "components": len(sel),
                 "reach": {float(lv): sum(reaches(c, lv) for c in sel) for lv in levels}})
  return rows


def shares_table(rows: list[dict], descending: bool) -> str:
  """Text table of `candidate_shares`: count and share of components per level."""
  levels = list(rows[0]["reach"]) if rows else []
  op = "<=" if descending else ">="
  head = f"{'group':<22}{'components':>11}" + "".join(f"{op + format(lv, 'g'):>16}"
                                                      for lv in levels)
  lines = [head]
  for r in rows:
    cells = "".join(f"{r['reach'][lv]:>7} ({r['reach'][lv] / max(r['components'], 1):5.1%})"
                    for lv in levels)
    lines.append(f"{r['group']:<22}{r['components']:>11}{cells}")
  return "\n".join(lines)


def heatmap(path: str, rows: list[dict], alpha: float, max_fdt: int, title: str) -> None:
  """The paper's probing figure: one panel per level; in each, rows are layers,
  columns are component kinds, colour is FDT_α (tokens reproduced by α of prompts).
  Components that were not probed stay blank."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  key = f"fdt_alpha_{alpha:g}"
  comps = [parse_component(r["component"]) for r in rows]
  layers = sorted({c.layer for c in comps})
  kinds = [k for k in KINDS if any(c.kind == k for c in comps)]
  levels = sorted({r["level"] for r in rows})
  grid = np.full((len(levels), len(layers), len(kinds)), np.nan)
  for r, c in zip(rows, comps):
    grid[levels.index(r["level"]), layers.index(c.layer), kinds.index(c.kind)] = r[key]
  width = 1.0 + (0.32 * len(kinds) + 0.35) * len(levels)
  height = 1.6 + 0.16 * len(layers)
  fig, axes = plt.subplots(1, len(levels), figsize=(max(width, 4.0), max(height, 3.0)),
                           squeeze=False, sharey=True)
  for i, (ax, level) in enumerate(zip(axes[0], levels)):
    im = ax.imshow(grid[i], aspect="auto", cmap="viridis", vmin=0, vmax=max_fdt,
                   interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=90, fontsize=7)
    ax.set_title(f"{level:g}", fontsize=8)
    if i == 0:
      step = max(1, len(layers) // 32)
      ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]], fontsize=6)
      ax.set_ylabel("layer")
  fig.suptitle(title, fontsize=9)
  fig.colorbar(im, ax=axes[0].tolist(), label=f"FDT$_{{{alpha:g}}}$ (tokens)", shrink=0.8)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def text_table(rows: list[dict], alpha: float, levels: list[float], limit: int = 12) -> str:
  """Components ranked by mean FDT_α over levels: most and least sensitive."""
  key = f"fdt_alpha_{alpha:g}"
  by_comp: dict[str, dict] = {}
  for r in rows:
    by_comp.setdefault(r["component"], {})[r["level"]] = r[key]
  ranked = sorted(by_comp.items(), key=lambda kv: np.mean(list(kv[1].values())))
  head = f"{'component':<10}" + "".join(f"{l:>8g}" for l in levels)
  lines = [f"FDT_{alpha:g} by level (most sensitive first)", head]
  show = ranked if len(ranked) <= 2 * limit else ranked[:limit] + [None] + ranked[-limit:]
  for item in show:
    if item is None:
      lines.append("...")
      continue
    comp, vals = item
    lines.append(f"{comp:<10}" + "".join(f"{vals.get(l, float('nan')):>8.0f}" for l in levels))
  return "\n".join(lines)


# ------------------------------------------------------------------ compare job outputs


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n of x, ties given their average rank (as scipy.stats.rankdata)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  sorted_x = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  return ranks


def spearman(a, b) -> float | None:
  """Spearman rank correlation of two equal-length sequences (average ranks for ties);
  None when fewer than 3 values or a sequence is constant (undefined)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) != len(b):
    raise ValueError(f"spearman: lengths differ ({len(a)} vs {len(b)})")
  if len(a) < 3:
    return None
  ra, rb = _ranks(a), _ranks(b)
  if np.std(ra) == 0 or np.std(rb) == 0:
    return None
  return float(np.corrcoef(ra, rb)[0, 1])


def rank_correlations(rows: list[dict], names: list[str]) -> dict[str, dict[str, float | None]]:
  """{metric: {metric: Spearman across rows}} for the metrics `names` of `rows`."""
  return {m: {k: spearman([r[m] for r in rows], [r[k] for r in rows]) for k in names}
          for m in names}


def _fmt(v, digits: int = 2) -> str:
  return "-" if v is None else f"{v:.{digits}f}"


def compare_table(rows: list[dict], domains: list[str], alphas, correlations: dict,
                  cross: dict) -> str:
  """Text summary of the compare job: one line per (compression, domain), then the rank
  correlations per domain and across domains."""
  cols = [f"fdt_alpha_{a:g}" for a in alphas] + ["fdt_mean", "sdt_mean", "dppl", "ppl"]
  sampled = [c for c in ("sampled_fdt_mean", "sampled_sdt_mean", "task_acc_mean") if c in rows[0]]
  head = ["compression", "domain"] + cols + sampled
  lines = [head]
  for r in rows:
    lines.append([r["compression"], r["domain"]] + [_fmt(r.get(c)) for c in cols + sampled])
  widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
  out = ["  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w)
                   for i, (v, w) in enumerate(zip(l, widths))) for l in lines]
  for name in domains:
    corr = correlations[name]
    ms = list(corr)
    out.append(f"\nSpearman rank correlation across compressions, domain {name}:")
    w = max(len(m) for m in ms)
    short = [m.replace("sampled_", "s.").replace("fdt_alpha_", "fdt@").replace("_mean", "")
             .replace("task_acc", "acc")
             for m in ms]
    out.append(" " * w + "  " + "  ".join(m[:10].rjust(10) for m in short))
    for m in ms:
      out.append(m.ljust(w) + "  " + "  ".join(_fmt(corr[m][k]).rjust(10) for k in ms))
  if cross:
    out.append(f"\nSpearman across compressions, {domains[0]} vs {domains[1]}: " +
               ", ".join(f"{m} {_fmt(v)}" for m, v in cross.items()))
  return "\n".join(out)
