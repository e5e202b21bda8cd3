"""Component probes: compress exactly one component at one level, measure its DTMs.

A probe is (component (layer l, kind), level), e.g. (L03.q, magnitude(rate=0.5)).
Probes of one component form a *chunk*, evaluated on one device:

  * prefix reuse: layers 0..l-1 are untouched, so the chunk starts from the base
    model's residual stream at the input of layer l (`_base_pass`, computed once);
  * the per-probe compression is applied inside the call, vmapped over the K levels
    of the chunk: each probe finds its magnitude threshold (value, HF flat index) by
    counting passes over |w| (`compress.magnitude_cut`, exact, no sort);
    AbsMax, RTN and N:M are computed per probe from the weight (`compress.absmax_values`,
    `gptq.rtn`, `compress.nm_rank`); Wanda per probe from one per-component rank of its
    score |W_ij| * ||X_j|| (per output row, or per group of m), so the statistics
    (`calibration.InputStats.sq_norms` of the ORIGINAL model) enter the call as a
    replicated [L, in] table per kind; no copy of the model is built per probe;
  * SparseGPT and GPTQ update the weights, so their kernels are computed per probe
    before the call (`compress.compress_calibrated`, with the original model's Hessians)
    and enter it sharded like the slots ("precomputed" families: one kind per call);
  * layers l+1..L-2 run with the base weights on all K·P sequences at once, in a
    `lax.fori_loop` with a traced start layer (one compile per method family: the
    probed kind is a traced index into a `lax.switch`);
  * the last layer computes keys/values at all positions but everything else (queries,
    attention output, MLP) only at the N continuation rows, and the LM head runs only
    there, one probe at a time.

A call runs one such chunk per device group, each on its own component (`Slot`,
`schedule`), in a `shard_map` over the 'probe' axis of a ('probe', 'model') mesh. With a
'model' axis of size 1 (the default) every device holds a replica of the params and the
base pass. With 'model' > 1 each group of `model` devices holds one tensor-parallel copy
(`param_shardings`: attention heads and the MLP hidden dimension split over 'model', the
XLA partitioner inserting the collectives): the mesh for models that do not fit one chip
(Llama-2-13B on v5e, 70B anywhere). Results are per-probe, per-prompt
`metrics.divergence_stats`, the same for every mesh shape (tested).

Shapes: P prompts, c prompt length, N continuation length, S = c + N - 1 fed
positions, D hidden, V vocab, K probes in a chunk, L layers.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from dtm import compress
from dtm.components import KINDS, Component, get_path, kernel_path
from dtm.evaluation import final_base, head_stats
from dtm.model import Llama, apply_layer
from dtm.model_config import ModelConfig
from dtm.probe_layout import (  # noqa: F401 (re-exported: the probe engine's layout)
    MODEL_AXIS, PROBE_AXIS, Slot, param_pspec, param_shardings, probe_mesh, schedule,
    useful_flops)


# Families whose probes' kernels are computed before the call (weight updates).
PRECOMPUTED: tuple[str, ...] = ("sparsegpt", "gptq")


@dataclasses.dataclass(frozen=True)
class MethodFamily:
  """The static part of a compression method (one compile per family and kind):
  name plus the arguments that shape the computation. The per-level argument
  (rate / bits / n) is dynamic and vmapped. `options`: the method's other arguments
  ((key, value), ...), e.g. sym for rtn, percdamp for sparsegpt."""
  name: str
  granularity: str | None = None
  group_size: int | None = None
  m: int | None = None
  options: tuple[tuple[str, object], ...] = ()

  @property
  def precomputed(self) -> bool:
    return self.name in PRECOMPUTED

  @property
  def calibrated(self) -> bool:
    return self.name in compress.CALIBRATED_METHODS

  @property
  def level_key(self) -> str:
    """The method argument that the level sets."""
    if self.name in ("absmax", "rtn", "gptq"):
      return "bits"
    return "n" if self.m is not None or self.name == "nm" else "rate"


def split_method(method: compress.Method) -> tuple[MethodFamily, float]:
  """Method -> (static family, dynamic level value); `family_method` inverts it."""
  a = method.kwargs
  if method.name == "magnitude":
    return MethodFamily("magnitude"), float(a["rate"])
  if method.name == "absmax":
    return MethodFamily("absmax", a["granularity"], a.get("group_size")), float(a["bits"])
  if method.name == "nm":
    return MethodFamily("nm", m=int(a["m"])), float(a["n"])
  if method.name == "identity":
    return MethodFamily("identity"), 0.0
  if method.name in ("wanda", "sparsegpt"):
    level = "n" if "m" in a else "rate"
    options = tuple((k, v) for k, v in method.args if k not in ("rate", "n", "m"))
    return MethodFamily(method.name, m=a.get("m"), options=options), float(a[level])
  if method.name in ("rtn", "gptq"):
    options = tuple((k, v) for k, v in method.args if k not in ("bits", "group_size"))
    return (MethodFamily(method.name, group_size=a.get("group_size"), options=options),
            float(a["bits"]))
  raise ValueError(f"probing does not support method {method.name!r}")


def family_method(family: MethodFamily, level: float) -> compress.Method:
  """The Method of `family` at `level` (split_method's inverse)."""
  args = dict(family.options)
  args[family.level_key] = level
  if family.m is not None:
    args["m"] = family.m
  if family.name == "absmax":
    args["granularity"] = family.granularity
  if family.group_size is not None:
    args["group_size"] = family.group_size
  return compress.Method(family.name, args)


def dynamic_arg(family: MethodFamily, level: float, numel: int, in_dim: int | None = None
                ) -> float:
  """The per-probe scalar the compiled chunk consumes: k = num_pruned(rate, numel) for
  magnitude and k = num_pruned(rate, in_dim) (per output row) for wanda(rate) (exact
  host integer arithmetic), qmax = 2^(bits-1)-1 for absmax, n for nm and wanda(n, m),
  bits for rtn; the level itself for the precomputed families."""
  if family.name == "magnitude":
    return float(compress.num_pruned(level, numel))
  if family.name == "wanda" and family.m is None:
    if in_dim is None:
      raise ValueError("wanda(rate) probes need the weight's input dimension")
    return float(compress.num_pruned(level, in_dim))
  if family.name == "absmax":
    return float(2 ** (int(level) - 1) - 1)
  return float(level)


# ----------------------------------------------------------------------------- base pass

def _index_layer(params, i):
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False),
                      params["layers"])


