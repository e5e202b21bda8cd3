"""Test-only PyTorch transcriptions of the reference calibrate-and-compress pipelines, run
on a transformers `LlamaForCausalLM` (in place, float32):

  * locuslab/wanda `prune_wanda` (lib/prune.py, `WrappedGPT.add_batch`),
  * IST-DASLab/sparsegpt `llama_sequential` (llama.py, `SparseGPT.add_batch` /
    `fasterprune`),
  * luuyin/OWL `prune_wanda_outlier` / `prune_sparsegpt_outlier` (lib/prune_all.py):
    per-layer rates from the dense model's outlier ratios, then the two pipelines above,
  * IST-DASLab/gptq `llama_sequential` (llama.py, `GPTQ.add_batch` / `fasterquant`,
    `Quantizer.find_params` / `quantize` of quant.py), without --true-sequential: all seven
    linears of a layer get their Hessians in one pass of the original layer, as dtm's
    `calibrate_and_compress` does.

The shared procedure (the references' `*_sequential`): catch the inputs of decoder layer 0
for every calibration sequence (a forward pre-hook that stops the model there, as their
`Catcher`), then for each layer: forward hooks on its linears accumulate statistics of
their inputs while every sequence runs through the layer (batch 1, as the references),
each linear is compressed, and the sequences run again through the compressed layer to
give the next layer's inputs. The references' argument conventions are kept: prune_n /
prunen = weights PRUNED per group of m (dtm's n is the number kept).

Written independently of dtm (torch only), to be the oracle of dtm.compress.calibration
in tests/test_reference_pipelines.py and the baseline of bench/prune.py and
bench/quantize.py. Shapes: windows int [n, T]; HF weights [out, in].
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

KIND_MODULES: dict[str, str] = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
    "down": "mlp.down_proj"}


class _Stop(Exception):
  pass


# ------------------------------------------------------------------------ the layer loop


@torch.no_grad()
def layer0_inputs(model, windows_NT) -> tuple[torch.Tensor, dict]:
  """(inputs of decoder layer 0 f32 [n, T, D], the keyword arguments the model passes to
  its decoder layers: position embeddings, mask, ...), one sequence per forward."""
  captured: list = []

  def catch(module, args, kwargs):
    captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
    raise _Stop

  handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
  try:
    for row in np.asarray(windows_NT):
      try:
        model(torch.as_tensor(row[None], dtype=torch.long), use_cache=False)
      except _Stop:
        pass
  finally:
    handle.remove()
  inps = torch.cat([h for h, _ in captured], dim=0)
  kwargs = {k: v for k, v in captured[0][1].items() if k != "hidden_states"}
  return inps, kwargs


def _layer_out(layer, h_1TD, kwargs) -> torch.Tensor:
  out = layer(h_1TD, **kwargs)
  return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def sequential(model, windows_NT, make_stats: Callable[[int], object],
               compress: Callable[[torch.nn.Linear, object, str], None],
               progress: Callable[[int], None] | None = None, num_layers: int | None = None,
               batch_size: int = 1) -> None:
  """The references' layer loop (module docstring), in place on `model`.

  make_stats(in_features) -> an accumulator with `add_batch(inp [b, T, in])`;
  compress(linear, stats, kind) modifies linear.weight in place. num_layers: compress only
  the first num_layers layers (None: all). batch_size: sequences per layer call (the
  references: 1; more only changes the summation order of the statistics).
  """
  inps, kwargs = layer0_inputs(model, windows_NT)
  outs = torch.zeros_like(inps)
  n = inps.shape[0]
  if batch_size > 1:  # the position embeddings were caught for one sequence
    kwargs = {k: tuple(x.expand(batch_size, *x.shape[1:]) for x in v)
              if k == "position_embeddings" else v for k, v in kwargs.items()}
  layers = model.model.layers[:num_layers]
  for index, layer in enumerate(layers):
    subset = {kind: layer.get_submodule(path) for kind, path in KIND_MODULES.items()}
    stats = {kind: make_stats(lin.in_features) for kind, lin in subset.items()}
    hooks = [lin.register_forward_hook(lambda mod, inp, out, s=stats[kind]: s.add_batch(inp[0]))
             for kind, lin in subset.items()]
    try:
      for j in range(0, n, batch_size):
        _layer_out(layer, inps[j:j + batch_size], kwargs)
    finally:
      for h in hooks:
        h.remove()
    for kind, lin in subset.items():
      compress(lin, stats[kind], kind)
    for j in range(0, n, batch_size):
      outs[j:j + batch_size] = _layer_out(layer, inps[j:j + batch_size], kwargs)
    inps, outs = outs, inps
    if progress is not None:
      progress(index)


# -------------------------------------------------------------------------- statistics


class ScalerRow:
  """WrappedGPT.add_batch: scaler_row f32 [in] = sum_t x_tj^2 / nsamples (sequences)."""

  def __init__(self, columns: int):
    self.scaler_row = torch.zeros(columns, dtype=torch.float32)
    self.nsamples = 0

  def add_batch(self, inp):
    if inp.dim() == 2:
      inp = inp.unsqueeze(0)
    tmp = inp.shape[0]
    inp = inp.reshape(-1, inp.shape[-1]).t().float()
    self.scaler_row *= self.nsamples / (self.nsamples + tmp)
    self.nsamples += tmp
    self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


class Hessian:
  """SparseGPT / GPTQ add_batch: H f32 [in, in] = 2 / nsamples * sum_t x_t x_t^T."""

  def __init__(self, columns: int):
    self.H = torch.zeros((columns, columns), dtype=torch.float32)
    self.nsamples = 0

  def add_batch(self, inp):
    if inp.dim() == 2:
      inp = inp.unsqueeze(0)
    tmp = inp.shape[0]
    inp = inp.reshape(-1, inp.shape[-1]).t().float()
    self.H *= self.nsamples / (self.nsamples + tmp)
    self.nsamples += tmp
    inp = math.sqrt(2 / self.nsamples) * inp
    self.H += inp.matmul(inp.t())


# ------------------------------------------------------------------------ per matrix


def wanda_prune_(linear, scaler_row, sparsity_ratio: float = 0.0, prune_n: int = 0,
                 prune_m: int = 0) -> None:
  """prune_wanda's per-linear body: W_metric = |W| * sqrt(scaler_row); per output row the
  lowest int(in * ratio) (stable sort), or prune_n lowest of every prune_m (topk)."""
  W = linear.weight.data
  W_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
  W_mask = torch.zeros_like(W_metric, dtype=torch.bool)
  if prune_n != 0:
    for ii in range(0, W_metric.shape[1], prune_m):
      tmp = W_metric[:, ii:(ii + prune_m)].float()
      W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
  else:
    sort_res = torch.sort(W_metric, dim=-1, stable=True)
    indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity_ratio)]
    W_mask.scatter_(1, indices, True)
  W[W_mask] = 0


def _upper_inverse_factor(H, percdamp: float):
  """Dampen H in place by percdamp * mean(diag H); the references' Hinv =
  cholesky(cholesky_inverse(cholesky(H)), upper=True)."""
  columns = H.shape[0]
  damp = percdamp * torch.mean(torch.diag(H))
  diag = torch.arange(columns)
  H[diag, diag] += damp
  H = torch.linalg.cholesky(H)
  H = torch.cholesky_inverse(H)
  return torch.linalg.cholesky(H, upper=True)


def sparsegpt_fasterprune_(linear, H, sparsity: float, prunen: int = 0, prunem: int = 0,
                           blocksize: int = 128, percdamp: float = .01) -> None:
  """SparseGPT.fasterprune (no quantizer): OBS pruning in blocks of `blocksize` columns."""
  W = linear.weight.data.clone().float()
  H = H.clone()
  rows, columns = W.shape
  dead = torch.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  Hinv = _upper_inverse_factor(H, percdamp)
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1
    W1 = W[:, i1:i2].clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    if prunen == 0:
      tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
      thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
      mask1 = tmp <= thresh
    else:
      mask1 = torch.zeros_like(W1, dtype=torch.bool)
    for i in range(count):
      w = W1[:, i]
      d = Hinv1[i, i]
      if prunen != 0 and i % prunem == 0:
        tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
        mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
      q = w.clone()
      q[mask1[:, i]] = 0
      Q1[:, i] = q
      err1 = (w - q) / d
      W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
      Err1[:, i] = err1
    W[:, i1:i2] = Q1
    W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
  linear.weight.data = W.reshape(linear.weight.shape).to(linear.weight.data.dtype)


class Quantizer:
  """quant.py Quantizer, weight mode, per channel, min-max (no mse search)."""

  def __init__(self, bits: int, sym: bool = False):
    self.maxq = torch.tensor(2 ** bits - 1)
    self.sym = sym

  def find_params(self, x):
    """Per-row grid of x [rows, cols]: scale, zero [rows, 1]."""
    x = x.flatten(1)
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if self.sym:
      xmax = torch.maximum(torch.abs(xmin), xmax)
      neg = xmin < 0
      if torch.any(neg):
        xmin[neg] = -xmax[neg]
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat] = -1
    xmax[flat] = +1
    self.scale = (xmax - xmin) / self.maxq
    if self.sym:
      self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2)
    else:
      self.zero = torch.round(-xmin / self.scale)
    self.scale = self.scale.reshape(-1, 1)
    self.zero = self.zero.reshape(-1, 1)

  def quantize(self, x):
    q = torch.clamp(torch.round(x / self.scale) + self.zero, 0, self.maxq)
    return self.scale * (q - self.zero)


def gptq_fasterquant_(linear, H, bits: int, groupsize: int = -1, actorder: bool = False,
                      static_groups: bool = False, sym: bool = False, percdamp: float = .01,
                      blocksize: int = 128) -> None:
  """GPTQ.fasterquant: the weight replaced by its dequantized GPTQ result."""
  W = linear.weight.data.clone().float()
  H = H.clone()
  rows, columns = W.shape
  quantizer = Quantizer(bits, sym)
  quantizer.find_params(W)
  dead = torch.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  groups = []
  if static_groups:
    for i in range(0, columns, groupsize):
      g = Quantizer(bits, sym)
      g.find_params(W[:, i:(i + groupsize)])
      groups.append(g)
  perm = None
  if actorder:
    perm = torch.argsort(torch.diag(H), descending=True)
    W = W[:, perm]
    H = H[perm][:, perm]
    invperm = torch.argsort(perm)
  Q = torch.zeros_like(W)
  Hinv = _upper_inverse_factor(H, percdamp)
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1
    W1 = W[:, i1:i2].clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(count):
      w = W1[:, i]
      d = Hinv1[i, i]
      if groupsize != -1:
        if not static_groups:
          if (i1 + i) % groupsize == 0:
            quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
        else:
          idx = i1 + i
          if actorder:
            idx = int(perm[idx])
          quantizer = groups[idx // groupsize]
      q = quantizer.quantize(w.unsqueeze(1)).flatten()
      Q1[:, i] = q
      err1 = (w - q) / d
      W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
      Err1[:, i] = err1
    Q[:, i1:i2] = Q1
    W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
  if actorder:
    Q = Q[:, invperm]
  linear.weight.data = Q.reshape(linear.weight.shape).to(linear.weight.data.dtype)


# ------------------------------------------------------------------------------ pipelines


def prune_wanda(model, windows_NT, sparsity_ratio: float = 0.0, prune_n: int = 0,
                prune_m: int = 0, progress=None, **loop) -> None:
  """locuslab/wanda prune_wanda on `model` (in place);
  loop: `sequential`'s num_layers, batch_size."""
  sequential(model, windows_NT, ScalerRow,
             lambda lin, s, kind: wanda_prune_(lin, s.scaler_row, sparsity_ratio, prune_n,
                                               prune_m), progress, **loop)


