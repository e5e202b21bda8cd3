"""FDT-guided iterative pruning (Deiseroth et al. 2023, arXiv 2311.01544, Sec. 5).

The model of round r is the original F (or a start recipe applied to it) with
per-component sparsity levels (`levels`: Component -> rate; `spec_of` is the one place
that turns them into a spec), pruned and trained round by round. The operator of an
increment is magnitude (the paper, described below) or a calibrated one, Wanda or
SparseGPT, with the current model's statistics (`dtm.search.increments`). Round r:

  1. candidates: every prunable component not at the top of the ladder, at its next level;
  2. probe every candidate on the CURRENT (pruned, trained) model against the references
     y = greedy(F, p, N) of the ORIGINAL model on the selection prompts (`probe.ProbeRunner`
     with the current params as its base: one component compressed per probe);
  3. choose the k candidates with the highest FDT_α (ties: lower SDT, then lower DPPL,
     then component order; or the lowest KL, `rank_by`), fewer in the round that
     reaches the target sparsity (`to_target`);
  4. apply them: magnitude on the current trained weights (pruned zeros have |w| = 0, the
     lowest magnitudes, so they stay zero), then T steps of continued training
     (`dtm.train.trainer.train`, KL distillation from F, masks keep every zero);
  5. evaluate the whole model on held-out prompts (`evaluation.HeldOut`): FDT_α, mean FDT,
     SDT, DPPL, perplexity, and the overall sparsity of the linear kernels.

Stop when the overall sparsity reaches the target, when held-out FDT_α falls below the
bound, when `max_rounds` rounds are done, or when every component is at the top.

Crash safety (workdir layout):
  rounds.jsonl            one record per committed round (round 0 = the original model),
                          appended with write + fsync exactly once;
  rounds/rNNN/probe/      the round's probes (`sweep_store.ProbeStore`, resumable);
  rounds/rNNN/train/      the trainer's workdir (orbax checkpoints, resumable);
  rounds/rNNN/model/      the round's model (a dtm model directory), saved before its
                          record is committed; the next round starts from it.
A run killed at any moment and restarted continues and ends with the same records.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dtm import checkpoint, compress, io_utils
from dtm.components import KINDS, Component, get_path, kernel_path, parse_component
from dtm.search import increments
from dtm.search.round_log import RoundLog, check_identity  # noqa: F401 (the search's records)
from dtm.errors import DtmError
from dtm.sweep_store import ProbeStore
from dtm.train import trainer

log = logging.getLogger("dtm")

@dataclasses.dataclass(frozen=True)
class PruneSettings:
  """What defines a search (all validated by `validate_settings`).

  ladder: increasing magnitude rates in (0, 1), the levels a component climbs one at a time;
  k: increments applied per round; alpha: the α of the FDT_α that ranks candidates and is
  checked against `fdt_bound` on the held-out prompts (stop when FDT_α < bound, 0 = never);
  target_sparsity: stop once the fraction of zeros in all linear kernels reaches it;
  max_rounds: at most this many pruning rounds; components: the prunable components;
  operator: what an increment does (`increments.Operator`: magnitude, wanda, sparsegpt);
  rank_by: 'fdt' (the paper: highest FDT_α, then lowest SDT, then DPPL) or 'kl' (lowest
  mean KL(F||F') of the candidate per weight its increment zeroes, then highest FDT_α).
  """
  ladder: tuple[float, ...]
  k: int
  alpha: float
  fdt_bound: float
  target_sparsity: float
  max_rounds: int
  components: tuple[Component, ...]
  operator: increments.Operator = increments.Operator()
  rank_by: str = "fdt"


RANK_BY = ("fdt", "kl")


def validate_settings(s: PruneSettings, new_tokens: int) -> None:
  """One DtmError per bad setting; `new_tokens` is N of the held-out prompts."""
  ladder = list(s.ladder)
  if not ladder:
    raise DtmError("prune.ladder is empty: give increasing rates, e.g. (0.25, 0.5, 0.75)")
  if any(not 0 < x < 1 for x in ladder):
    raise DtmError(f"prune.ladder rates must lie in (0, 1), got {tuple(ladder)}")
  if any(b <= a for a, b in zip(ladder, ladder[1:])):
    raise DtmError(f"prune.ladder must be strictly increasing, got {tuple(ladder)}")
  if s.k < 1:
    raise DtmError(f"prune.k (increments per round) must be >= 1, got {s.k}")
  if not 0 < s.alpha <= 1:
    raise DtmError(f"prune.alpha must be in (0, 1], got {s.alpha}")
  if not 0 <= s.fdt_bound <= new_tokens:
    raise DtmError(f"prune.fdt_bound must be in 0..N = 0..{new_tokens} (held-out "
                   f"eval.prompts.new_tokens), got {s.fdt_bound}")
  if not 0 < s.target_sparsity < 1:
    raise DtmError(f"prune.target_sparsity must be in (0, 1), got {s.target_sparsity}")
  if s.max_rounds < 1:
    raise DtmError(f"prune.max_rounds must be >= 1, got {s.max_rounds}")
  if s.rank_by not in RANK_BY:
    raise DtmError(f"prune.rank_by must be one of {', '.join(RANK_BY)}, got {s.rank_by!r}")
  increments.check_operator(s.operator)


def check_disjoint(select_PC: np.ndarray, heldout_PC: np.ndarray, run: int = 16) -> None:
  """DtmError if either prompt set is empty or a selection prompt shares a run of
  min(run, c) consecutive tokens with a held-out prompt (same or overlapping windows)."""
  if select_PC.shape[0] == 0 or heldout_PC.shape[0] == 0:
    raise DtmError(f"empty prompt set: {select_PC.shape[0]} selection and "
                   f"{heldout_PC.shape[0]} held-out prompts; both need at least one")
  n = min(run, select_PC.shape[1], heldout_PC.shape[1])

  def grams(x):
    return {tuple(row[i:i + n]) for row in np.asarray(x).tolist()
            for i in range(len(row) - n + 1)}
  shared = grams(select_PC) & grams(heldout_PC)
  if shared:
    raise DtmError(f"selection and held-out prompts overlap ({len(shared)} shared runs of {n} "
                   "tokens); take them from different text (select.data / eval.data) or seeds")


def prunable(selector: str, num_layers: int) -> tuple[Component, ...]:
  """Components named by a 'KINDS@LAYERS' selector of the spec grammar ('*@*' = all)."""
  rule = compress.parse_rule(f"{selector}:identity")
  comps = tuple(sorted(rule.components(num_layers)))
  if not comps:
    raise DtmError(f"prune.components={selector!r} selects no component to prune")
  return comps


# ------------------------------------------------------------------------------ levels


def spec_of(levels: Mapping[Component, float], op: increments.Operator = increments.Operator()
            ) -> str:
  """The canonical spec of a level map (`increments.Operator.spec`; magnitude by default):
  one rule per (kind, rate), kinds in KINDS order, rates ascending, layers merged
  ('q@0-2,5:magnitude(rate=0.5)'); components at level 0 are left out ('none' if all are)."""
  return op.spec(levels)


def levels_to_json(levels: Mapping[Component, float]) -> dict[str, float]:
  return {c.name: float(levels[c]) for c in sorted(levels) if levels[c] > 0}


def levels_from_json(d: Mapping[str, float]) -> dict[Component, float]:
  return {parse_component(name): float(v) for name, v in d.items()}


def candidates(levels: Mapping[Component, float], s: PruneSettings
               ) -> list[tuple[Component, float]]:
  """(component, its next ladder level) for every prunable component below the top."""
  out = []
  for comp in s.components:
    current = levels.get(comp, 0.0)
    nxt = next((x for x in s.ladder if x > current), None)
    if nxt is not None:
      out.append((comp, float(nxt)))
  return out


def rank_key(agg: Mapping[str, float], alpha: float, rank_by: str = "fdt",
             weights: float = 1.0) -> tuple[float, ...]:
  """Sort key, best first: 'fdt': highest FDT_α, then lowest SDT, then lowest DPPL; 'kl':
  lowest mean KL per weight the increment prunes (`weights`: how many it zeroes; a
  greedy knapsack step), then highest FDT_α, then lowest DPPL."""
  if rank_by == "kl":
    return (agg["kl_mean"] / weights, -agg[f"fdt_alpha_{alpha:g}"], agg["dppl"])
  return (-agg[f"fdt_alpha_{alpha:g}"], agg["sdt_mean"], agg["dppl"])


def choose(results: Mapping[Component, Mapping[str, float]], k: int, alpha: float,
           rank_by: str = "fdt", weights: Mapping[Component, float] | None = None
           ) -> list[Component]:
  """The k best candidates by `rank_key` (remaining ties: component order); weights:
  component -> weights its increment zeroes (rank_by 'kl')."""
  w = weights or {}
  return sorted(results, key=lambda c: (rank_key(results[c], alpha, rank_by, w.get(c, 1.0)),
                                        c))[:k]


def to_target(chosen: list[Component], levels: Mapping[Component, float],
              next_level: Mapping[Component, float], numel: Mapping[str, int],
              target: float) -> list[Component]:
  """The shortest prefix of the ranked `chosen` whose increments bring the overall
  sparsity of the linear kernels (as the levels give it) to `target`; all of `chosen` if
  they do not reach it. So the last round lands on the target instead of overshooting
  it by up to k increments (comparisons at equal sparsity). numel: kind -> weights of
  one component of that kind, and '_total': all linear-kernel weights (`_numel`)."""
  total = numel["_total"]
  zeros = sum(numel[c.kind] * lvl for c, lvl in levels.items())
  for i, comp in enumerate(chosen):
    zeros += numel[comp.kind] * (next_level[comp] - levels.get(comp, 0.0))
    if zeros >= target * total - 1e-9:
      return chosen[:i + 1]
  return chosen


def _numel(params) -> dict[str, int]:
  """kind -> weights per component, and '_total': all linear-kernel weights."""
  out = {}
  for kind in KINDS:
    shape = get_path(params, kernel_path(kind)).shape  # [L, in, out]
    out[kind] = int(shape[1] * shape[2])
    out["_total"] = out.get("_total", 0) + int(shape[0] * shape[1] * shape[2])
  return out


def linear_sparsity(params) -> dict:
  """{'overall': fraction of exact zeros over all linear kernels (q..down of every
  layer, embedding and LM head excluded), 'per_component': {name: fraction}}."""
  zeros, total, per = 0, 0, {}
  counts = jax.device_get({kind: jnp.sum(get_path(params, kernel_path(kind)) == 0, axis=(1, 2))
                           for kind in KINDS})
  for kind in KINDS:
    shape = get_path(params, kernel_path(kind)).shape
    numel = shape[1] * shape[2]
    for layer, z in enumerate(np.asarray(counts[kind])):
      per[Component(layer, kind).name] = float(z) / numel
      zeros += int(z)
      total += numel
  return {"overall": zeros / total, "per_component": dict(sorted(per.items()))}


# ------------------------------------------------------------------------------ probing


def probe_id(comp: Component, level: float) -> str:
  """The store id of a magnitude candidate (`increments.Operator.probe_id`)."""
  return increments.Operator().probe_id(comp, level)


probe_candidates = increments.probe_candidates


# ------------------------------------------------------------------------------ records


def stop_reason(records: list[dict], s: PruneSettings) -> str | None:
  """Why the search is over after `records` (None: run another round)."""
  last = records[-1]
  if last["round"] >= 1 and last["sparsity"] >= s.target_sparsity:
    return "target_sparsity"
  if last["round"] >= 1 and last["heldout"][f"fdt_alpha_{s.alpha:g}"] < s.fdt_bound:
    return "fdt_bound"
  if last["round"] >= s.max_rounds:
    return "max_rounds"
  if not candidates(levels_from_json(last["levels"]), s):
    return "ladder_exhausted"
  return None


# ------------------------------------------------------------------------------ rounds


@dataclasses.dataclass
class Context:
  """What a search runs on. params: the original model F (teacher and reference model);
  select_seq: int32 [P, c+N] selection prompts ⊕ F's references; heldout:
  `evaluation.HeldOut` on disjoint prompts; tc: the `train` config block (steps = T per
  round, 0 = no training); tokens: the training token stream; tokenizer: saved with every
  round model; param_shardings: where each round's params are placed (F's layout, e.g.
  the trainer's FSDP shardings; None: uncommitted on the default device, as
  `load_model`); identity: extra settings pinned per round; windows: the calibration
  windows of a calibrated operator; start_params / start_levels: round 0's model and
  levels when the search refines a one-shot recipe (default: F, nothing pruned)."""
  cfg: object
  params: dict
  select_seq: np.ndarray
  c: int
  heldout: object
  tc: object
  tokens: np.ndarray
  tokenizer: object = None
  alphas: tuple[float, ...] = (0.75, 0.9)
  mesh: object = None        # probe mesh (default: all devices, `probe.probe_mesh`)
  train_mesh: object = None  # trainer mesh (default: from tc.mesh)
  param_shardings: object = None  # params-shaped tree of Shardings, or None
  identity: dict = dataclasses.field(default_factory=dict)
  windows: np.ndarray | None = None  # calibration windows int32 [n, T] (calibrated operators)
  start_params: dict | None = None   # round 0's model when it is not F (a start recipe)
  start_levels: dict = dataclasses.field(default_factory=dict)  # its Component -> rate


def round_dir(workdir: str, r: int) -> str:
  return os.path.join(workdir, "rounds", f"r{r:03d}")


def run(ctx: Context, s: PruneSettings, workdir: str,
        on_round: Callable[[dict], None] | None = None) -> tuple[list[dict], str | None]:
  """Run (or resume) the search in `workdir` -> (all round records, stop reason).

  Returns (records, None) if the trainer was interrupted by SIGTERM (its checkpoint is
  saved; rerun to resume). `on_round(record)` is called after each new committed round."""
  os.makedirs(workdir, exist_ok=True)
  rounds = RoundLog(os.path.join(workdir, "rounds.jsonl"))
  alphas = tuple(sorted(set(ctx.alphas) | {s.alpha}))
  t0 = time.perf_counter()
  start = ctx.params if ctx.start_params is None else ctx.start_params
  if not rounds.records:
    rounds.append(_record(0, ctx.start_levels, [], None, start, ctx.heldout, alphas, t0, s))
    if on_round:
      on_round(rounds.records[-1])
  last = rounds.records[-1]
  levels = levels_from_json(last["levels"])
  params = start if last["round"] == 0 else _restore(ctx, round_dir(workdir, last["round"]))
  _tidy(workdir, last["round"])
  bar = tqdm(total=s.max_rounds, initial=last["round"], unit="round", desc="pruning rounds",
             mininterval=0)
  while (reason := stop_reason(rounds.records, s)) is None:
    r = len(rounds.records)
    t_round = time.perf_counter()
    out = _round(ctx, s, params, levels, r, round_dir(workdir, r), alphas)
    if out is None:
      bar.close()
      return rounds.records, None
    new_params, new_levels, rec = out
    rec["seconds"] = time.perf_counter() - t_round
    rounds.append(rec)  # committed: the round's model is already on disk
    _tidy(workdir, r)
    params, levels = new_params, new_levels
    bar.update(1)
    bar.set_postfix(sparsity=f"{rec['sparsity']:.3f}",
                    fdt=f"{rec['heldout'][f'fdt_alpha_{s.alpha:g}']:g}", refresh=True)
    ph = rec["phase_seconds"]
    print(f"round {r}: +{len(rec['chosen'])} increments, sparsity {rec['sparsity']:.4f}, "
          f"held-out {_eval_line(rec['heldout'])} ({rec['seconds']:.0f} s: "
          + ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in ph.items()) + ")", flush=True)
    if on_round:
      on_round(rec)
  bar.close()
  return rounds.records, reason


class _Laps:
  """Seconds between successive calls, by name."""

  def __init__(self):
    self.t0 = self.last = time.perf_counter()
    self.seconds: dict[str, float] = {}

  def __call__(self, name: str) -> None:
    now = time.perf_counter()
    self.seconds[name] = now - self.last
    self.last = now


def _round(ctx: Context, s: PruneSettings, params, levels, r: int, rdir: str, alphas):
  """One round on the current params -> (new params, new levels, record without its
  total seconds), or None if training was interrupted."""
  op, lap = s.operator, _Laps()
  cands = candidates(levels, s)
  store = ProbeStore.open(os.path.join(rdir, "probe"), {
      "round": r, "base_params": io_utils.params_fingerprint(params),
      "select": io_utils.array_fingerprint(ctx.select_seq),
      "candidates": [op.probe_id(cm, lvl) for cm, lvl in cands], "alphas": list(alphas)})
  stats = None
  if op.calibrated:  # the current model's statistics (probes, and a parallel apply)
    if op.mode == "parallel" or any(op.probe_id(cm, lvl) not in store.records for cm, lvl in cands):
      stats = increments.statistics(ctx.cfg, params, op, ctx.windows,
                                    {cm.layer for cm, _ in cands})
    lap("statistics")
  results = probe_candidates(ctx.cfg, params, ctx.select_seq, ctx.c, cands, store, alphas,
                             ctx.mesh, op, stats, kl=s.rank_by == "kl")
  numel = _numel(params)
  weights = {cm: numel[cm.kind] * (lvl - levels.get(cm, 0.0)) for cm, lvl in cands}
  chosen = to_target(choose(results, s.k, s.alpha, s.rank_by, weights), levels, dict(cands),
                     numel, s.target_sparsity)
  step = {cm: lvl for cm, lvl in cands if cm in chosen}
  new_levels = {**levels, **step}
  lap("selection")
  new_params = _prune_and_train(ctx, params, spec_of(new_levels, op), r, rdir, step, op, stats)
  if new_params is None:
    return None
  lap("prune_and_train")
  keys = [f"fdt_alpha_{s.alpha:g}", "fdt_mean", "sdt_mean", "dppl"] + (
      ["kl_mean"] if s.rank_by == "kl" else [])
  selection = [{"component": cm.name, "level": step[cm], **{k: results[cm][k] for k in keys}}
               for cm in chosen]
  rec = _record(r, new_levels, selection, len(cands), new_params, ctx.heldout, alphas,
                lap.t0, s)
  lap("evaluation")
  rec["phase_seconds"] = lap.seconds
  return new_params, new_levels, rec


def _record(r: int, levels, selection, num_candidates, params, heldout, alphas, t_start,
            s: PruneSettings) -> dict:
  sp = linear_sparsity(params)
  return {"round": r, "spec": spec_of(levels, s.operator), "levels": levels_to_json(levels),
          "sparsity": sp["overall"], "num_candidates": num_candidates, "chosen": selection,
          "heldout": heldout.evaluate(params), "per_component_sparsity": sp["per_component"],
          "params_fingerprint": io_utils.params_fingerprint(params),
          "seconds": time.perf_counter() - t_start}


def _prune_and_train(ctx: Context, params, spec: str, r: int, rdir: str,
                     step: Mapping[Component, float] | None = None,
                     op: increments.Operator = increments.Operator(), stats=None):
  """The round's model, saved to rdir/model (or restored from there if an earlier
  attempt saved it): `spec` (all levels) applied to the current params (magnitude on the
  current weights; a calibrated `op` applies only the round's `step` (component -> new rate), with
  calibration on the current model, `increments.apply`), then ctx.tc.steps of training
  (masks: the zeros). None if training was interrupted."""
  model_dir = os.path.join(rdir, "model")
  if checkpoint.is_model_dir(model_dir):
    return _restore(ctx, rdir)
  if op.calibrated:
    params = increments.apply(ctx.cfg, params, step, op, ctx.windows, stats)
  if int(ctx.tc.steps) > 0:
    tc = ml_collections.ConfigDict(ctx.tc.to_dict())
    tc.seed = int(ctx.tc.seed) + r  # a different window order every round
    result = trainer.train(
        ctx.cfg, params, spec, tc, tokens=ctx.tokens, workdir=os.path.join(rdir, "train"),
        teacher_params=ctx.params, mesh=ctx.train_mesh,
        identity={**ctx.identity, "round": r, "base_params": io_utils.params_fingerprint(params),
                  "teacher": io_utils.params_fingerprint(ctx.params),
                  "tokens": io_utils.array_fingerprint(ctx.tokens)})
    if result.interrupted:
      return None
    new_params = result.params
  elif op.calibrated:
    new_params = params
  else:
    new_params, _ = compress.apply_spec(params, spec)
  if os.path.isdir(model_dir):  # an interrupted save (no marker): write it again
    shutil.rmtree(model_dir)
  checkpoint.save_model(model_dir, ctx.cfg, new_params, ctx.tokenizer,
                        source=f"dtm prune round {r} ({spec})")
  new_params = result = None  # the restored copy replaces them: one model less at its peak
  return _restore(ctx, rdir)  # one code path for fresh and resumed runs


def _restore(ctx: Context, rdir: str):
  """The round's params, placed as F: in `ctx.param_shardings` when given (a pod-sized
  model is never whole on one device), else like `load_model`'s (uncommitted on the
  default device): orbax commits them to device 0, which jit calls spanning a
  multi-device mesh (the probes) or mixing them with the original model's arrays would
  refuse."""
  if ctx.param_shardings is not None:
    return checkpoint.restore_params(os.path.join(rdir, "model"), ctx.cfg, ctx.param_shardings)
  params = checkpoint.restore_params(os.path.join(rdir, "model"), ctx.cfg)
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x)), params)


def _tidy(workdir: str, last_round: int) -> None:
  """Delete what committed rounds no longer need: their trainer checkpoints, and the
  models of rounds before the last committed one."""
  root = os.path.join(workdir, "rounds")
  if not os.path.isdir(root):
    return
  for name in sorted(os.listdir(root)):
    if not name.startswith("r") or not name[1:].isdigit() or int(name[1:]) > last_round:
      continue
    shutil.rmtree(os.path.join(root, name, "train", "ckpt"), ignore_errors=True)
    if int(name[1:]) < last_round:
      shutil.rmtree(os.path.join(root, name, "model"), ignore_errors=True)


def _eval_line(ev: dict) -> str:
  parts = [f"FDT_{k[len('fdt_alpha_'):]}={ev[k]:g}" for k in ev if k.startswith("fdt_alpha_")]
  parts += [f"mean FDT={ev['fdt_mean']:.2f}", f"SDT={ev['sdt_mean']:.3f}",
            f"DPPL={ev['dppl']:.3f}"]
  if "ppl" in ev:
    parts.append(f"PPL={ev['ppl']:.2f}")
  return " ".join(parts)