def _base_pass(cfg: ModelConfig, params, seq_PS: jax.Array, c: int):
  """Residual stream at the input of every layer, h_in [L, P, S, D], and the base
  model's `metrics.HeadBase` at the continuation positions (for KL / top-1)."""
  tokens = seq_PS[:, :-1]
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  h = Llama(cfg).apply({"params": params}, tokens, method=lambda m, t: m.embed(t))

  def step(h, lp):
    return apply_layer(cfg, lp, h, positions), h

  h_last, h_in = jax.lax.scan(step, h, params["layers"])
  return h_in, final_base(cfg, params, h_last[:, c - 1:])


# ----------------------------------------------------------------------------- compression

def _hf_flat_index(in_dim: int, out_dim: int) -> jax.Array:
  """int32 [in, out]: HF row-major flat index o*in + i of each Flax kernel entry (i, o)."""
  return (jnp.arange(out_dim, dtype=jnp.int32)[None, :] * in_dim
          + jnp.arange(in_dim, dtype=jnp.int32)[:, None])


def _prepare(kernel_IO: jax.Array, family: MethodFamily, sq_norms_I: jax.Array | None = None):
  """Per-component data shared by all levels of a chunk. Wanda: the rank of each weight's
  score |W_ij| * sqrt(s_j) in its output row (stable ascending: ties -> lower input index
  first, as `wanda.row_lowest`), or in its group of m (`compress.nm_rank`)."""
  if family.name == "nm":
    return {"rank": compress.nm_rank(kernel_IO.T, family.m).T}
  if family.name == "wanda":
    from dtm.compress import wanda as wanda_lib
    score_OI = wanda_lib.wanda_score(kernel_IO.T, sq_norms_I)
    if family.m is not None:
      return {"rank": compress.nm_rank(score_OI, family.m).T}
    order = jnp.argsort(score_OI, axis=1, stable=True)
    rows = jnp.arange(score_OI.shape[0])[:, None]
    rank_OI = jnp.zeros(score_OI.shape, jnp.int32).at[rows, order].set(
        jnp.arange(score_OI.shape[1], dtype=jnp.int32)[None, :])
    return {"rank": rank_OI.T}
  return {}


