"""What a compression spec means for training: sparsity masks, fake quantization with a
straight-through estimator, and the AC/DC phase schedule.

A spec's components split into
  * *pruned* components (methods in PRUNING_METHODS): their zeros are kept exactly zero
    by a boolean mask (updates masked, params re-masked after every optimizer update);
  * *quantized* components (every other non-identity method, e.g. absmax): the forward
    pass uses the quantized weights, the gradient flows to the float master weights
    unchanged (straight-through estimator, w + stop_gradient(q(w) − w));
  * *activation* components (w8a8, llm_int8; `dtm.compress.act_quant`): the kernel stays
    float and `quantize` adds the per-kind mode leaves, as constants outside the
    differentiated tree; the model's matmul quantizes x and w in the forward pass and has
    the float matmul's gradient (straight-through).

Masks are a flat dict {param path 'layers/attn/q/kernel': bool [L, in, out]} holding only
the kinds with at least one pruned layer (True = weight kept; layers of that kind that are
not pruned are all True).
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp

from dtm import compress
from dtm.components import get_path, kernel_path
from dtm.compress import _compress_layers, _set_path, act_quant

PRUNING_METHODS = ("magnitude", "nm", "wanda", "sparsegpt")


def path_key(path: tuple[str, ...]) -> str:
  return "/".join(path)


def key_path(key: str) -> tuple[str, ...]:
  return tuple(key.split("/"))


@dataclasses.dataclass(frozen=True)
class CompressionPlan:
  """A validated spec split by role (hashable: a static jit argument).

  pruned / quantized / activation: ((kind, method, layers), ...) groups, layers a sorted
  tuple.
  """
  spec: compress.Spec
  pruned: tuple[tuple[str, compress.Method, tuple[int, ...]], ...]
  quantized: tuple[tuple[str, compress.Method, tuple[int, ...]], ...]
  activation: tuple[tuple[str, compress.Method, tuple[int, ...]], ...] = ()

  @property
  def mask_kinds(self) -> tuple[str, ...]:
    return tuple(sorted({kind for kind, _, _ in self.pruned}))

  @property
  def components(self) -> int:
    return sum(len(layers) for _, _, layers in self.pruned + self.quantized + self.activation)


def make_plan(spec, params) -> CompressionPlan:
  """Validate `spec` against `params` and group its components (DtmError if it does not
  fit the model)."""
  num_layers, shapes = compress.kernel_shapes(params)
  spec = compress.validate(spec, num_layers, shapes)
  groups: dict[tuple[str, compress.Method], list[int]] = collections.defaultdict(list)
  for comp, method in spec.resolve(num_layers).items():
    groups[(comp.kind, method)].append(comp.layer)
  pruned, quantized, activation = [], [], []
  for (kind, method), layers in groups.items():
    role = (pruned if method.name in PRUNING_METHODS else
            activation if method.name in act_quant.ACTIVATION_METHODS else quantized)
    role.append((kind, method, tuple(layers)))
  return CompressionPlan(spec, tuple(pruned), tuple(quantized), tuple(activation))


def derive_masks(plan: CompressionPlan, compressed_params) -> dict[str, jax.Array]:
  """Masks of the pruned components from params the spec was just applied to: a weight
  is kept iff it is nonzero (every zero the compression made stays zero)."""
  masks = {}
  for kind in plan.mask_kinds:
    kernel = get_path(compressed_params, kernel_path(kind))
    layers = sorted({l for k, _, ls in plan.pruned if k == kind for l in ls})
    keep = jnp.ones(kernel.shape, bool).at[jnp.asarray(layers)].set(kernel[jnp.asarray(layers)] != 0)
    masks[path_key(kernel_path(kind))] = keep
  return masks


def apply_masks(tree, masks: dict[str, jax.Array]):
  """Zero the masked-out entries of a params-shaped tree (params or updates)."""
  for key, keep in masks.items():
    path = key_path(key)
    leaf = get_path(tree, path)
    tree = _set_path(tree, path, jnp.where(keep, leaf, jnp.zeros_like(leaf)))
  return tree


def prune(plan: CompressionPlan, params):
  """Apply the pruning part of the plan to (current) params -> (params, masks): the spec's
  own methods re-derive the masks from the current weights (AC/DC phase starts).

  Calibrated methods (wanda, sparsegpt) need statistics of the model's inputs, which a
  train step does not have: their components must arrive already compressed (the jobs
  apply the spec with `jobs.common.compress_model`), and their masks are the zeros of
  those weights (`check_precompressed` verifies it)."""
  for kind, method, layers in plan.pruned:
    if method.name in compress.CALIBRATED_METHODS:
      continue
    path = kernel_path(kind)
    kernel, _ = _compress_layers(get_path(params, path), jnp.asarray(layers, jnp.int32),
                                 method=method, batch_size=None)
    params = _set_path(params, path, kernel)
  return params, derive_masks(plan, params)


def calibrated(plan: CompressionPlan) -> dict[str, tuple[str, ...]]:
  """{'pruned': methods, 'quantized': methods} of the plan that need calibration."""
  return {role: tuple(sorted({m.to_string() for _, m, _ in groups
                              if m.name in compress.CALIBRATED_METHODS}))
          for role, groups in (("pruned", plan.pruned), ("quantized", plan.quantized))}


def expected_sparsity(method: compress.Method) -> float:
  """Least fraction of zeros a pruning method leaves in a weight: rate, or 1 - n/m
  (rates round down per row or matrix, so the check allows one weight per row less)."""
  a = method.kwargs
  return 1.0 - a["n"] / a["m"] if "m" in a else a["rate"]


def check_precompressed(plan: CompressionPlan, params) -> None:
  """DtmError unless every calibrated pruned component of `params` already holds the
  zeros its method makes (at least its rate, less one weight per row of rounding)."""
  from dtm.errors import DtmError
  for kind, method, layers in plan.pruned:
    if method.name not in compress.CALIBRATED_METHODS:
      continue
    kernel = get_path(params, kernel_path(kind))
    in_dim = kernel.shape[1]
    need = expected_sparsity(method) - 1.0 / in_dim
    zeros = jax.device_get(jnp.mean(kernel[jnp.asarray(layers)] == 0, axis=(1, 2)))
    for layer, z in zip(layers, zeros):
      if z < need:
        raise DtmError(
            f"{method.to_string()} on L{layer:02d}.{kind}: the weights given to the trainer "
            f"have {z:.1%} zeros, expected >= {expected_sparsity(method):.1%}; calibrated "
            f"methods need input statistics a train step does not have, so pass params "
            f"already compressed with them (dtm.jobs.common.compress_model or "
            f"dtm.compress.calibration.calibrate_and_compress) and the original model as "
            f"teacher_params")


def quantize(plan: CompressionPlan, params, *, ste: bool):
  """Params whose quantized components hold their quantized values. With `ste`, the
  values are w + stop_gradient(q(w) − w): the forward sees q(w), the gradient w.r.t. w
  is the identity (straight-through estimator). Activation components get their mode
  leaves (`act_quant.attach`; their matmul is straight-through whatever `ste`).
  Traceable (used inside the train step)."""
  for kind, method, layers in plan.quantized:
    path = kernel_path(kind)
    kernel = get_path(params, path)
    q, _ = _compress_layers(jax.lax.stop_gradient(kernel), jnp.asarray(layers, jnp.int32),
                            method=method, batch_size=None)
    params = _set_path(params, path, kernel + jax.lax.stop_gradient(q - kernel) if ste else q)
  if plan.activation:
    params = act_quant.attach(params, {compress.Component(l, kind): method
                                       for kind, method, layers in plan.activation
                                       for l in layers})
  return params


def sparsity_by_kind(params) -> dict[str, jax.Array]:
  """Fraction of exact zeros of each kind's stacked kernel: {kind: f32 []}."""
  out = {}
  for kind in compress.KINDS:
    try:
      kernel = get_path(params, kernel_path(kind))
    except (KeyError, TypeError):
      continue
    out[kind] = jnp.mean(kernel == 0, dtype=jnp.float32)
  return out


