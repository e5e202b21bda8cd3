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
  """Rows: components (layer-major), columns: levels, colour: FDT_α (the paper's figure)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  key = f"fdt_alpha_{alpha:g}"
  comps = sorted({r["component"] for r in rows}, key=_order)
  levels = sorted({r["level"] for r in rows})
  grid = np.full((len(comps), len(levels)), np.nan)
  for r in rows:
    grid[comps.index(r["component"]), levels.index(r["level"])] = r[key]
  height = max(4.0, 0.09 * len(comps) + 1.5)
  fig, ax = plt.subplots(figsize=(2.0 + 0.8 * len(levels), height))
  im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max_fdt,
                 interpolation="nearest")
  ax.set_xticks(range(len(levels)), [f"{l:g}" for l in levels])
  step = max(1, len(comps) // 60)
  ax.set_yticks(range(0, len(comps), step), comps[::step], fontsize=6)
  ax.set_xlabel("level")
  ax.set_ylabel("component")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label=f"FDT$_{{{alpha:g}}}$ (tokens)")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
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
