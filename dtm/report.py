"""Sweep outputs: summary table, FDT_α heatmap, compression candidates."""
from __future__ import annotations

import csv
import os

import numpy as np

from dtm.components import KINDS, parse_component


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
