"""One calibrated method on every kind of a layer that reads the same input site, in one
compiled call: q, k, v (the attention input), gate, up (the MLP input), o and down alone.

The kinds of a site share their input statistics (one `InputStats`, one Hessian), and
Wanda, SparseGPT and GPTQ treat every output row of W [out, in] on its own given those
statistics (except SparseGPT's unstructured per-block threshold, taken per kind here).
So the site's kernels [in, out_k] are solved side by side as one [in, sum_k out_k]:
one Hessian factorization per site instead of one per kind, one column loop, one
compilation per (site shapes, method) whatever the rate, and no host round trip
between kinds. The results equal one `apply.compress_calibrated` per kind (tested; the
layouts differ by transposes only).
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dtm.compress import gptq as gptq_lib
from dtm.compress import sparsegpt as sparsegpt_lib
from dtm.compress import wanda as wanda_lib
from dtm.compress.elementwise import _dtype_bits, _stats
from dtm.compress.spec import Method

METHODS: tuple[str, ...] = ("wanda", "sparsegpt", "gptq")


def compress_site(kernels_IO: Mapping[str, jax.Array], method: Method, stats, *,
                  keep_grid: bool = False) -> tuple[dict[str, jax.Array], dict[str, dict]]:
  """`method` (one of METHODS) on the Flax kernels {kind: [in, out_k]} of one
  site -> ({kind: new kernel [in, out_k]}, {kind: stats dict}); device arrays, no sync.

  `stats`: the site's input statistics (sq_norms f32 [in] for wanda, hessian f32 [in, in]
  for sparsegpt / gptq). The stats dicts are `compress_calibrated`'s: 'sparsity', 'bits',
  'damp' (sparsegpt, gptq; NaN when H could not be factorized: check it, e.g. with
  `failed`), 'grid' (gptq with keep_grid: its `gptq.Grid`, HF layout, device arrays).
  """
  if method.name not in METHODS:
    raise ValueError(f"{method.name} is not one of {METHODS}")
  kinds = tuple(kernels_IO)
  kernels = tuple(kernels_IO[k] for k in kinds)
  a = method.kwargs
  if method.name == "wanda":
    news, extra = _wanda_site(kernels, stats.sq_norms, method), {}
  elif method.name == "sparsegpt":
    in_dim = kernels[0].shape[0]
    ks = None
    if a.get("rate"):
      ks = jnp.asarray([sparsegpt_lib.block_counts(a["rate"], k.shape[1], in_dim, a["blocksize"])
                        for k in kernels], jnp.int32)
    nm = (a["n"], a["m"]) if "m" in a else None
    news, damp = _sparsegpt_site(kernels, stats.hessian, ks, nm=nm, percdamp=a["percdamp"],
                                 blocksize=a["blocksize"])
    extra = {"damp": damp}
  else:
    static = a["act_order"] if a.get("static_groups") is None else a["static_groups"]
    news, damp, grids = _gptq_site(
        kernels, stats.hessian, jnp.int32(a["bits"]), jnp.bool_(a["sym"]),
        jnp.bool_(a["act_order"]), jnp.bool_(static),
        jnp.asarray(gptq_lib._damp_schedule(a["damp"]), jnp.float32),
        group_size=None if a.get("group_size") in (None, -1) else a["group_size"],
        block_size=a["block_size"], keep_grid=keep_grid)
    extra = {"damp": damp}
  bits = a["bits"] if method.name == "gptq" else _dtype_bits(kernels[0].dtype)
  new_kernels, out = {}, {}
  for i, kind in enumerate(kinds):
    new_kernels[kind] = news[i]
    out[kind] = {**_site_stats(news[i], bits), **extra}
    if method.name == "gptq" and keep_grid:
      out[kind]["grid"] = grids[i]
  return new_kernels, out


def failed(stats_by_kind: Mapping[str, dict]) -> bool:
  """True if a (host) stats dict of `compress_site` has a non-finite 'damp'."""
  return any("damp" in s and not np.isfinite(s["damp"]) for s in stats_by_kind.values())


@functools.partial(jax.jit, static_argnames=("bits",))
def _site_stats(kernel_IO, bits: int):
  return _stats(kernel_IO, bits)


def _concat(kernels):
  return kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=1)


def _split(k_IO, kernels):
  ends = np.cumsum([k.shape[1] for k in kernels])[:-1]
  return tuple(jnp.split(k_IO, ends, axis=1))


@functools.partial(jax.jit, static_argnames=("method",))
def _wanda_site(kernels, sq_norms_I, method: Method):
  w_OI = _concat(kernels).T
  return _split(wanda_lib.wanda(w_OI, sq_norms_I, **method.kwargs).T, kernels)


@functools.partial(jax.jit, static_argnames=("nm", "percdamp", "blocksize"))
def _sparsegpt_site(kernels, hessian_II, ks_S2, *, nm, percdamp: float, blocksize: int):
  k_IO = _concat(kernels)
  w_OI, h = sparsegpt_lib.prepare_hessian(k_IO.T, hessian_II)
  u, damp = sparsegpt_lib.inverse_hessian_factor(h, percdamp)
  n, m = nm if nm is not None else (None, None)
  new = sparsegpt_lib.obs_prune_kernel(w_OI.T, u, tuple(k.shape[1] for k in kernels), ks_S2,
                                       n, m, blocksize)
  return _split(new.astype(k_IO.dtype), kernels), damp


@functools.partial(jax.jit, static_argnames=("group_size", "block_size", "keep_grid"))
def _gptq_site(kernels, hessian_II, bits, sym, act_order, static_groups, damps, *,
               group_size, block_size: int, keep_grid: bool):
  res = gptq_lib._gptq(_concat(kernels).T, hessian_II, bits, sym, act_order, static_groups,
                       damps, group_size=group_size, block_size=block_size)
  news = _split(res.w.T, kernels)
  grids = ()
  if keep_grid:
    ends = np.cumsum([k.shape[1] for k in kernels])
    grids = tuple(gptq_lib.grid_of(res._replace(codes=res.codes[s:e], scale=res.scale[s:e],
                                                zero=res.zero[s:e]))
                  for s, e in zip([0, *ends[:-1]], ends))
  return news, res.damp, grids