def sparsegpt_sequential(model, windows_NT, sparsity: float = 0.0, prunen: int = 0,
                         prunem: int = 0, percdamp: float = .01, blocksize: int = 128,
                         progress=None, **loop) -> None:
  """IST-DASLab/sparsegpt llama_sequential on `model` (in place);
  loop: `sequential`'s num_layers, batch_size."""
  sequential(model, windows_NT, Hessian,
             lambda lin, s, kind: sparsegpt_fasterprune_(lin, s.H, sparsity, prunen, prunem,
                                                         blocksize, percdamp), progress, **loop)


def gptq_sequential(model, windows_NT, bits: int, groupsize: int = -1, actorder: bool = False,
                    static_groups: bool = False, sym: bool = False, percdamp: float = .01,
                    blocksize: int = 128, progress=None, **loop) -> None:
  """IST-DASLab/gptq llama_sequential (no --true-sequential) on `model` (in place);
  loop: `sequential`'s num_layers, batch_size."""
  sequential(model, windows_NT, Hessian,
             lambda lin, s, kind: gptq_fasterquant_(lin, s.H, bits, groupsize, actorder,
                                                    static_groups, sym, percdamp, blocksize),
             progress, **loop)


# ---------------------------------------------------------------------------------- OWL


def check_outlier_mean(mask, threshold: float) -> float:
  """luuyin/OWL lib/prune_all.py check_outlier_mean: % of entries above threshold * mean."""
  count = (mask > torch.mean(mask) * threshold).sum().item()
  return float(count) / mask.numel() * 100