def _compress_kernel(kernel_IO, family: MethodFamily, arg, prep):
  """One probe's compressed kernel [in, out]; `arg` is the traced `dynamic_arg`."""
  in_dim, out_dim = kernel_IO.shape
  zero = jnp.zeros_like(kernel_IO)
  if family.name == "magnitude":
    # The k pruned weights are the first k in ascending (|w|, HF flat index) order,
    # found by counting (no sort): the same set as compress.magnitude.
    pruned = compress.magnitude_pruned(jnp.abs(kernel_IO), _hf_flat_index(in_dim, out_dim),
                                       arg.astype(jnp.int32))
    return jnp.where(pruned, zero, kernel_IO)
  if family.name == "absmax":
    return compress.absmax_values(kernel_IO.T, arg.astype(jnp.float32), family.granularity,
                                  family.group_size).T
  if family.name in ("nm", "wanda") and family.m is not None:
    keep = prep["rank"] >= family.m - arg.astype(jnp.int32)
    return jnp.where(keep, kernel_IO, zero)
  if family.name == "wanda":  # the k = arg lowest scores of each output row
    return jnp.where(prep["rank"] < arg.astype(jnp.int32), zero, kernel_IO)
  if family.name == "rtn":
    from dtm.compress import gptq as gptq_lib
    opts = dict(family.options)
    return gptq_lib._rtn(kernel_IO.T, arg.astype(jnp.int32), jnp.bool_(opts["sym"]),
                         group_size=family.group_size).w.T
  return kernel_IO


def _replace_kernel(lp, kind: str, kernel):
  module = kernel_path(kind)[1]
  return {**lp, module: {**lp[module], kind: {"kernel": kernel}}}


# ----------------------------------------------------------------------------- chunk

def probe_chunk(cfg: ModelConfig, params, h_in_LPSD, layer, kind_index, args_K, targets_PN,
                base, sq_norms=None, kernels_KIO=None, *, kinds: tuple[str, ...],
                family: MethodFamily, c: int):
  """Stats of K probes on component (layer, kinds[kind_index]), levels given by args_K
  [K] (f32).

  sq_norms: {kind: f32 [L, in]} Wanda's input statistics (wanda only); kernels_KIO: the
  K probes' compressed kernels [K, in, out] (precomputed families only; then `kinds` is
  that one kind and args_K is unused).

  h_in_LPSD: base residual stream at the input of every layer [L, P, S, D] (indexed
  here, inside the compiled call, so no per-layer slice is compiled); layer, kind_index:
  int32 scalars (traced: one compile serves every component of `kinds`, the kind picked
  by `lax.switch`); targets_PN = y; base: optional `metrics.HeadBase` (KL / top-1).
  Returns a dict of [K, P(, N)] arrays (`metrics.divergence_stats`) plus 'sparsity' [K]:
  fraction of zeros in the compressed kernel.
  """
  h_in_PSD = jax.lax.dynamic_index_in_dim(h_in_LPSD, layer, keepdims=False)
  p, s, d = h_in_PSD.shape
  k = args_K.shape[0]
  last = cfg.num_layers - 1
  positions = jnp.arange(s, dtype=jnp.int32)
  lp = _index_layer(params, layer)

  def compressed_layer(query_start):
    def branch(kind):
      def run():
        kernel = lp[kernel_path(kind)[1]][kind]["kernel"]

        def layer_with(w):
          h = apply_layer(cfg, _replace_kernel(lp, kind, w), h_in_PSD, positions, query_start)
          return h, jnp.mean(w == 0)
        if family.precomputed:
          return jax.vmap(layer_with)(kernels_KIO)  # [K, P, S', D], [K]
        s_I = None
        if family.name == "wanda":
          s_I = jax.lax.dynamic_index_in_dim(sq_norms[kind], layer, keepdims=False)
        prep = _prepare(kernel, family, s_I)
        return jax.vmap(lambda arg: layer_with(_compress_kernel(kernel, family, arg, prep)))(
            args_K)
      return run
    branches = [branch(kind) for kind in kinds]
    return branches[0]() if len(branches) == 1 else jax.lax.switch(kind_index, branches)

  def probed_last():  # the probed layer is the model's last: only its N query rows
    return compressed_layer(c - 1)

  def probed_earlier():  # layers l+1..L-2 on all rows, then the last layer's N rows
    h_KPSD, sparsity_K = compressed_layer(0)
    h = jax.lax.fori_loop(
        layer + 1, last,
        lambda i, h: apply_layer(cfg, _index_layer(params, i), h, positions),
        h_KPSD.reshape(k * p, s, d))
    h = apply_layer(cfg, _index_layer(params, last), h, positions, c - 1)
    return h.reshape(k, p, s - c + 1, d), sparsity_K

  h_KPND, sparsity_K = jax.lax.cond(layer == last, probed_last, probed_earlier)

  def stats(h_PND):
    return head_stats(cfg, params, h_PND, targets_PN, base)

  out = jax.lax.map(stats, h_KPND)
  out["sparsity"] = sparsity_K
  return out


