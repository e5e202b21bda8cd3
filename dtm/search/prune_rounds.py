"""FDT-guided iterative magnitude pruning (Deiseroth et al. 2023, arXiv 2311.01544, Sec. 5).

The model of round r is the original F with per-component magnitude sparsity levels
(`levels`: Component -> rate; `spec_of` is the one place that turns them into a spec),
pruned and trained round by round. Round r:

  1. candidates: every prunable component not at the top of the ladder, at its next level;
  2. probe every candidate on the CURRENT (pruned, trained) model against the references
     y = greedy(F, p, N) of the ORIGINAL model on the selection prompts (`probe.ProbeRunner`
     with the current params as its base: one component compressed per probe);
  3. choose the k candidates with the highest FDT_α (ties: lower SDT, then lower DPPL,
     then component order);
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

import collections
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dtm import checkpoint, compress, io_utils, metrics, probe
from dtm.components import KINDS, Component, get_path, kernel_path, parse_component
from dtm.errors import DtmError
from dtm.sweep_store import ProbeStore
from dtm.train import trainer

log = logging.getLogger("dtm")

MAGNITUDE = probe.MethodFamily("magnitude")


@dataclasses.dataclass(frozen=True)
class PruneSettings:
  """What defines a search (all validated by `validate_settings`).

  ladder: increasing magnitude rates in (0, 1), the levels a component climbs one at a time;
  k: increments applied per round; alpha: the α of the FDT_α that ranks candidates and is
  checked against `fdt_bound` on the held-out prompts (stop when FDT_α < bound, 0 = never);
  target_sparsity: stop once the fraction of zeros in all linear kernels reaches it;
  max_rounds: at most this many pruning rounds; components: the prunable components.
  """
  ladder: tuple[float, ...]
  k: int
  alpha: float
  fdt_bound: float
  target_sparsity: float
  max_rounds: int
  components: tuple[Component, ...]


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


def spec_of(levels: Mapping[Component, float]) -> str:
  """The canonical spec of a level map: one `magnitude(rate)` rule per (kind, rate),
  kinds in KINDS order, rates ascending, layers merged ('q@0-2,5:magnitude(rate=0.5)');
  components at level 0 are left out ('none' if all are)."""
  groups: dict[tuple[str, float], list[int]] = collections.defaultdict(list)
  for comp, level in levels.items():
    if level > 0:
      groups[(comp.kind, float(level))].append(comp.layer)
  rules = [compress.Rule((kind,), tuple(sorted(layers)), compress.Method("magnitude",
                                                                        {"rate": level}))
           for (kind, level), layers in sorted(groups.items(),
                                               key=lambda g: (KINDS.index(g[0][0]), g[0][1]))]
  return compress.Spec(tuple(rules)).to_string()


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


def rank_key(agg: Mapping[str, float], alpha: float) -> tuple[float, float, float]:
  """Sort key, best first: highest FDT_α, then lowest SDT, then lowest DPPL."""
  return (-agg[f"fdt_alpha_{alpha:g}"], agg["sdt_mean"], agg["dppl"])


def choose(results: Mapping[Component, Mapping[str, float]], k: int,
           alpha: float) -> list[Component]:
  """The k best candidates by `rank_key` (remaining ties: component order)."""
  return sorted(results, key=lambda c: (rank_key(results[c], alpha), c))[:k]


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
  return f"{comp.name}:magnitude({level:g})"


def probe_candidates(cfg, params, seq_PS: np.ndarray, c: int, cands, store: ProbeStore,
                     alphas, mesh=None) -> dict[Component, dict]:
  """FDT/SDT/DPPL aggregates of each candidate (component compressed at its level on top
  of `params`), measured on s = p ⊕ y (seq_PS int32 [P, c+N], y from the original model).

  Probes not yet in `store` are run with `probe.ProbeRunner` (one probe per device and
  call) and appended per call, so a killed round resumes where it stopped."""
  todo = [(comp, lvl) for comp, lvl in cands if probe_id(comp, lvl) not in store.records]
  if todo:
    _, shapes = compress.kernel_shapes(params)
    runner = probe.ProbeRunner(cfg, params, seq_PS, c, mesh or probe.probe_mesh(), kl=False,
                               kinds=tuple(sorted({comp.kind for comp, _ in todo})))
    work = {comp: [((comp, lvl), probe.dynamic_arg(MAGNITUDE, lvl, int(np.prod(shapes[comp.kind]))))]
            for comp, lvl in todo}
    calls = [(MAGNITUDE, slots) for slots in probe.schedule(work, runner.num_devices, 1,
                                                                   runner.uniform)]
    bar = tqdm(total=len(todo), unit="probe", desc="probes", smoothing=0.1,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for slots, outs in runner.stream(calls):
      recs = []
      for slot, out in zip(slots, outs):
        comp, lvl = slot.keys[0]
        per = {k: np.asarray(v[0]) for k, v in out.items() if k != "sparsity"}
        recs.append({"probe": probe_id(comp, lvl), "component": comp.name, "level": lvl,
                     "sparsity": round(float(out["sparsity"][0]), 6),
                     "aggregate": metrics.aggregate(per, alphas),
                     "fdt": per["fdt"].tolist()})
      store.add(recs)
      bar.update(len(recs))
    bar.close()
  return {comp: store.records[probe_id(comp, lvl)]["aggregate"] for comp, lvl in cands}


# ------------------------------------------------------------------------------ records


class RoundLog:
  """rounds.jsonl: one JSON record per committed round, appended with write + fsync; an
  unterminated last line (a kill during the write) is cut off when opened."""

  def __init__(self, path: str):
    self.path = path
    self.records: list[dict] = []
    if not os.path.exists(path):
      return
    with open(path, "rb") as f:
      raw = f.read()
    good_end = 0
    for line in raw.split(b"\n")[:-1]:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        break
      if rec["round"] != len(self.records):
        raise DtmError(f"{path}: record of round {rec['round']} where round "
                       f"{len(self.records)} was expected; the file is not this job's")
      self.records.append(rec)
      good_end += len(line) + 1
    if good_end < len(raw):
      with open(path, "r+b") as f:
        f.truncate(good_end)

  def append(self, rec: dict) -> None:
    if rec["round"] != len(self.records):
      raise ValueError(f"round {rec['round']} appended after {len(self.records)} records")
    with open(self.path, "a") as f:
      f.write(json.dumps(rec, separators=(",", ":")) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.records.append(rec)


def check_identity(workdir: str, identity: dict) -> None:
  """Pin the search's settings in workdir/prune_config.json; a workdir holding a search
  with other settings is refused, naming the differing fields."""
  path = os.path.join(workdir, "prune_config.json")
  identity = json.loads(json.dumps(identity))
  if not os.path.exists(path):
    io_utils.atomic_write_json(path, identity)
    return
  with open(path) as f:
    old = json.load(f)
  diff = _diff(old, identity)
  if diff:
    shown = ", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
    raise DtmError(f"workdir {workdir} holds a pruning search with a different config "
                   f"(differs in: {shown}); use another --workdir, or the same settings to resume")


def _diff(a, b, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
  return [] if a == b else [prefix[:-1]]


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
  `load_model`); identity: extra settings pinned per round."""
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
  if not rounds.records:
    rounds.append(_record(0, {}, [], None, ctx.params, ctx.heldout, alphas, t0))
    if on_round:
      on_round(rounds.records[-1])
  last = rounds.records[-1]
  levels = levels_from_json(last["levels"])
  params = ctx.params if last["round"] == 0 else _restore(ctx, round_dir(workdir, last["round"]))
  _tidy(workdir, last["round"])
  bar = tqdm(total=s.max_rounds, initial=last["round"], unit="round", desc="pruning rounds",
             mininterval=0)
  while (reason := stop_reason(rounds.records, s)) is None:
    r = len(rounds.records)
    rdir = round_dir(workdir, r)
    t_round = time.perf_counter()
    cands = candidates(levels, s)
    store = ProbeStore.open(os.path.join(rdir, "probe"), {
        "round": r, "base_params": io_utils.params_fingerprint(params),
        "select": io_utils.array_fingerprint(ctx.select_seq),
        "candidates": [probe_id(cm, lvl) for cm, lvl in cands], "alphas": list(alphas)})
    results = probe_candidates(ctx.cfg, params, ctx.select_seq, ctx.c, cands, store, alphas,
                               ctx.mesh)
    chosen = choose(results, s.k, s.alpha)
    next_level = dict(cands)
    new_levels = {**levels, **{cm: next_level[cm] for cm in chosen}}
    t_train = time.perf_counter()
    new_params = _prune_and_train(ctx, params, spec_of(new_levels), r, rdir)
    t_eval = time.perf_counter()
    if new_params is None:
      bar.close()
      return rounds.records, None
    selection = [{"component": cm.name, "level": next_level[cm], **{
        k: results[cm][k] for k in (f"fdt_alpha_{s.alpha:g}", "fdt_mean", "sdt_mean", "dppl")}}
                 for cm in chosen]
    rec = _record(r, new_levels, selection, len(cands), new_params, ctx.heldout, alphas, t_round)
    rec["phase_seconds"] = {"selection": t_train - t_round, "prune_and_train": t_eval - t_train,
                            "evaluation": time.perf_counter() - t_eval}
    rounds.append(rec)  # committed: the round's model is already on disk
    _tidy(workdir, r)
    params, levels = new_params, new_levels
    bar.update(1)
    bar.set_postfix(sparsity=f"{rec['sparsity']:.3f}",
                    fdt=f"{rec['heldout'][f'fdt_alpha_{s.alpha:g}']:g}", refresh=True)
    ph = rec["phase_seconds"]
    print(f"round {r}: +{len(chosen)} increments, sparsity {rec['sparsity']:.4f}, held-out "
          f"{_eval_line(rec['heldout'])} ({rec['seconds']:.0f} s: selection "
          f"{ph['selection']:.0f}, prune + training {ph['prune_and_train']:.0f}, "
          f"evaluation {ph['evaluation']:.0f})", flush=True)
    if on_round:
      on_round(rec)
  bar.close()
  return rounds.records, reason