# ------------------------------------------------------------------------------ AC/DC


@dataclasses.dataclass(frozen=True)
class AcdcSchedule:
  """Alternating compressed / decompressed phases (Peste et al. 2021, AC/DC).

  Steps are 0-based update indices in [0, total). Layout: `dense_warmup` decompressed
  steps; then cycles of `compressed` compressed and `decompressed` decompressed steps;
  the last `final_compressed` steps are one compressed phase. compressed = decompressed =
  0 disables the alternation (everything after the warm-up is compressed). In compressed
  phases the masks are enforced; at the start of each compressed phase that follows a
  decompressed one, the masks are re-derived from the current weights by the spec.
  """
  total: int
  dense_warmup: int = 0
  compressed: int = 0
  decompressed: int = 0
  final_compressed: int = 0

  @property
  def alternating(self) -> bool:
    return self.compressed > 0 or self.decompressed > 0

  def is_compressed(self, step: int) -> bool:
    if step < self.dense_warmup:
      return False
    if not self.alternating or step >= self.total - self.final_compressed:
      return True
    offset = (step - self.dense_warmup) % (self.compressed + self.decompressed)
    return offset < self.compressed

  def remask_at(self, step: int) -> bool:
    """True if a compressed phase starts at `step` after decompressed training."""
    return self.is_compressed(step) and step > 0 and not self.is_compressed(step - 1)