@functools.lru_cache(maxsize=16)
def base_pass_fn(cfg: ModelConfig, c: int, mesh: Mesh):
  """The jit of `_base_pass` whose outputs (h_in, HeadBase) are replicated on `mesh`; one
  object per (cfg, c, mesh), so the launch estimate's compile is the run's."""
  return jax.jit(functools.partial(_base_pass, cfg, c=c), out_shardings=NamedSharding(mesh, PS()))


@functools.lru_cache(maxsize=64)
def chunk_fn(cfg: ModelConfig, mesh: Mesh, kinds: tuple[str, ...], family: MethodFamily,
             c: int):
  """The jitted call that `ProbeRunner` runs (and `dtm.aot` compiles ahead of time): one
  `probe_chunk` per 'probe' group in a `shard_map` manual over 'probe' only, so params
  sharded over 'model' stay tensor-parallel inside (XLA partitions the rest).

  Arguments: (params, h_in [L, P, S, D], layer [G] int32, kind [G] int32, args [G, K] f32,
  targets [P, N], base, sq_norms, kernels [G, K, in, out] | None), G = mesh 'probe' size.
  """
  chunk = functools.partial(probe_chunk, cfg, kinds=kinds, family=family, c=c)

  def local(params, h_in, layer_1, kind_1, args_1k, targets, base, sq_norms, kernels_1KIO):
    kernels = None if kernels_1KIO is None else kernels_1KIO[0]
    out = chunk(params, h_in, layer_1[0], kind_1[0], args_1k[0], targets, base, sq_norms,
                kernels)
    return jax.tree.map(lambda x: x[None], out)

  rep, dev = PS(), PS(PROBE_AXIS)
  return jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(rep, rep, dev, dev, dev, rep, rep, rep, dev),
      out_specs=dev, axis_names={PROBE_AXIS}, check_vma=False))