def _record(r: int, levels, selection, num_candidates, params, heldout, alphas, t_start) -> dict:
  sp = linear_sparsity(params)
  return {"round": r, "spec": spec_of(levels), "levels": levels_to_json(levels),
          "sparsity": sp["overall"], "num_candidates": num_candidates, "chosen": selection,
          "heldout": heldout.evaluate(params), "per_component_sparsity": sp["per_component"],
          "params_fingerprint": io_utils.params_fingerprint(params),
          "seconds": time.perf_counter() - t_start}


def _prune_and_train(ctx: Context, params, spec: str, r: int, rdir: str):
  """The round's model, saved to rdir/model (or restored from there if an earlier
  attempt saved it): `spec` applied to the current params (magnitude on the current
  weights), then ctx.tc.steps of training. None if training was interrupted."""
  model_dir = os.path.join(rdir, "model")
  if checkpoint.is_model_dir(model_dir):
    return _restore(ctx, rdir)
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
  else:
    new_params, _ = compress.apply_spec(params, spec)
  if os.path.isdir(model_dir):  # an interrupted save (no marker): write it again
    shutil.rmtree(model_dir)
  checkpoint.save_model(model_dir, ctx.cfg, new_params, ctx.tokenizer,
                        source=f"dtm prune round {r} ({spec})")
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