@torch.no_grad()
def owl_layer_ratios(model, windows_NT, sparsity_ratio: float, lamda: float = 0.08,
                     hyper_m: float = 5.0, kinds: tuple[str, ...] = tuple(KIND_MODULES)
                     ) -> np.ndarray:
  """The first half of luuyin/OWL `prune_wanda_outlier` / `prune_sparsegpt_outlier`: the
  dense layers run one sequence at a time (the model is not modified), each layer's Wanda
  metrics |W| * sqrt(scaler_row) of its linears are concatenated and their outlier ratio
  taken (`check_outlier_mean`); then the ratios are spread over 2 * lamda around
  1 - sparsity_ratio. Returns `all_layer_ratio` (densities per layer, float64)."""
  inps, kwargs = layer0_inputs(model, windows_NT)
  all_layer_ratio = []
  for layer in model.model.layers:
    subset = {kind: layer.get_submodule(KIND_MODULES[kind]) for kind in kinds}
    wrapped = {kind: ScalerRow(lin.in_features) for kind, lin in subset.items()}
    hooks = [lin.register_forward_hook(lambda mod, inp, out, s=wrapped[kind]: s.add_batch(inp[0]))
             for kind, lin in subset.items()]
    for j in range(inps.shape[0]):
      _layer_out(layer, inps[j:j + 1], kwargs)
    for h in hooks:
      h.remove()
    layer_wmetric = [torch.abs(subset[k].weight.data)
                     * torch.sqrt(wrapped[k].scaler_row.reshape((1, -1))) for k in subset]
    outs = torch.cat([_layer_out(layer, inps[j:j + 1], kwargs) for j in range(inps.shape[0])])
    inps = outs
    layer_wmetric = torch.cat([torch.flatten(x.cpu()) for x in layer_wmetric])
    all_layer_ratio.append(check_outlier_mean(layer_wmetric, hyper_m))
  all_layer_ratio = np.array(all_layer_ratio)
  all_layer_ratio = ((all_layer_ratio - all_layer_ratio.min())
                     * (1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lamda * 2))
  return all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)


