"""The jitted, sharded train step: masked AdamW on fake-quantized, distilled Llama.

State (a dict pytree, checkpointed whole): params (float32 master weights), opt_state
(optax), masks (`dtm.train.masks`), step (int32 []), rng (uint32 key data [2]).

One step on a global batch int32 [B, T + 1] (inputs [:, :-1], targets [:, 1:]):
  1. the batch is split into `microbatches` of B / A rows; a `lax.scan` accumulates the
     gradient of the summed loss (`objective.LossSums.loss`) and the token counts, so
     the result is the token-weighted mean over the whole batch;
  2. forward: params -> fake-quantized (STE) params -> Llama hidden -> chunked loss; the
     frozen teacher's forward runs in the same step under stop_gradient when distilling;
  3. clip by global norm, AdamW (decay mask from `decay_mask`), warm-up + cosine LR;
  4. in compressed phases the updates and then the new params are masked;
  5. a non-finite loss or gradient norm is flagged in the metrics; the host stops there
     before anything later is saved, so a bad state never reaches a checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as PS

from dtm.model import Llama, head_matrix
from dtm.model_config import ModelConfig
from dtm.train import masks as masks_lib
from dtm.train import sharding
from dtm.train.objective import LossSums, Objective, chunked_loss


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW + warm-up/cosine; see configs/train.py for the meaning of each field."""
  lr: float
  warmup_steps: int
  total_steps: int
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  decay_norms: bool = False
  decay_embeddings: bool = False


def lr_schedule(oc: OptimConfig):
  """Linear warm-up from 0 to lr over warmup_steps, then cosine to lr·min_lr_ratio at
  total_steps."""
  warmup = min(oc.warmup_steps, oc.total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup > 0 else oc.lr, peak_value=oc.lr, warmup_steps=warmup,
      decay_steps=max(oc.total_steps, warmup + 1), end_value=oc.lr * oc.min_lr_ratio)


def decay_mask(params, oc: OptimConfig):
  """True where weight decay applies: linear kernels always, norm scales and the
  embedding only if configured."""
  def rule(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    if names[-1] == "scale":
      return oc.decay_norms
    if names[0] == "embed":
      return oc.decay_embeddings
    return True
  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(oc: OptimConfig, params) -> optax.GradientTransformation:
  """AdamW with the schedule and decay mask (clipping happens in `train_step`, which
  already has the global norm)."""
  return optax.adamw(lr_schedule(oc), b1=oc.b1, b2=oc.b2, eps=oc.eps,
                     weight_decay=oc.weight_decay, mask=decay_mask(params, oc))


def init_state(params, masks, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  return {"params": params, "opt_state": tx.init(params), "masks": masks,
          "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.PRNGKey(seed))}


def teacher_copy(cfg: ModelConfig, params):
  """The frozen distillation teacher in the compute dtype `cfg.dtype`. Every use of a
  parameter casts it to that dtype first (`model._dot`, `RMSNorm`, `nn.Embed`, the loss's
  head chunks), so the teacher's forward is bit-identical to the one on float32 master
  weights, and with float32 params and bfloat16 compute it holds half the memory (and XLA
  keeps no bfloat16 copy of a float32 teacher beside it)."""
  dt = jnp.dtype(cfg.dtype)
  return jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating)
                      and jnp.dtype(a.dtype).itemsize > dt.itemsize else a, params)


def _final_hidden(cfg: ModelConfig, params, tokens_BT):
  model = Llama(cfg)
  h, _ = model.apply({"params": params}, tokens_BT, method=Llama.hidden)
  return model.apply({"params": params}, h, method=Llama.normed)


def batch_loss(cfg: ModelConfig, obj: Objective, plan: masks_lib.CompressionPlan, params,
               teacher_params, batch_BT1, rows=None) -> LossSums:
  """`LossSums` of one (micro)batch [b, T + 1] for the fake-quantized params. `rows`: the
  sharding of the batch's rows (a NamedSharding of a [b, ...] array), kept on the tokens
  and hidden states so XLA splits activations by rows, not by the params' feature axes."""
  keep = (lambda a: a) if rows is None else (
      lambda a: jax.lax.with_sharding_constraint(
          a, NamedSharding(rows.mesh, PS(rows.spec[0], *([None] * (a.ndim - 1))))))
  batch_BT1 = keep(batch_BT1)
  tokens, targets = batch_BT1[:, :-1], batch_BT1[:, 1:]
  p_eff = masks_lib.quantize(plan, params, ste=True)
  x = keep(_final_hidden(cfg, p_eff, tokens))
  tx_, th = None, None
  if obj.needs_teacher:
    tx_ = keep(jax.lax.stop_gradient(_final_hidden(cfg, teacher_params, tokens)))
    th = head_matrix(cfg, teacher_params)
  mask = jnp.ones(targets.shape, jnp.float32)
  return chunked_loss(obj, x, head_matrix(cfg, p_eff), targets, mask, tx_, th,
                      dtype=jnp.dtype(cfg.dtype))


def train_step(state, batch_BT1, teacher_params, *, cfg: ModelConfig, obj: Objective,
               plan: masks_lib.CompressionPlan, tx: optax.GradientTransformation,
               microbatches: int, masked: bool, schedule, clip_norm: float, rows=None):
  """One update (module docstring) -> (new state, metrics dict of f32 scalars). `rows`:
  the batch's row sharding, kept on every microbatch (`batch_loss`)."""
  grads, sums = gradients(state["params"], batch_BT1, teacher_params, cfg=cfg, obj=obj,
                          plan=plan, microbatches=microbatches, rows=rows)
  return apply_gradients(state, grads, sums, tx=tx, masked=masked, schedule=schedule,
                         clip_norm=clip_norm)


def gradients(params, batch_BT1, teacher_params, *, cfg: ModelConfig, obj: Objective,
              plan: masks_lib.CompressionPlan, microbatches: int, rows=None):
  """Steps 1-2 of the module docstring: (gradient of the token-weighted mean loss, a
  params-shaped tree; `LossSums` of the whole batch), accumulated over `microbatches`."""
  b = batch_BT1.shape[0]
  # Every target position is scored, so the token count is known before the forward: the
  # 1/tokens of the token-weighted mean is folded into the differentiated loss.
  inv_tokens = 1.0 / (b * (batch_BT1.shape[1] - 1))
  grad_fn = jax.grad(
      lambda p, mb: _loss_and_sums(cfg, obj, plan, p, teacher_params, mb, inv_tokens, rows),
      has_aux=True)
  if microbatches == 1:
    return grad_fn(params, batch_BT1)
  mbs = batch_BT1.reshape(b // microbatches, microbatches, -1).swapaxes(0, 1)

  def accumulate(carry, mb):
    g, s = grad_fn(params, mb)
    return jax.tree.map(jnp.add, carry, (g, s)), None

  zero = (jax.tree.map(jnp.zeros_like, params),
          LossSums(*(jnp.zeros((), jnp.float32) for _ in LossSums._fields)))
  (grads, sums), _ = jax.lax.scan(accumulate, zero, mbs)
  return grads, sums


def apply_gradients(state, grads, sums: LossSums, *, tx: optax.GradientTransformation,
                    masked: bool, schedule, clip_norm: float):
  """Steps 3-5 of the module docstring on the gradient of `gradients` -> (new state,
  metrics dict of f32 scalars)."""
  params = state["params"]
  grad_norm = optax.tree.norm(grads)
  if clip_norm > 0:  # clip by global norm, reusing the norm just computed
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(grad_norm, 1e-30))
    grads = jax.tree.map(lambda g: g * scale, grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  if masked:
    updates = masks_lib.apply_masks(updates, state["masks"])
  new_params = optax.apply_updates(params, updates)
  if masked:
    new_params = masks_lib.apply_masks(new_params, state["masks"])
  tokens = jnp.maximum(sums.tokens, 1.0)
  loss = sums.loss / tokens
  # A non-finite step is reported, not hidden: the host stops at it before anything later
  # is saved (`trainer.train` flushes metrics before every checkpoint).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = {**state, "params": new_params, "opt_state": opt_state,
               "step": state["step"] + 1}
  metrics = {"loss": loss, "ce": sums.ce / tokens, "kl": sums.kl / tokens,
             "grad_norm": grad_norm, "lr": schedule(state["step"]),
             "tokens": sums.tokens, "finite": finite.astype(jnp.float32)}
  return new_state, metrics


def _loss_and_sums(cfg, obj, plan, params, teacher_params, mb, scale, rows=None):
  sums = batch_loss(cfg, obj, plan, params, teacher_params, mb, rows)
  return sums.loss * scale, sums


def compile_step(cfg: ModelConfig, obj: Objective, plan, tx, mesh, state_shardings,
                 teacher_shardings, *, microbatches: int, masked: bool, schedule,
                 clip_norm: float):
  """jit of `train_step` with explicit shardings; the state is donated."""
  fn = functools.partial(train_step, cfg=cfg, obj=obj, plan=plan, tx=tx,
                         microbatches=microbatches, masked=masked, schedule=schedule,
                         clip_norm=clip_norm, rows=sharding.batch_sharding(mesh))
  rep = sharding.replicated(mesh)
  return jax.jit(fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                                   teacher_shardings),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))


def state_shardings(mesh, abstract_state):
  """Params, moments and masks by the FSDP rule; step, rng and scalar counters
  replicated."""
  return sharding.tree_shardings(mesh, abstract_state)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, teacher: bool) -> float:
  """Useful training FLOPs per token, MaxText's counting: 6 x matmul params (decoder
  linears and the LM head) plus causal attention 6 · L · T · Hq · K (QKᵀ and PV, half the
  score matrix, forward + backward); a teacher adds its forward (a third of that)."""
  d, f, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  per_layer = d * k * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2) + 3 * d * f
  matmul = cfg.num_layers * per_layer + cfg.vocab_size * d
  attn = cfg.num_layers * seq_len * cfg.num_attention_heads * k
  train = 6 * matmul + 6 * attn
  return float(train + (2 * matmul + 2 * attn if teacher else 0))

