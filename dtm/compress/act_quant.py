"""Activation-aware linears (W8A8, LLM.int8) chosen per component, at one interception point.

Where the interception lives: every matmul of a decoder-layer linear (q, k, v, o, gate,
up, down) goes through `dtm.model._dot(x, kernel, dtype, act)`, which calls `dot` here.
With act None (every model without activation methods) `dot` is the plain float matmul,
the same code the model always ran; no copy of the model code exists.

How a component's mode reaches the dot: `attach` (called by `compress.apply_spec` for the
spec's w8a8 / llm_int8 components, and by `dtm.train.masks.quantize` in training) puts two
extra leaves beside the stacked kernel of each kind that has at least one such component:

  params['layers'][module][kind] = {'kernel': [L, in, out],
                                    'act_mode': int32 [L],       MODES: 0 float, 1 w8a8, 2 llm_int8
                                    'act_threshold': float32 [L]} llm_int8's outlier threshold
                                                                  (0 where unused)

`nn.scan` slices every leaf of the 'params' collection along the layer axis, so inside
the scanned layer `Linear` / `Kernel` read a scalar mode and threshold (`read`) and
`dot` dispatches with `lax.switch(mode, ...)` (one branch runs; under vmap, e.g. in the
probes, the switch becomes a select and every branch runs: correct, only slower). Kinds
without a w8a8 / llm_int8 component get no leaves, so a params tree without activation
methods is exactly the tree of today (checkpoints, HF export, every caller unchanged);
callers keep passing `{'params': params}`. The fused gate/up matmul is used only when
neither of the two has leaves.

The quantized branches are `dtm.compress.int8`'s (bitsandbytes-checked): w8a8 = per-token
dynamic symmetric int8 activations x per-output-channel int8 weights, exact int32
accumulation, rescale; llm_int8 = input columns with |x| >= threshold anywhere in the
current call (all tokens of the batch) in the compute dtype with the float weights, the
rest vector-wise int8. Both are computed from the compute-dtype x and kernel (the values
the float matmul would see). Their backward pass is always the float matmul's
(straight-through estimator), so training fake-quantizes with gradients to the float
master weights; evaluation takes no gradient and sees only the forward.

Sequential calibration (`calibration.calibrate_and_compress`) gives a w8a8 / llm_int8
layer its scalar leaves (`layer_leaves`) before running it, so the statistics of later
layers are taken on its quantized output.

The int32 mode leaves are not differentiable: training keeps them out of the
differentiated tree (`dtm.train.masks.quantize` adds them inside the loss, as constants).
`strip` removes them (e.g. before writing a dense checkpoint).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dtm.compress import int8
from dtm.components import Component, get_path, kernel_path
from dtm.errors import DtmError

MODES: dict[str, int] = {"float": 0, "w8a8": 1, "llm_int8": 2}
ACTIVATION_METHODS: frozenset[str] = frozenset({"w8a8", "llm_int8"})
MODE_LEAF, THRESHOLD_LEAF = "act_mode", "act_threshold"


# ------------------------------------------------------------------------ the dot product


@jax.custom_vjp
def _llm_int8_ste(x, w_OI, threshold):
  """int8._llm_int8 with a traced f32 threshold [] (outlier_weights='float'); backward of
  the float matmul, zero cotangent for the threshold."""
  outlier, qx, ax = int8.llm_int8_split(x, threshold)
  qw, aw = int8.quantize_weight(w_OI)
  y = int8._rescale(int8.int8_matmul(qx, qw), ax, aw)
  x_out = jnp.where(outlier, x, jnp.zeros_like(x))
  y_out = lax.dot_general(x_out, w_OI.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
  return (y + y_out).astype(x.dtype)


def _llm_int8_fwd(x, w_OI, threshold):
  return _llm_int8_ste(x, w_OI, threshold), (x, w_OI, threshold)


def _llm_int8_bwd(res, g):
  x, w_OI, threshold = res
  dx, dw = int8._float_matmul_vjp((x, w_OI), g)
  return dx, dw, jnp.zeros_like(threshold)


_llm_int8_ste.defvjp(_llm_int8_fwd, _llm_int8_bwd)


def _float_branch(x, w_IO, threshold):
  del threshold
  return jnp.dot(x, w_IO, preferred_element_type=jnp.float32)


def _w8a8_branch(x, w_IO, threshold):
  del threshold
  return int8.w8a8_matmul_ste(x, w_IO.T).astype(jnp.float32)


def _llm_int8_branch(x, w_IO, threshold):
  return _llm_int8_ste(x, w_IO.T, threshold.astype(jnp.float32)).astype(jnp.float32)


_BRANCHES = (_float_branch, _w8a8_branch, _llm_int8_branch)  # index = MODES value


def dot(x: jax.Array, kernel_IO: jax.Array, dtype, act=None) -> jax.Array:
  """x [..., in] @ kernel [in, out] -> float32 [..., out], with x and the kernel in the
  compute `dtype`. act None: the float matmul (f32 accumulation). act = (mode int32 [],
  threshold f32 []): `lax.switch` over float / w8a8 / llm_int8 (module docstring)."""
  x, w = x.astype(dtype), kernel_IO.astype(dtype)
  if act is None:
    # As a 2-D [tokens, in] matmul: autodiff then gives the weight gradient as one
    # x^T dy dot; with [B, T, in] (two contracted axes) XLA:CPU first copied dy into a
    # transposed layout (a layer's backward ran 22 % slower on a 2-core Xeon).
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], w.shape[-1])
  mode, threshold = act
  return lax.switch(mode, _BRANCHES, x, w, threshold)


def read(module):
  """(mode, threshold) leaves of a bound Flax module (`Linear` / `Kernel`), or None if the
  module has none (no activation method on this kind)."""
  if not module.has_variable("params", MODE_LEAF):
    return None
  return module.get_variable("params", MODE_LEAF), module.get_variable("params", THRESHOLD_LEAF)


# --------------------------------------------------------------------------- params tree


def _set(tree, path: tuple[str, ...], value):
  """Copy of `tree` with tree[path] = value (the last key may be new); only the dicts
  along the path are copied."""
  new = dict(tree)
  new[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
  return type(tree)(new) if not isinstance(tree, dict) else new


def attach(params, methods: Mapping[Component, "object"]):
  """Copy of `params` with the mode / threshold leaves of every kind named in `methods`
  (Component -> compress.Method, each w8a8 or llm_int8); layers of that kind not named
  keep the mode they had (float if the leaves are new). Other leaves are the same arrays.
  Traceable (the leaves are built on the host from static methods)."""
  by_kind: dict[str, dict[int, object]] = {}
  for comp, method in methods.items():
    if method.name not in ACTIVATION_METHODS:
      raise ValueError(f"{method.name} is not an activation method")
    by_kind.setdefault(comp.kind, {})[comp.layer] = method
  for kind, layers in by_kind.items():
    module_path = kernel_path(kind)[:-1]
    num_layers = get_path(params, kernel_path(kind)).shape[0]
    module = get_path(params, module_path)
    mode = jnp.asarray(module[MODE_LEAF]) if MODE_LEAF in module else jnp.zeros(num_layers, jnp.int32)
    thr = (jnp.asarray(module[THRESHOLD_LEAF]) if THRESHOLD_LEAF in module
           else jnp.zeros(num_layers, jnp.float32))
    idx = np.asarray(sorted(layers), np.int32)
    mode = mode.at[idx].set(np.asarray([MODES[layers[l].name] for l in sorted(layers)], np.int32))
    thr = thr.at[idx].set(np.asarray([layers[l].kwargs.get("threshold", 0.0) for l in sorted(layers)],
                                     np.float32))
    params = _set(params, module_path + (MODE_LEAF,), mode)
    params = _set(params, module_path + (THRESHOLD_LEAF,), thr)
  return params


def layer_leaves(module_params: Mapping, method) -> dict:
  """One layer's module params ({'kernel': [in, out], ...}, no L axis) with the scalar
  mode / threshold leaves of an activation `method` (what `read` sees inside the scan)."""
  if method.name not in ACTIVATION_METHODS:
    raise ValueError(f"{method.name} is not an activation method")
  return {**module_params, MODE_LEAF: jnp.int32(MODES[method.name]),
          THRESHOLD_LEAF: jnp.float32(method.kwargs.get("threshold", 0.0))}


def has_leaves(params) -> bool:
  """True if any kind of `params` carries activation-mode leaves."""
  from dtm.components import KINDS
  for kind in KINDS:
    try:
      if MODE_LEAF in get_path(params, kernel_path(kind)[:-1]):
        return True
    except (KeyError, TypeError):
      continue
  return False


def strip(params):
  """Copy of `params` without activation-mode leaves (the dense float model)."""
  from dtm.components import KINDS
  for kind in KINDS:
    module_path = kernel_path(kind)[:-1]
    try:
      module = get_path(params, module_path)
    except (KeyError, TypeError):
      continue
    if MODE_LEAF in module:
      kept = {k: v for k, v in module.items() if k not in (MODE_LEAF, THRESHOLD_LEAF)}
      params = _set(params, module_path, kept if isinstance(module, dict) else type(module)(kept))
  return params


def check_no_leaves(params, what: str) -> None:
  """DtmError if `params` carry activation modes that `what` (an output) cannot hold."""
  if has_leaves(params):
    raise DtmError(f"{what} cannot hold the activation quantization of w8a8 / llm_int8 "
                   f"components (it is applied at run time, inside the matmul); pass the spec "
                   f"to the evaluate job instead, or export w8a8 with "
                   f"export_format=compressed-tensors")