def prune_wanda_outlier(model, windows_NT, sparsity_ratio: float, lamda: float = 0.08,
                        hyper_m: float = 5.0, progress=None, **loop) -> np.ndarray:
  """luuyin/OWL `prune_wanda_outlier` (unstructured): the layer densities, then
  prune_wanda's loop with layer i at 1 - all_layer_ratio[i] (0.01 where <= 0), in place.
  Returns the per-layer sparsities used."""
  density = owl_layer_ratios(model, windows_NT, sparsity_ratio, lamda, hyper_m)
  rates = [1 - d if 1 - d > 0 else 0.01 for d in density]
  layer_of = {}
  for i, layer in enumerate(model.model.layers):
    for path in KIND_MODULES.values():
      layer_of[id(layer.get_submodule(path))] = i
  sequential(model, windows_NT, ScalerRow,
             lambda lin, s, kind: wanda_prune_(lin, s.scaler_row, rates[layer_of[id(lin)]]),
             progress, **loop)
  return np.asarray(rates)


def prune_sparsegpt_outlier(model, windows_NT, sparsity_ratio: float, lamda: float = 0.08,
                            hyper_m: float = 5.0, progress=None, **loop) -> np.ndarray:
  """luuyin/OWL `prune_sparsegpt_outlier` (unstructured): the layer densities, then
  SparseGPT's llama_sequential with layer i at 1 - all_layer_ratio[i]. Returns the rates."""
  density = owl_layer_ratios(model, windows_NT, sparsity_ratio, lamda, hyper_m)
  rates = [1 - d if 1 - d > 0 else 0.01 for d in density]
  layer_of = {}
  for i, layer in enumerate(model.model.layers):
    for path in KIND_MODULES.values():
      layer_of[id(layer.get_submodule(path))] = i
  sequential(model, windows_NT, Hessian,
             lambda lin, s, kind: sparsegpt_fasterprune_(lin, s.H, rates[layer_of[id(lin)]]),
             progress, **loop)
  return np.asarray(rates)


# ------------------------------------------------------------------------------- helpers


def load_hf_smollm2(gguf_path: str):
  """transformers' own LlamaForCausalLM from the GGUF file (its dequantization), f32."""
  import os
  from transformers import LlamaForCausalLM
  return LlamaForCausalLM.from_pretrained(os.path.dirname(gguf_path),
                                          gguf_file=os.path.basename(gguf_path),
                                          dtype=torch.float32).eval()


def linear_weights(model) -> dict[tuple[int, str], torch.Tensor]:
  """{(layer, kind): the linear's weight [out, in]} (the live tensors)."""
  return {(l, kind): layer.get_submodule(path).weight.data
          for l, layer in enumerate(model.model.layers) for kind, path in KIND_MODULES.items()}


def snapshot(model) -> dict[tuple[int, str], torch.Tensor]:
  return {key: w.clone() for key, w in linear_weights(model).items()}


def restore(model, saved: dict[tuple[int, str], torch.Tensor]) -> None:
  for (l, kind), w in saved.items():
    model.model.layers[l].get_submodule(KIND_MODULES[kind]).weight.data = w.clone()
