"""`main.py --dry_run=TARGET`: compile every function a job runs for TARGET, print its cost.

  python main.py --config=configs/probe.py:model=llama2-13b --workdir=runs/dry \
      --dry_run=v5e-16 [--mfu=0.4]

No weight is read: params are abstract (`architectures.architecture`), with the job's real
shardings on the target's devices (`targets.parse_target`). Prints one table (per function:
argument / temp / output bytes per device, the chip's HBM, fits, FLOPs per call, compiled
over useful FLOPs, calls per job, estimated time at the MFU) and writes
<workdir>/dry_run.json. Exits 2, naming the function and the shortfall, when something does
not compile or does not fit. `preflight` is the same estimate on the devices a real run
has, printed before its first long phase.
"""
from __future__ import annotations

import os

import jax
from jax.sharding import NamedSharding, PartitionSpec as PS

from dtm import probe
from dtm.aot import compile as aot_compile
from dtm.aot import job_plans
from dtm.aot import plans
from dtm.aot.architectures import architecture
from dtm.aot.targets import Target, parse_target
from dtm.errors import DtmError
from dtm.model import abstract_params

JOBS = ("probe", "evaluate", "train", "prune", "quantize", "compare", "lm_eval", "allocate",
        "prune_compare")


def _params(cfg, mesh, tensor_parallel: bool, local: bool = False):
  """The probe engine's params: tensor-parallel over 'model', else as loaded: replicated
  on `mesh` for a remote target (where the job's jit puts them); for this process's own
  devices (`local`) unplaced like the job's uncommitted arrays (`plans.loaded_params`)."""
  params = abstract_params(cfg)
  if tensor_parallel:
    return plans._abstract(params, probe.param_shardings(mesh, params))
  if local:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  return plans._abstract(params, jax.tree.map(lambda _: NamedSharding(mesh, PS()), params))


