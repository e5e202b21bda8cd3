"""The compression spec grammar: Method, Rule, Spec, parse_spec and validate.

Spec grammar (one string, usable as an ml_collections field or on the command line)::

  spec    := 'none' | '' | rule (';' rule)* [';']      (newlines also separate rules)
  rule    := KINDS '@' LAYERS ':' METHOD
  KINDS   := '*' | kind (',' kind)*          kind in KINDS, or 'attn' (q,k,v,o) / 'mlp' (gate,up,down)
  LAYERS  := '*' | item (',' item)*          item := int | int '-' int   (range inclusive)
  METHOD  := name | name '(' [arg (',' arg)*] ')'   arg := value | key '=' value
             (positional args first, in the order of the method's signature)

  methods:  identity
            magnitude(rate)                  unstructured, 0 <= rate < 1
            nm(n, m)                         N:M along the input dim, 0 <= n <= m
            absmax(bits, granularity=channel, group_size)
                                             2 <= bits <= 8; granularity tensor|channel|group;
                                             group_size only (and required) for 'group'
            wanda(rate) | wanda(n, m)        Wanda (|w| * ||x_j||), per output row / N:M
            sparsegpt(rate) | sparsegpt(n, m), percdamp=0.01, blocksize=128
                                             SparseGPT (OBS updates, blocks of columns)
            gptq(bits, group_size, act_order=False, sym=False, damp=0.01,
                 block_size=128, static_groups=act_order)
                                             GPTQ (dtm.compress.gptq): 2 <= bits <= 8; min-max
                                             grid per output row, or per group_size inputs
            rtn(bits, group_size, sym=False)   round-to-nearest on GPTQ's grid (no statistics)
            w8a8()                           int8 per-token dynamic activations x int8 per-channel
                                             weights, int32 accumulation (dtm.compress.int8)
            llm_int8(threshold=6.0)          LLM.int8: input columns with |x| >= threshold in
                                             the compute dtype, the rest as w8a8
            (w8a8 and llm_int8 quantize activations, at run time: apply_spec leaves the
            kernel float and adds mode leaves that the model's matmul reads,
            dtm.compress.act_quant)
            owl(rate, method=wanda, lamda=0.08, m=5)
                                             OWL allocation (dtm.compress.owl): one rate per
                                             layer from the dense model's outlier ratios,
                                             averaging `rate`, then method(rate_l) per layer
                                             (method wanda | sparsegpt | magnitude)
            (wanda, sparsegpt, gptq and owl need calibration statistics: `apply_spec(...,
            calibration=...)` or `calibration.calibrate_and_compress`; one positional
            argument is the rate, two are n, m: wanda(0.5) == wanda(rate=0.5),
            wanda(2,4) == wanda(n=2,m=4); n is the number KEPT of every m, as in nm)

  e.g. "down@*:magnitude(0.5); q@3:absmax(bits=8,granularity=channel); gate,up@0-3,7:nm(2,4)"

Rules apply in order and a later rule overrides an earlier one for the same component
(so "*@*:magnitude(0.5); q@0:identity" prunes everything except L00.q). `identity`
components are dropped by `Spec.resolve`: naming a component with identity is the same
as not naming it. `Spec.to_string()` is canonical (kinds in KINDS order, layers sorted
and merged into ranges, every method argument written as key=value) and round-trips
through `parse_spec`. Model-independent errors (syntax, unknown method or kind, bad
argument values) are raised by `parse_spec` / the dataclasses; model-dependent ones
(layer count, kinds the model lacks, divisibility of the input dim) by `validate`.
All errors are `DtmError`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from dtm.components import KINDS, Component, all_components, kernel_path
from dtm.compress.signatures import (  # noqa: F401 (re-exported: the spec's vocabulary)
    CALIBRATED_METHODS, GRANULARITIES, HESSIAN_METHODS, METHOD_NAMES, OWL_OPERATORS,
    RATE_OR_NM, SIGNATURES, needs_hessian, normalize_args, positional_names, signature_text)
from dtm.errors import DtmError


# Aliases usable in the KINDS part of a rule, derived from the Flax sub-module of each kind.
KIND_GROUPS: dict[str, tuple[str, ...]] = {
    module: tuple(k for k in KINDS if kernel_path(k)[1] == module) for module in ("attn", "mlp")}


@dataclasses.dataclass(frozen=True)
class Method:
  """A compression method and its arguments, e.g. Method('nm', {'n': 2, 'm': 4}).

  `args` may be given as a mapping or (key, value) pairs; it is stored normalized (typed,
  defaults filled, None dropped, signature order) as a tuple of pairs, so Methods are
  hashable (static jit args) and equal iff they mean the same thing.
  """
  name: str
  args: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "args", normalize_args(self.name, self.args))

  @property
  def kwargs(self) -> dict[str, Any]:
    return dict(self.args)

  @property
  def is_identity(self) -> bool:
    return self.name == "identity"

  def to_string(self) -> str:
    if not self.args:
      return self.name
    return f"{self.name}({','.join(f'{k}={_format_value(v)}' for k, v in self.args)})"


def _format_value(v: Any) -> str:
  return repr(v) if isinstance(v, float) else str(v)


IDENTITY = Method("identity")

# --------------------------------------------------------------------------------- grammar

_METHOD_RE = re.compile(r"([A-Za-z_]\w*)\s*(?:\((.*)\))?", re.S)
_RULE_RE = re.compile(r"([^@:]*)@([^@:]*):(.*)", re.S)


def parse_method(text: str) -> Method:
  """'absmax(8, granularity=group, group_size=64)' -> Method; raises DtmError."""
  m = _METHOD_RE.fullmatch(text.strip())
  if not m:
    raise DtmError(f"bad compression method {text.strip()!r}; expected NAME or NAME(ARGS), "
                   f"e.g. magnitude(0.5)")
  name, arg_text = m.group(1), m.group(2)
  if name not in SIGNATURES:
    raise DtmError(f"unknown compression method {name!r}; expected one of {', '.join(METHOD_NAMES)}")
  params = SIGNATURES[name]
  args: dict[str, str] = {}
  items = [s.strip() for s in arg_text.split(",")] if arg_text and arg_text.strip() else []
  seen_keyword = False
  positional = positional_names(name, sum("=" not in item for item in items))
  for pos, item in enumerate(items):
    if "=" in item:
      key, value = (s.strip() for s in item.split("=", 1))
      seen_keyword = True
    else:
      if seen_keyword:
        raise DtmError(f"{text.strip()!r}: positional argument {item!r} after a keyword argument")
      if pos >= len(positional):
        raise DtmError(f"{text.strip()!r}: too many arguments; signature is {signature_text(name)}")
      key, value = positional[pos], item
    if not value:
      raise DtmError(f"{text.strip()!r}: empty argument {item!r}")
    if key in args:
      raise DtmError(f"{text.strip()!r}: argument {key!r} given twice")
    args[key] = value
  return Method(name, args)


def _parse_kinds(text: str) -> tuple[str, ...]:
  text = text.strip()
  if text == "*":
    return KINDS
  kinds: list[str] = []
  for item in (s.strip() for s in text.split(",")):
    if item in KIND_GROUPS:
      kinds.extend(KIND_GROUPS[item])
    else:
      kinds.append(item)
  return tuple(kinds)


def _parse_layers(text: str) -> tuple[int, ...] | None:
  text = text.strip()
  if text == "*":
    return None
  layers: list[int] = []
  for item in (s.strip() for s in text.split(",")):
    m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
    if not m:
      raise DtmError(f"bad layer selector {item!r} in {text!r}; expected '*', N, A-B or a comma list")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo:
      raise DtmError(f"bad layer range {item!r}: start {lo} > end {hi}")
    layers.extend(range(lo, hi + 1))
  return tuple(layers)


def _format_layers(layers: tuple[int, ...] | None) -> str:
  """(0, 1, 2, 3, 7) -> '0-3,7'; None -> '*'."""
  if layers is None:
    return "*"
  runs: list[list[int]] = []
  for l in layers:
    if runs and l == runs[-1][1] + 1:
      runs[-1][1] = l
    else:
      runs.append([l, l])
  return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclasses.dataclass(frozen=True)
class Rule:
  """`kinds` (tuple, KINDS order) at `layers` (sorted tuple, or None = every layer) get `method`.

  The constructor also accepts lists and grammar strings ('gate,up', '0-3,7', '*',
  'nm(2,4)') and normalizes them.
  """
  kinds: tuple[str, ...]
  layers: tuple[int, ...] | None
  method: Method

  def __post_init__(self):
    kinds = _parse_kinds(self.kinds) if isinstance(self.kinds, str) else tuple(self.kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
      raise DtmError(f"unknown component kind {unknown[0] if unknown else ''!r}; expected '*' or a "
                     f"comma list of {', '.join(KINDS)} (or {', '.join(KIND_GROUPS)})")
    object.__setattr__(self, "kinds", tuple(k for k in KINDS if k in kinds))
    layers = _parse_layers(self.layers) if isinstance(self.layers, str) else self.layers
    if layers is not None:
      layers = tuple(sorted(set(int(l) for l in layers)))
      if not layers or layers[0] < 0:
        raise DtmError(f"bad layer list {self.layers!r}: layers are integers >= 0")
    object.__setattr__(self, "layers", layers)
    if isinstance(self.method, str):
      object.__setattr__(self, "method", parse_method(self.method))

  def to_string(self) -> str:
    kinds = "*" if self.kinds == KINDS else ",".join(self.kinds)
    return f"{kinds}@{_format_layers(self.layers)}:{self.method.to_string()}"

  def components(self, num_layers: int) -> list[Component]:
    """Selected components (layer-major); raises DtmError for layers >= num_layers."""
    _check_layers(self, num_layers)
    layers = range(num_layers) if self.layers is None else self.layers
    return [Component(l, k) for l in layers for k in self.kinds]


def _check_layers(rule: Rule, num_layers: int) -> None:
  if rule.layers is not None and rule.layers[-1] >= num_layers:
    raise DtmError(f"compression rule '{rule.to_string()}' names layer {rule.layers[-1]}, but the "
                   f"model has {num_layers} layers (0-{num_layers - 1})")


def parse_rule(text: str) -> Rule:
  """'gate,up@0-3,7:nm(2,4)' -> Rule; raises DtmError."""
  m = _RULE_RE.fullmatch(text.strip())
  if not m:
    raise DtmError(f"bad compression rule {text.strip()!r}; expected KINDS@LAYERS:METHOD, "
                   f"e.g. 'down@*:magnitude(0.5)'")
  return Rule(_parse_kinds(m.group(1)), _parse_layers(m.group(2)), parse_method(m.group(3)))


@dataclasses.dataclass(frozen=True)
class Spec:
  """An ordered list of rules; later rules override earlier ones per component."""
  rules: tuple[Rule, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))

  def to_string(self) -> str:
    """Canonical text; 'none' for the identity spec. parse_spec(s.to_string()) == s."""
    return "; ".join(r.to_string() for r in self.rules) if self.rules else "none"

  def resolve(self, num_layers: int) -> dict[Component, Method]:
    """Component -> its final (last matching) method, identity dropped, ordered by
    layer then KINDS; raises DtmError for layers >= num_layers."""
    chosen: dict[Component, Method] = {}
    for rule in self.rules:
      for comp in rule.components(num_layers):
        chosen[comp] = rule.method
    return {c: chosen[c] for c in all_components(num_layers)
            if c in chosen and not chosen[c].is_identity}


def parse_spec(text: str | Spec | None) -> Spec:
  """Parse the spec grammar (module docstring); '' / 'none' / None -> Spec(()). A Spec
  passes through unchanged."""
  if isinstance(text, Spec):
    return text
  if text is None or text.strip().lower() in ("", "none"):
    return Spec(())
  parts = (p.strip() for p in re.split(r"[;\n]", text))
  return Spec(tuple(parse_rule(p) for p in parts if p))


# ------------------------------------------------------------------------------ validation


def _check_shape(comp: Component, method: Method, out_in: tuple[int, int]) -> None:
  out_dim, in_dim = out_in
  a = method.kwargs
  if method.name == "absmax" and a["granularity"] == "group" and in_dim % a["group_size"]:
    raise DtmError(f"absmax group_size {a['group_size']} does not divide the input dimension of "
                   f"{comp.name} (HF weight [out={out_dim}, in={in_dim}])")
  if method.name in ("gptq", "rtn") and a.get("group_size") and in_dim % a["group_size"]:
    raise DtmError(f"{method.name} group_size {a['group_size']} does not divide the input "
                   f"dimension of {comp.name} (HF weight [out={out_dim}, in={in_dim}])")
  if method.name in ("nm",) + RATE_OR_NM and a.get("m") and in_dim % a["m"]:
    raise DtmError(f"{method.name}(n={a['n']}, m={a['m']}): m={a['m']} does not divide the input "
                   f"dimension of {comp.name} (HF weight [out={out_dim}, in={in_dim}])")


def validate(spec: str | Spec, num_layers: int, shapes: Mapping[str, tuple[int, int]]) -> Spec:
  """Check `spec` against a model with `num_layers` layers and HF weight shapes
  `shapes[kind] = (out, in)`; returns the parsed Spec or raises DtmError naming the
  offending rule/component and the model's dimensions."""
  spec = parse_spec(spec)
  for rule in spec.rules:
    _check_layers(rule, num_layers)
    missing = [k for k in rule.kinds if k not in shapes]
    if missing:
      raise DtmError(f"compression rule '{rule.to_string()}' names kind {missing[0]!r}, which this "
                     f"model does not have (it has: {', '.join(shapes)})")
  for comp, method in spec.resolve(num_layers).items():
    _check_shape(comp, method, tuple(shapes[comp.kind]))
  return spec