class ProbeRunner:
  """Compiles and runs `probe_chunk` once per 'probe' group in a `shard_map` over the
  'probe' axis of the ('probe', 'model') mesh (`probe_mesh`): each group gets its own
  component and levels (`Slot`); params are replicated over 'probe' and tensor-parallel
  over 'model' (`param_shardings`), the base pass replicated. One compile per method family
  covers the component kinds `kinds`. On a CPU host with one JAX device per core
  (`dtm.cli.set_cpu_devices`) and 'model' = 1 this runs one probe per core, which beats
  splitting each matmul over the cores."""

  def __init__(self, cfg: ModelConfig, params, seq_PS: np.ndarray, c: int, mesh: Mesh,
               kl: bool = True, kinds: tuple[str, ...] = KINDS, statistics=None):
    """statistics: {Component: calibration.InputStats} of the original model, for the
    calibrated families (wanda: sq_norms; sparsegpt, gptq: hessian) on the probed
    components."""
    self.cfg, self.params, self.c, self.mesh = cfg, params, c, mesh
    self.kinds = tuple(kinds)
    self.statistics = statistics
    self.num_devices = mesh.shape[PROBE_AXIS]  # slots per call
    self.uniform = mesh.shape[MODEL_AXIS] > 1  # one component per call (`schedule`)
    rep = NamedSharding(mesh, PS())
    if mesh.shape[MODEL_AXIS] > 1:
      params = self.params = jax.device_put(params, param_shardings(mesh, params))
    # The base pass is data-parallel over prompts when they divide evenly; its outputs
    # are gathered to every device (each probe needs all prompts).
    p = seq_PS.shape[0]
    seq_sh = NamedSharding(mesh, PS("probe")) if p % self.num_devices == 0 else rep
    seq = jax.device_put(jnp.asarray(seq_PS), seq_sh)
    self.h_in, base = base_pass_fn(cfg, c, mesh)(params, seq)
    self.base = base if kl else None
    self.targets = jax.device_put(jnp.asarray(seq_PS[:, c:]), rep)
    self.sq_norms = None
    if statistics:
      self.sq_norms = jax.device_put(_sq_norm_tables(params, statistics, self.kinds), rep)
    self._fns = {}

  def _fn(self, kinds: tuple[str, ...], family: MethodFamily):
    key = (kinds, family)
    if key not in self._fns:
      self._fns[key] = chunk_fn(self.cfg, self.mesh, kinds, family, self.c)
    return self._fns[key]

  def run_slots(self, family: MethodFamily, slots: list[Slot],
                kinds: tuple[str, ...] | None = None):
    """Dispatch one call (asynchronously): slot i runs on device i; `kinds` (default: the
    runner's) selects the compiled function and must hold every slot's kind. Returns
    device arrays [num_devices, k, ...] (`probe_chunk`'s outputs per slot and level), k
    the longest slot; shorter slots repeat their last level and missing slots repeat the
    last slot (padding: ignore entries beyond each slot's own length)."""
    kinds = self.kinds if kinds is None else tuple(kinds)
    if not slots or len(slots) > self.num_devices:
      raise ValueError(f"a call takes 1..{self.num_devices} slots, got {len(slots)}")
    if family.precomputed:  # one compile per kind: the kernels' shape is the kind's
      kinds = tuple(sorted({s.component.kind for s in slots}))
      if len(kinds) != 1:
        raise ValueError(f"a {family.name} call takes slots of one kind, got {kinds}")
    if self.uniform and len({s.component for s in slots}) != 1:
      raise ValueError("with a 'model' mesh axis a call takes slots of one component "
                       "(schedule(..., uniform=True))")
    missing = {s.component.kind for s in slots} - set(kinds)
    if missing:
      raise ValueError(f"kinds {sorted(missing)} are not among the compiled kinds {kinds}")
    if family.calibrated and not self.statistics:
      raise ValueError(f"{family.name} probes need the runner's calibration statistics")
    k = max(len(s.args) for s in slots)
    slots = slots + [slots[-1]] * (self.num_devices - len(slots))
    layers = np.asarray([s.component.layer for s in slots], np.int32)
    kind_ids = np.asarray([kinds.index(s.component.kind) for s in slots], np.int32)
    args = np.asarray([list(s.args) + [s.args[-1]] * (k - len(s.args)) for s in slots],
                      np.float32)
    dev = NamedSharding(self.mesh, PS("probe"))
    put = lambda x: jax.device_put(x, dev)
    kernels = None
    if family.precomputed:
      kernels = put(self._precompute(family, slots, k))
    return self._fn(kinds, family)(self.params, self.h_in, put(layers), put(kind_ids),
                                   put(args), self.targets, self.base,
                                   self.sq_norms if family.name == "wanda" else None, kernels)

  def _precompute(self, family: MethodFamily, slots: list[Slot], k: int) -> jax.Array:
    """[num_devices, k, in, out] compressed kernels of the (padded) slots: each probe's
    `compress.compress_calibrated` with its component's statistics (DtmError naming the
    component if a Hessian cannot be factored)."""
    done: dict[tuple[Component, float], np.ndarray] = {}
    rows = []
    for slot in slots:
      comp = slot.component
      kernel_LIO = get_path(self.params, kernel_path(comp.kind))
      if family.name == "sparsegpt" and family.m is None:  # all rates: one compiled solve
        done.update(self._sparsegpt_levels(family, comp, kernel_LIO, slot.args))
      row = []
      for arg in list(slot.args) + [slot.args[-1]] * (k - len(slot.args)):
        if (comp, arg) not in done:
          new, _ = compress.compress_calibrated(
              compress._layer_kernel(kernel_LIO, comp.layer), family_method(family, arg),
              self.statistics[comp], comp, kernel=True)
          done[(comp, arg)] = new
        row.append(done[(comp, arg)])
      rows.append(jnp.stack(row))
    return jnp.stack(rows)

  def _sparsegpt_levels(self, family: MethodFamily, comp: Component, kernel_LIO, rates):
    """{(comp, rate): kernel [in, out]} of sparsegpt(rate) at every rate of a slot, from
    one Hessian factorization and one compiled call (`sparsegpt.sparsegpt_levels`)."""
    from dtm.compress import sparsegpt as sparsegpt_lib
    rates = tuple(sorted({float(r) for r in rates if r > 0}))
    if not rates:
      return {}
    opts = dict(family.options)
    w_OI = compress._layer_kernel(kernel_LIO, comp.layer).T
    new_KOI, damp = sparsegpt_lib.sparsegpt_levels(
        w_OI, self.statistics[comp].hessian, rates, percdamp=opts.get("percdamp", 0.01),
        blocksize=opts.get("blocksize", 128))
    if not np.isfinite(float(damp)):  # the per-rate path's message, naming the component
      compress.compress_calibrated(w_OI, family_method(family, rates[0]), self.statistics[comp],
                                   comp)
    return {(comp, r): new_KOI[i].T for i, r in enumerate(rates)}

  def stream(self, calls, kinds: tuple[str, ...] | None = None, gather=jax.device_get):
    """Run calls [(family, [Slot])] with one call in flight and yield, per call, (slots,
    [per-slot outputs]): each {name: host array [len(slot.keys), ...]} (padding dropped),
    fetched with `gather` (multi-host: an all-gather). Call k+1 is dispatched before call
    k is yielded, so the consumer's work (writing records) overlaps it; it waits for call
    k first, since queueing several multi-device calls on a CPU host lets them compete
    for the cores (~15 % slower, measured)."""
    pending = None
    for family, slots in calls:
      if pending is not None:
        jax.block_until_ready(pending[1])
      out = self.run_slots(family, slots, kinds)
      if pending is not None:
        yield self._unpack(*pending, gather)
      pending = (slots, out)
    if pending is not None:
      yield self._unpack(*pending, gather)

  @staticmethod
  def _unpack(slots, out, gather):
    host = gather(out)
    return slots, [{name: v[i, :len(slot.keys)] for name, v in host.items()}
                   for i, slot in enumerate(slots)]

  def run(self, component: Component, family: MethodFamily, args: list[float]):
    """All levels (args) of one component, spread over the devices; blocks until done and
    returns host arrays [len(args), ...] in the order of args. Compiles for this kind
    alone."""
    calls = [(family, call) for call in
             schedule({component: list(enumerate(args))}, self.num_devices, len(args),
                      self.uniform)]
    out = {}
    for slots, outs in self.stream(calls, kinds=(component.kind,)):
      for slot, res in zip(slots, outs):
        for j, key in enumerate(slot.keys):
          for name, v in res.items():
            out.setdefault(name, [None] * len(args))[key] = v[j]
    return {name: np.stack(v) for name, v in out.items()}


def _sq_norm_tables(params, statistics, kinds: tuple[str, ...]) -> dict[str, np.ndarray]:
  """{kind: f32 [L, in]}: Wanda's sq_norms of each layer's `kind` input (zeros where the
  statistics hold no entry)."""
  tables = {}
  for kind in kinds:
    shape = get_path(params, kernel_path(kind)).shape  # [L, in, out]
    table = np.zeros(shape[:2], np.float32)
    for comp, st in statistics.items():
      if comp.kind == kind:
        table[comp.layer] = np.asarray(st.sq_norms, np.float32)
    tables[kind] = table
  return tables
