"""Figures of a pruning search: per-component sparsity heatmap (the paper's figure of the
final FDT-pruned model) and held-out metrics against overall sparsity, per round."""
from __future__ import annotations

import numpy as np

from dtm.components import KINDS, parse_component


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def sparsity_grid(per_component: dict[str, float]) -> np.ndarray:
  """float [L, 7]: fraction of zeros of each (layer, kind), kinds in KINDS order."""
  comps = [parse_component(name) for name in per_component]
  grid = np.zeros((max(c.layer for c in comps) + 1, len(KINDS)))
  for c, (_, v) in zip(comps, per_component.items()):
    grid[c.layer, KINDS.index(c.kind)] = v
  return grid


def sparsity_heatmap(path: str, per_component: dict[str, float], title: str) -> None:
  """Rows: layers, columns: q, k, v, o, gate, up, down; colour: fraction pruned."""
  plt = _pyplot()
  grid = sparsity_grid(per_component)
  num_layers = grid.shape[0]
  fig, ax = plt.subplots(figsize=(4.8, max(3.0, 0.22 * num_layers + 1.4)))
  im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                 interpolation="nearest")
  ax.set_xticks(range(len(KINDS)), KINDS)
  step = 1 if num_layers <= 32 else 2
  ax.set_yticks(range(0, num_layers, step))
  ax.set_xlabel("component")
  ax.set_ylabel("layer")
  if num_layers <= 40:
    for (l, k), v in np.ndenumerate(grid):
      ax.text(k, l, f"{v:.2f}".lstrip("0") if v < 1 else "1", ha="center", va="center",
              fontsize=5, color="white" if v < 0.6 else "black")
  fig.colorbar(im, ax=ax, label="sparsity")
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def curves(path: str, records: list[dict], alphas, new_tokens: int, title: str) -> None:
  """Held-out FDT_α (each α), DPPL and perplexity against overall linear sparsity, one
  point per round (round 0: the original model)."""
  plt = _pyplot()
  x = [r["sparsity"] for r in records]
  panels = [("FDT_α (tokens)", [(f"α={a:g}", [r["heldout"][f"fdt_alpha_{a:g}"] for r in records])
                               for a in alphas]),
            ("DPPL", [("DPPL", [r["heldout"]["dppl"] for r in records])])]
  if all("ppl" in r["heldout"] for r in records):
    panels.append(("perplexity", [("PPL", [r["heldout"]["ppl"] for r in records])]))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4))
  for ax, (label, series) in zip(np.atleast_1d(axes), panels):
    for name, y in series:
      ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel("overall sparsity of linear kernels")
    ax.set_ylabel(label)
    if label.startswith("FDT"):
      ax.set_ylim(-0.5, new_tokens + 0.5)
      ax.legend(fontsize=7)
    else:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def prediction(path: str, candidates: list[dict], model: str) -> None:
  """One panel per allocation cost: the additive model's predicted cost of each candidate
  allocation (sum of single-component probe costs) against the cost measured on the
  combined model (same prompts), with the y = x line."""
  plt = _pyplot()
  costs = sorted({c["cost"] for c in candidates} | set(candidates[0]["predicted"]))
  fig, axes = plt.subplots(1, len(costs), figsize=(3.0 * len(costs) + 1.0, 3.2),
                           layout="constrained")
  for ax, cost in zip(np.atleast_1d(axes), costs):
    for unit, marker in (("component", "o"), ("layer", "s")):
      pts = [(c["predicted"][cost], c["measured"][cost], c["target"]) for c in candidates
             if c["unit"] == unit and cost in c["predicted"]]
      if pts:
        x, y, t = zip(*pts)
        sc = ax.scatter(x, y, c=t, cmap="viridis", marker=marker, s=18, label=f"per {unit}",
                        vmin=0, vmax=1)
    lim = [0, max([max(c["predicted"][cost], c["measured"][cost]) for c in candidates] + [1e-9])]
    ax.plot(lim, lim, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("predicted: sum of single probes", fontsize=8)
    ax.set_ylabel("measured on the combined model", fontsize=8)
    ax.set_title(f"cost {cost}", fontsize=9)
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].legend(fontsize=7)
  fig.colorbar(sc, ax=np.atleast_1d(axes).tolist(), label="target sparsity", shrink=0.9)
  fig.suptitle(f"{model}: does the sum of single-component costs predict the combined model?",
               fontsize=9)
  fig.savefig(path, dpi=120)
  plt.close(fig)
