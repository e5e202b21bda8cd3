"""The one place that knows how Llama components and tensors are named.

A *component* is one linear map of one decoder layer, addressed by (layer, kind)
with kind in KINDS. This module maps between

  * (layer, kind)                 <-> Flax param path, e.g. ('layers', 'attn', 'q', 'kernel')
                                      (kernels carry a leading layer axis: [L, in, out])
  * HF safetensors tensor names   e.g. 'model.layers.3.self_attn.q_proj.weight'  ([out, in])
  * GGUF tensor names             e.g. 'blk.3.attn_q.weight'

and declares, for every HF tensor, where it lives in the Flax tree and whether it
is transposed (HF stores Linear weights as [out, in]; Flax kernels are [in, out]).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator

KINDS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

# kind -> (Flax sub-module, HF module path inside a layer, GGUF tensor stem)
_KIND_TABLE: dict[str, tuple[str, str, str]] = {
    "q": ("attn", "self_attn.q_proj", "attn_q"),
    "k": ("attn", "self_attn.k_proj", "attn_k"),
    "v": ("attn", "self_attn.v_proj", "attn_v"),
    "o": ("attn", "self_attn.o_proj", "attn_output"),
    "gate": ("mlp", "mlp.gate_proj", "ffn_gate"),
    "up": ("mlp", "mlp.up_proj", "ffn_up"),
    "down": ("mlp", "mlp.down_proj", "ffn_down"),
}

# Per-layer norms: Flax sub-module -> (HF name inside a layer, GGUF stem)
_LAYER_NORMS: dict[str, tuple[str, str]] = {
    "attn_norm": ("input_layernorm", "attn_norm"),
    "mlp_norm": ("post_attention_layernorm", "ffn_norm"),
}

# Global tensors: HF name -> (Flax path, transpose?, GGUF name)
_GLOBAL_TABLE: dict[str, tuple[tuple[str, ...], bool, str]] = {
    "model.embed_tokens.weight": (("embed", "embedding"), False, "token_embd.weight"),
    "model.norm.weight": (("final_norm", "scale"), False, "output_norm.weight"),
    "lm_head.weight": (("lm_head", "kernel"), True, "output.weight"),
}


@dataclasses.dataclass(frozen=True, order=True)
class Component:
  """One linear map: `layer` in [0, num_layers), `kind` in KINDS."""
  layer: int
  kind: str

  def __post_init__(self):
    if self.kind not in _KIND_TABLE:
      raise ValueError(f"unknown component kind {self.kind!r}; expected one of {KINDS}")

  @property
  def name(self) -> str:
    """Stable string id, e.g. 'L03.q' (sorts by layer, then by name)."""
    return f"L{self.layer:02d}.{self.kind}"

  @property
  def param_path(self) -> tuple[str, ...]:
    """Path of the stacked kernel [L, in, out] in the Flax params tree."""
    return kernel_path(self.kind)

  @property
  def hf_name(self) -> str:
    return f"model.layers.{self.layer}.{_KIND_TABLE[self.kind][1]}.weight"

  @property
  def gguf_name(self) -> str:
    return f"blk.{self.layer}.{_KIND_TABLE[self.kind][2]}.weight"


def kernel_path(kind: str) -> tuple[str, ...]:
  """Flax path of the stacked kernel of `kind`: ('layers', <attn|mlp>, kind, 'kernel')."""
  module = _KIND_TABLE[kind][0]
  return ("layers", module, kind, "kernel")


def block_of(kind: str) -> str:
  """'attn' for q, k, v, o; 'mlp' for gate, up, down."""
  if kind not in _KIND_TABLE:
    raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
  return _KIND_TABLE[kind][0]


def all_components(num_layers: int, kinds: tuple[str, ...] = KINDS) -> list[Component]:
  """Every component, ordered by layer then by position in KINDS."""
  return [Component(l, k) for l in range(num_layers) for k in kinds]


def parse_component(name: str) -> Component:
  """Inverse of Component.name: 'L03.q' -> Component(3, 'q')."""
  m = re.fullmatch(r"L(\d+)\.(\w+)", name)
  if not m:
    raise ValueError(f"not a component name: {name!r} (expected e.g. 'L03.q')")
  return Component(int(m.group(1)), m.group(2))


@dataclasses.dataclass(frozen=True)
class TensorSlot:
  """Where one HF tensor goes in the Flax tree.

  path: Flax param path; layer: index along the leading layer axis, or None for
  global tensors; transpose: HF [out, in] -> Flax [in, out].
  """
  path: tuple[str, ...]
  layer: int | None
  transpose: bool


_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def hf_to_slot(hf_name: str) -> TensorSlot | None:
  """Flax slot of an HF tensor name; None for tensors the model does not use
  (e.g. 'rotary_emb.inv_freq' buffers in old checkpoints)."""
  if hf_name in _GLOBAL_TABLE:
    path, transpose, _ = _GLOBAL_TABLE[hf_name]
    return TensorSlot(path, None, transpose)
  m = _HF_LAYER_RE.fullmatch(hf_name)
  if not m:
    return None
  layer, inner = int(m.group(1)), m.group(2)
  for kind, (module, hf_inner, _) in _KIND_TABLE.items():
    if inner == hf_inner:
      return TensorSlot(("layers", module, kind, "kernel"), layer, True)
  for norm, (hf_inner, _) in _LAYER_NORMS.items():
    if inner == hf_inner:
      return TensorSlot(("layers", norm, "scale"), layer, False)
  return None


def gguf_to_hf_name(gguf_name: str) -> str | None:
  """HF tensor name of a GGUF tensor name (llama architecture); None if unknown."""
  for hf, (_, _, gg) in _GLOBAL_TABLE.items():
    if gguf_name == gg:
      return hf
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
  if not m:
    return None
  layer, stem = m.group(1), m.group(2)
  for _, hf_inner, gg in _KIND_TABLE.values():
    if stem == gg:
      return f"model.layers.{layer}.{hf_inner}.weight"
  for hf_inner, gg in _LAYER_NORMS.values():
    if stem == gg:
      return f"model.layers.{layer}.{hf_inner}.weight"
  return None


def hf_tensor_names(num_layers: int, tie_word_embeddings: bool) -> list[str]:
  """Every HF tensor name a LlamaForCausalLM checkpoint of this depth must hold."""
  names = ["model.embed_tokens.weight", "model.norm.weight"]
  if not tie_word_embeddings:
    names.append("lm_head.weight")
  for l in range(num_layers):
    for _, hf_inner, _ in _KIND_TABLE.values():
      names.append(f"model.layers.{l}.{hf_inner}.weight")
    for hf_inner, _ in _LAYER_NORMS.values():
      names.append(f"model.layers.{l}.{hf_inner}.weight")
  return names


def iter_flax_to_hf(num_layers: int, tie_word_embeddings: bool) -> Iterator[tuple[str, TensorSlot]]:
  """(hf_name, slot) for every tensor, in HF order: the export table."""
  for name in hf_tensor_names(num_layers, tie_word_embeddings):
    slot = hf_to_slot(name)
    assert slot is not None, name
    yield name, slot


def get_path(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree
