"""Flax Llama (LlamaForCausalLM family): RMSNorm, RoPE (+llama3 scaling), GQA, SwiGLU.

Decoder layers are stacked with `nn.scan`, so every per-layer parameter carries a
leading layer axis L (e.g. q kernel [L, D, Hq*Dh]) and compile time does not grow
with depth. Kernels are stored [in, out] (the transpose of HF's [out, in]); see
`dtm.components` for the naming table.

Shapes in names: B batch, T query positions, S key positions (cache length),
D hidden, Hq / Hkv query / key-value heads, G = Hq // Hkv, K head dim, F MLP
width, V vocab, L layers.

Rotary embeddings use HF's "rotate half" layout (first and second halves of each
head form the complex pairs), so HF safetensors load without any permutation;
GGUF's interleaved Q/K layout is undone at load time (`dtm.gguf_io`).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtm.compress import act_quant
from dtm.model_config import ModelConfig

Array = jax.Array


class KVCache(NamedTuple):
  """Per-layer key/value cache, stacked over layers: k, v [L, B, Hkv, S, K] (head-major,
  the layout the attention matmuls read, so a decode step reads each layer's slice as it
  lies and writes only the new token's rows)."""
  k: Array
  v: Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
    shape = (cfg.num_layers, batch, cfg.num_key_value_heads, length, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt))


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse frequencies [K/2] (float32), with Llama-3 style scaling if configured."""
  k = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  if not cfg.rope_scaling:
    return inv_freq
  rs = dict(cfg.rope_scaling)
  factor = float(rs["factor"])
  low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
  old_len = float(rs["original_max_position_embeddings"])
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BTHK: Array, positions_T: Array, inv_freq: Array, scale: float = 1.0) -> Array:
  """Rotate x by its absolute positions (HF rotate-half convention), in float32;
  optionally times `scale` (folded into cos/sin). positions: [T], or [B, T] per row."""
  freqs_TK2 = positions_T.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(freqs_TK2)[..., None, :] * scale
  sin = jnp.sin(freqs_TK2)[..., None, :] * scale
  x = x_BTHK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, normalised in float32 (as HF does)."""
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class Kernel(nn.Module):
  """The kernel [in, out] of a bias-free linear map, as its own module so that the
  param path is <name>/kernel (the same as `Linear`'s)."""
  features: int
  param_dtype: Any

  @nn.compact
  def __call__(self, in_features: int) -> Array:
    return self.param("kernel", nn.initializers.normal(0.02), (in_features, self.features),
                      self.param_dtype)

  def act(self):
    """This kind's activation-quantization (mode, threshold) of the current layer, or None
    (`dtm.compress.act_quant.read`); call after __call__."""
    return act_quant.read(self)


def _dot(x: Array, kernel: Array, dtype, act=None) -> Array:
  """The one matmul of every decoder linear: x [..., in] @ kernel [in, out] -> f32. act
  None is the float matmul; otherwise W8A8 / LLM.int8 (`dtm.compress.act_quant.dot`)."""
  # f32 accumulation requested explicitly: on CPU this selects the fast (AMX/oneDNN)
  # bf16 kernels, on TPU/GPU it is what the MXU/tensor cores do anyway.
  return act_quant.dot(x, kernel, dtype, act)


class Linear(nn.Module):
  """Bias-free linear map with kernel [in, out]; output in `dtype` (f32 if out_f32)."""
  features: int
  dtype: Any
  param_dtype: Any
  out_f32: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.initializers.normal(0.02),
                        (x.shape[-1], self.features), self.param_dtype)
    y = _dot(x, kernel, self.dtype, act_quant.read(self))
    return y if self.out_f32 else y.astype(self.dtype)


def _cache_write(cache_LBkSK: Array, new_LBkTK: Array, index) -> Array:
  """The stacked cache with the T new rows of every layer written at slots
  index..index+T-1: index a scalar (every row, one dynamic_update_slice) or int32 [B]
  (per row, e.g. prompts of mixed lengths decoding in one batch)."""
  new = new_LBkTK.astype(cache_LBkSK.dtype)
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache_LBkSK, new, index, 3)
  b, t = new.shape[1], new.shape[3]
  slots_BT = index[:, None] + jnp.arange(t, dtype=index.dtype)  # one scatter, in place
  return cache_LBkSK.at[:, jnp.arange(b)[:, None], :, slots_BT].set(
      new.transpose(1, 3, 0, 2, 4), unique_indices=True)


def _attend_cache(q_BTHK: Array, k_BTHK: Array, v_BTHK: Array, cache: tuple[Array, Array],
                  start, dt) -> tuple[Array, tuple[Array, Array]]:
  """Attention of T new tokens at positions start.. (start a scalar or int32 [B]) over
  this layer's cached keys at slots < start and, causally, over the new tokens; the cache
  (k, v [B, Hkv, S, K]) is only read: softmax over [cached keys; new keys] in two blocks,
  so a decode step never copies the cache (`Llama.hidden` writes the new rows once, for
  all layers). Returns (out [B, T, Hq*K] in dt, new rows (k, v) [B, Hkv, T, K])."""
  b, t, hq, kd = q_BTHK.shape
  k_old, v_old = cache
  hkv, s = k_old.shape[1], k_old.shape[2]
  g = hq // hkv
  q = q_BTHK.reshape(b, t, hkv, g, kd).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, kd)
  k_new = k_BTHK.transpose(0, 2, 1, 3).astype(k_old.dtype)
  v_new = v_BTHK.transpose(0, 2, 1, 3).astype(v_old.dtype)
  dot = lambda a, c: jnp.einsum("bkmd,bksd->bkms", a, c.astype(dt),
                                preferred_element_type=jnp.float32)
  old = jnp.where(jnp.arange(s) < jnp.asarray(start)[..., None], 0.0, -jnp.inf)  # [S] / [B, S]
  old = old if old.ndim == 1 else old[:, None, None, None]
  scores_old = dot(q, k_old).reshape(b, hkv, g, t, s) + old
  causal = jnp.where(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], 0.0, -jnp.inf)
  scores_new = dot(q, k_new).reshape(b, hkv, g, t, t) + causal
  top = jnp.maximum(jnp.max(scores_old, -1, keepdims=True), jnp.max(scores_new, -1, keepdims=True))
  e_old, e_new = jnp.exp(scores_old - top), jnp.exp(scores_new - top)
  denom = jnp.sum(e_old, -1, keepdims=True) + jnp.sum(e_new, -1, keepdims=True)
  pv = lambda e, c, n: jnp.einsum("bkms,bksd->bkmd", e.astype(dt).reshape(b, hkv, g * t, n),
                                  c.astype(dt), preferred_element_type=jnp.float32)
  out = (pv(e_old, v_old, s) + pv(e_new, v_new, t)).reshape(b, hkv, g, t, kd) / denom
  out = out.astype(dt).transpose(0, 3, 1, 2, 4).reshape(b, t, hq * kd)
  return out, (k_new, v_new)


class Attention(nn.Module):
  """Grouped-query causal self-attention with an optional KV cache.

  Query head h uses key/value head h // G (HF `repeat_kv` order). With `query_start`
  q (no cache), keys and values come from all T positions but only rows q.. are
  queried: the output is [B, T - q, Hq*K] (a last layer whose earlier rows nobody reads).

  With `mask_BTS` (bool, no cache) query t attends to key s where mask[b, t, s] instead
  of the causal rule, and positions are per row [B, T] (packed sequences, e.g. several
  continuations sharing one context in a row; every row of the mask needs one True).

  With `cache` (this layer's k, v [B, Hkv, S, K], read only) the T new tokens sit at
  positions cache_index.. (scalar or [B]) and the second output is their (k, v) rows
  [B, Hkv, T, K] (`_attend_cache`); without, it is None.
  """
  cfg: ModelConfig
  query_start: int = 0

  @nn.compact
  def __call__(self, x_BTD: Array, positions_T: Array, cache: tuple[Array, Array] | None,
               cache_index: Array | None, mask_BTS: Array | None = None):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    hq, hkv, kd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qs = self.query_start
    x_q, pos_q = x_BTD[:, qs:], positions_T[..., qs:]
    b, t, _ = x_q.shape
    q = Linear(hq * kd, dt, pdt, name="q")(x_q).reshape(b, t, hq, kd)
    k = Linear(hkv * kd, dt, pdt, name="k")(x_BTD).reshape(b, -1, hkv, kd)
    v = Linear(hkv * kd, dt, pdt, name="v")(x_BTD).reshape(b, -1, hkv, kd)
    inv_freq = rope_inv_freq(cfg)
    # 1/sqrt(K) is folded into the RoPE of q (exact when K is a power of 4, e.g. 64).
    q = apply_rope(q, pos_q, inv_freq, scale=1.0 / math.sqrt(kd))
    k = apply_rope(k, positions_T, inv_freq)
    if cache is not None:
      out, new_rows = _attend_cache(q, k, v, cache, cache_index, dt)
      return Linear(cfg.hidden_size, dt, pdt, name="o")(out), new_rows
    s = k.shape[1]
    # Causal mask as an additive bias (key index = absolute position in the cache layout).
    if mask_BTS is None:
      bias = jnp.where(jnp.arange(s)[None, :] <= pos_q[:, None], 0.0, -jnp.inf)
    else:
      bias = jnp.where(mask_BTS[:, qs:], 0.0, -jnp.inf)[:, None, None]
    out = _attention(q, k, v, bias, dt, cfg.attention_chunk if cache is None else 0)
    return Linear(cfg.hidden_size, dt, pdt, name="o")(out), None


def _attend(q_BTHK: Array, k_BSHK: Array, v_BSHK: Array, bias: Array, dt) -> Array:
  """softmax(q kᵀ + bias) v -> [B, T, Hq*K] in `dt`; bias [T, S] or [B, 1, 1, T, S]
  (0 or -inf). Head-major layout with the G query heads of a KV head folded into the
  rows: one [G*T, K] x [K, S] matmul per (batch, KV head), the fastest form on CPU; the
  softmax normalisation is applied after the PV matmul (on K values, not S scores)."""
  b, t, hq, kd = q_BTHK.shape
  s, hkv = k_BSHK.shape[1], k_BSHK.shape[2]
  g = hq // hkv
  q_BkMK = q_BTHK.reshape(b, t, hkv, g, kd).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, kd)
  k_BkSK = k_BSHK.astype(dt).transpose(0, 2, 1, 3)
  v_BkSK = v_BSHK.astype(dt).transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkmd,bksd->bkms", q_BkMK, k_BkSK, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, hkv, g, t, s) + bias
  unnorm = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  denom = jnp.sum(unnorm, axis=-1, keepdims=True)
  out = jnp.einsum("bkms,bksd->bkmd", unnorm.astype(dt).reshape(b, hkv, g * t, s), v_BkSK,
                   preferred_element_type=jnp.float32)
  out = (out.reshape(b, hkv, g, t, kd) / denom).astype(dt)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq * kd)


def _attention(q_BTHK: Array, k_BSHK: Array, v_BSHK: Array, bias: Array, dt,
               chunk: int) -> Array:
  """`_attend`, in blocks of `chunk` query rows when 0 < chunk < T divides T: a
  `lax.map` over the blocks whose body is rematerialised, so the backward pass holds one
  block's [Hq, chunk, S] float32 scores instead of [Hq, T, S] (1/4 at T = 2048, chunk
  512). Each query row's arithmetic is unchanged: the blocks give the same result."""
  b, t, hq, kd = q_BTHK.shape
  if not chunk or t <= chunk or t % chunk:
    return _attend(q_BTHK, k_BSHK, v_BSHK, bias, dt)
  n, s = t // chunk, k_BSHK.shape[1]
  q_blocks = jnp.moveaxis(q_BTHK.reshape(b, n, chunk, hq, kd), 1, 0)
  bias_blocks = jnp.moveaxis(bias.reshape(bias.shape[:-2] + (n, chunk, s)), -3, 0)
  body = jax.checkpoint(lambda qb: _attend(qb[0], k_BSHK, v_BSHK, qb[1], dt))
  out = jax.lax.map(body, (q_blocks, bias_blocks))  # [n, B, chunk, Hq*K]
  return jnp.moveaxis(out, 0, 1).reshape(b, t, hq * kd)


# Row count from which the gate and up projections run as one matmul on the
# concatenated kernel [D, 2F]: one copy of the two kernels buys one larger GEMM, which
# pays when many rows share it (prefill, teacher forcing, probes), not in decoding.
FUSED_GATE_UP_MIN_ROWS = 256


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    f, d = cfg.intermediate_size, x_BTD.shape[-1]
    gate_m, up_m = Kernel(f, pdt, name="gate"), Kernel(f, pdt, name="up")
    w_gate, w_up = gate_m(d), up_m(d)
    act_gate, act_up = gate_m.act(), up_m.act()
    if (math.prod(x_BTD.shape[:-1]) >= FUSED_GATE_UP_MIN_ROWS and act_gate is None
        and act_up is None):
      gate_up = _dot(x_BTD, jnp.concatenate([w_gate, w_up], axis=1), dt).astype(dt)
      gate, up = gate_up[..., :f], gate_up[..., f:]
    else:
      gate = _dot(x_BTD, w_gate, dt, act_gate).astype(dt)
      up = _dot(x_BTD, w_up, dt, act_up).astype(dt)
    return Linear(cfg.hidden_size, dt, pdt, name="down")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer. Called by nn.scan as (carry, per-layer input, broadcast),
  the broadcast being aux = (positions, cache_index) or (positions [B, T], None, mask_BTS)
  (see `Attention`).

  With `query_start` q (no cache) only rows q.. are computed past the K/V projections:
  h [B, T, D] -> [B, T - q, D] (`Attention.query_start`).
  """
  cfg: ModelConfig
  query_start: int = 0

  @nn.compact
  def __call__(self, h_BTD: Array, cache: tuple[Array, Array] | None, aux: tuple[Array, Any]):
    cfg = self.cfg
    positions_T, cache_index, *mask = aux
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="attn_norm")(h_BTD)
    attn_out, new_cache = Attention(cfg, self.query_start, name="attn")(
        x, positions_T, cache, cache_index, *mask)
    h_BTD = h_BTD[:, self.query_start:] + attn_out
    x = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="mlp_norm")(h_BTD)
    h_BTD = h_BTD + MLP(cfg, name="mlp")(x)
    return h_BTD, new_cache


def _positions(t: int, cache_index) -> Array:
  """Positions of T new tokens: [T] from a scalar start, [B, T] from per-row starts [B]."""
  start = 0 if cache_index is None else cache_index
  return jnp.asarray(start, jnp.int32)[..., None] + jnp.arange(t, dtype=jnp.int32)


class Llama(nn.Module):
  """LlamaForCausalLM.

  `__call__(tokens [B, T]) -> logits [B, T, V]` (float32). For the pieces:
  `hidden(tokens, cache, cache_index) -> (h [B, T, D], cache)` before the final
  norm, and `logits(h) -> [B, T', V]` (final norm + LM head) so callers can apply
  the head only at the positions they need.
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                          embedding_init=nn.initializers.normal(0.02))
    layer = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
    self.layers = nn.scan(
        layer, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast), out_axes=0, length=cfg.num_layers)(cfg)
    self.final_norm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    if not cfg.tie_word_embeddings:
      self.lm_head = Linear(cfg.vocab_size, dt, pdt, out_f32=True)

  def hidden(self, tokens_BT: Array, cache: KVCache | None = None, cache_index=None,
             packing: tuple[Array, Array] | None = None):
    """Residual stream after the last layer (before the final norm): [B, T, D].

    With a cache (k, v [L, B, S, Hkv, K]) the T new tokens sit at positions
    cache_index..cache_index+T-1 and attend to every cached position before them.
    With packing = (positions [B, T] int32, mask [B, T, T] bool) and no cache, token t
    of row b sits at positions[b, t] and attends to the keys where mask[b, t] holds.
    """
    h = self.embed(tokens_BT)
    if packing is not None:
      if cache is not None:
        raise ValueError("packed sequences take no KV cache")
      aux = (packing[0], None, packing[1])
    else:
      aux = (_positions(tokens_BT.shape[1], cache_index), cache_index)
    if cache is None:
      return self.layers(h, None, aux)[0], None
    h, (k_new, v_new) = self.layers(h, (cache.k, cache.v), aux)  # new rows [L, B, Hkv, T, K]
    return h, KVCache(_cache_write(cache.k, k_new, cache_index),
                      _cache_write(cache.v, v_new, cache_index))

  def normed(self, h_BTD: Array) -> Array:
    """Final RMSNorm only (the LM head's input)."""
    return self.final_norm(h_BTD)

  def logits(self, h_BTD: Array) -> Array:
    """Final norm + LM head, float32 logits [B, T, V]."""
    x = self.final_norm(h_BTD)
    if self.cfg.tie_word_embeddings:
      dt = jnp.dtype(self.cfg.dtype)
      return jnp.dot(x.astype(dt), self.embed.embedding.astype(dt).T,
                     preferred_element_type=jnp.float32)
    return self.lm_head(x)

  def __call__(self, tokens_BT: Array, cache: KVCache | None = None, cache_index=None):
    h, cache = self.hidden(tokens_BT, cache, cache_index)
    logits = self.logits(h)
    return logits if cache is None else (logits, cache)


def init_params(cfg: ModelConfig, seed: int = 0):
  """Random params (tests, benchmarks): normal(0.02) kernels, unit norms."""
  model = Llama(cfg)
  tokens = jnp.zeros((1, 2), jnp.int32)
  return jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)["params"]


def abstract_params(cfg: ModelConfig):
  """ShapeDtypeStruct tree of the params (no memory allocated)."""
  model = Llama(cfg)
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]


def apply_layer(cfg: ModelConfig, params_layer, h_BTD: Array, positions_T: Array,
                query_start: int = 0) -> Array:
  """One decoder layer without cache: h [B, T, D] -> [B, T - query_start, D] (params
  without the L axis); rows before `query_start` only provide keys and values."""
  out, _ = DecoderLayer(cfg, query_start).apply({"params": params_layer}, h_BTD, None,
                                                (positions_T, None))
  return out


def head_matrix(cfg: ModelConfig, params) -> Array:
  """The LM head as W [V, D] (logits = x @ W.T): the embedding when tied."""
  if cfg.tie_word_embeddings:
    return params["embed"]["embedding"]
  return params["lm_head"]["kernel"].T