def job_plan(config, target: Target, cfg=None) -> list[aot_compile.Fn]:
  """The `Fn`s of `config.job` on `target` (validated config; DtmError if the job has no
  plan yet)."""
  from dtm.jobs import validate as validate_job
  validate_job.validate(config)
  cfg = cfg or architecture(config.model, config.param_dtype, config.dtype)
  job = config.job
  if job not in JOBS:
    raise DtmError(f"the dry run knows the jobs {', '.join(JOBS)}; {job!r} has no plan yet")
  if job == "probe":
    mesh = probe.probe_mesh(target.devices, model=int(config.probe.mesh_model))
    tp = mesh.shape[probe.MODEL_AXIS] > 1
    params = _params(cfg, mesh, tp, target.local)
    gen_params = params if tp else plans.loaded_params(cfg, target)
    return (plans.reference_fns(cfg, gen_params, mesh, config.prompts)
            + plans.probe_fns(config, cfg, params, mesh, target.hbm_bytes))
  if job == "evaluate":
    mesh = probe.probe_mesh(target.devices)
    params = plans.loaded_params(cfg, target)  # HeldOut runs on the loaded params
    return (plans.reference_fns(cfg, params, mesh, config.prompts)
            + plans.dtm_fns(cfg, params, mesh, config.prompts, config.ppl, bool(config.kl)))
  if job == "quantize":
    return job_plans.quantize_fns(config, cfg, target, job_plan)
  if job == "compare":
    return job_plans.compare_fns(config, cfg, target)
  if job == "lm_eval":
    return job_plans.lm_eval_fns(config, cfg, target)
  if job == "allocate":
    from dtm.jobs import allocate
    allocate.check(config)
    return job_plans.allocate_fns(config, cfg, target, _params)
  if job == "prune_compare":
    return job_plans.prune_compare_fns(config, cfg, target, job_plan)
  from dtm.train import sharding
  tmesh = sharding.make_mesh(int(config.train.mesh.data), int(config.train.mesh.fsdp),
                             devices=target.devices)
  fsdp = plans._abstract(abstract_params(cfg), sharding.tree_shardings(tmesh, abstract_params(cfg)))
  ev = config.eval
  # `jobs.train.load_for_training` (train and prune): F in the FSDP layout when the mesh
  # splits params
  loaded = fsdp if tmesh.shape["fsdp"] > 1 else plans.loaded_params(cfg, target)
  if job == "train":
    steps, every = int(config.train.steps), int(config.train.eval_every)
    evals = 2 + (max(0, (steps - 1) // every) if every else 0)
    return (plans.reference_fns(cfg, loaded, tmesh, ev.prompts)
            + plans.dtm_fns(cfg, fsdp, tmesh, ev.prompts, ev.ppl, bool(ev.kl), evals, loaded)
            + plans.train_fns(config, cfg, target))
  # prune: selection probes every round, recovery training, held-out evaluation
  p = config.prune
  rounds = int(p.max_rounds)
  kinds, layers = job_plans.selector(p.components)
  # the selection probes run on the ('probe', 'model') mesh of select.mesh_model
  # (`ProbeRunner` reshards the round's params to the tensor-parallel layout when model > 1)
  from dtm.jobs import prune as prune_job
  pmesh = prune_job.selection_mesh(config, target.devices)
  tp = pmesh.shape[probe.MODEL_AXIS] > 1
  pparams = _params(cfg, pmesh, tp, target.local) if tp or tmesh.shape["fsdp"] == 1 else fsdp
  fns = plans.reference_fns(cfg, loaded, tmesh, config.select.prompts)
  probe_part = plans.probe_fns(config, cfg, pparams, pmesh, target.hbm_bytes,
                               family_method=str(p.method), levels=(float(p.ladder[0]),),
                               kinds=kinds, layers=layers or "*", rounds=rounds, per_device=1,
                               prompts=config.select.prompts)
  for f in probe_part:  # a calibrated operator (`search.increments`), every round: the
    if f.name == "calibration layer pass":  # statistics pass and the sequential apply
      f.calls *= 2 * rounds
    elif " solve " in f.name:  # one solve per candidate probe, one per applied increment
      f.calls = f.calls * rounds + rounds * int(p.k)
  fns += probe_part
  if int(config.train.steps) > 0:
    spec = f"{kinds}@{layers or '*'}:magnitude({float(p.ladder[0]):g})"
    fns += plans.train_fns(config, cfg, target, spec=spec, rounds=rounds)
  fns += plans.reference_fns(cfg, loaded, tmesh, ev.prompts)
  fns += plans.dtm_fns(cfg, fsdp, tmesh, ev.prompts, ev.ppl, bool(ev.kl), rounds + 1, loaded)
  return fns


def run(config, workdir: str, target_text: str, mfu: float = 0.4) -> dict:
  """The dry run (module docstring); returns dry_run.json's payload."""
  if not 0 < mfu <= 1:
    raise DtmError(f"--mfu must be in (0, 1], got {mfu}")
  target = parse_target(target_text)
  fns = job_plan(config, target)
  print(f"dry run: {config.job} job of {config.model} on {target.name} "
        f"({len(fns)} functions)", flush=True)
  rows = aot_compile.compile_all(fns, target, mfu)
  print(aot_compile.table(rows, target, mfu), flush=True)
  payload = aot_compile.summary(rows, target, mfu, config.job)
  payload["model"] = config.model
  os.makedirs(workdir, exist_ok=True)
  aot_compile.write_json(os.path.join(workdir, "dry_run.json"), payload)
  print(f"wrote {os.path.join(workdir, 'dry_run.json')}", flush=True)
  aot_compile.check_fit(rows)
  return payload


def local_target(mfu_peak: float | None = None) -> Target:
  """The devices this process has, as a Target (CPU peak: the same-run matmul)."""
  from dtm.aot import targets
  devs = jax.devices()
  kind = devs[0].platform
  if kind == "cpu":
    t = Target(f"cpu:{len(devs)}", "cpu", len(devs), 0.0, 0,
               peak_source="same-run 2048^3 f32 matmul", local=True)
    t._devices = list(devs)
    total = mfu_peak or targets.measure_cpu_peak()
    t.peak_flops = total / len(devs)
    t.mem_bandwidth = targets.measure_cpu_bandwidth()
    t.hbm_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devs)
    return t
  stats = devs[0].memory_stats() or {}
  t = Target(f"{kind}:{len(devs)}", kind, len(devs), 0.0, int(stats.get("bytes_limit", 0)),
             peak_source="unknown peak: time not estimated", local=True)
  t._devices = list(devs)
  return t
