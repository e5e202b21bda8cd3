"""Weight compression of Llama components: a spec grammar and the methods it names.

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
            (wanda, sparsegpt and gptq need calibration statistics: `apply_spec(...,
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

Layout convention: every per-matrix function takes and returns an HF-layout weight
`w_OI` of shape [out, in] (the transpose of a Flax kernel [in, out]); all orders and
groups are defined on that layout in row-major order: N:M groups and AbsMax groups are
runs of consecutive *input* columns of one output row, and magnitude ties are broken
by the lower flat index `o * in + i`. `apply_spec` does the Flax <-> HF transposes.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dtm.components import KINDS, Component, all_components, get_path, kernel_path
from dtm.errors import DtmError

GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")

# Aliases usable in the KINDS part of a rule, derived from the Flax sub-module of each kind.
KIND_GROUPS: dict[str, tuple[str, ...]] = {
    module: tuple(k for k in KINDS if kernel_path(k)[1] == module) for module in ("attn", "mlp")}


# ----------------------------------------------------------------------------- methods: args


@dataclasses.dataclass(frozen=True)
class _Param:
  name: str
  convert: Callable[[Any], Any]
  required: bool = True
  default: Any = None


def _to_int(value: Any) -> int:
  if isinstance(value, bool):
    raise ValueError(value)
  if isinstance(value, int):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
    return int(value)
  raise ValueError(value)


def _to_float(value: Any) -> float:
  if isinstance(value, bool):
    raise ValueError(value)
  return float(value)


def _to_bool(value: Any) -> bool:
  if isinstance(value, bool):
    return value
  text = str(value).strip().strip("'\"").lower()
  if text in ("true", "1", "yes"):
    return True
  if text in ("false", "0", "no"):
    return False
  raise ValueError(value)


def _to_str(value: Any) -> str:
  if not isinstance(value, str):
    raise ValueError(value)
  return value.strip().strip("'\"")


# method name -> its parameters, in positional order
_SIGNATURES: dict[str, tuple[_Param, ...]] = {
    "identity": (),
    "magnitude": (_Param("rate", _to_float),),
    "nm": (_Param("n", _to_int), _Param("m", _to_int)),
    "absmax": (_Param("bits", _to_int), _Param("granularity", _to_str, False, "channel"),
               _Param("group_size", _to_int, False, None)),
    "wanda": (_Param("rate", _to_float, False), _Param("n", _to_int, False),
              _Param("m", _to_int, False)),
    "sparsegpt": (_Param("rate", _to_float, False), _Param("n", _to_int, False),
                  _Param("m", _to_int, False), _Param("percdamp", _to_float, False, 0.01),
                  _Param("blocksize", _to_int, False, 128)),
    # the arguments of dtm.compress.gptq.gptq / rtn (static_groups None = act_order)
    "gptq": (_Param("bits", _to_int), _Param("group_size", _to_int, False, None),
             _Param("act_order", _to_bool, False, False), _Param("sym", _to_bool, False, False),
             _Param("damp", _to_float, False, 0.01), _Param("block_size", _to_int, False, 128),
             _Param("static_groups", _to_bool, False, None)),
    "rtn": (_Param("bits", _to_int), _Param("group_size", _to_int, False, None),
            _Param("sym", _to_bool, False, False)),
    # activation-aware linears (dtm.compress.act_quant, dtm.compress.int8)
    "w8a8": (),
    "llm_int8": (_Param("threshold", _to_float, False, 6.0),),
}
METHOD_NAMES: tuple[str, ...] = tuple(_SIGNATURES)

# Methods that take either (rate) or (n, m): positionally one argument is the rate, two
# are n and m.
_RATE_OR_NM: tuple[str, ...] = ("wanda", "sparsegpt")
# Methods that need calibration statistics (`apply_spec(..., calibration=...)`), and
# those of them that need the input Hessian (not just its diagonal).
CALIBRATED_METHODS: frozenset[str] = frozenset({"wanda", "sparsegpt", "gptq"})
HESSIAN_METHODS: frozenset[str] = frozenset({"sparsegpt", "gptq"})


def _signature_text(name: str) -> str:
  if name in _RATE_OR_NM:
    extra = [f"{p.name}={p.default}" for p in _SIGNATURES[name][3:]]
    return f"{name}(rate) or {name}(n, m)" + (f", optional {', '.join(extra)}" if extra else "")
  return f"{name}({', '.join(p.name for p in _SIGNATURES[name])})"


def _positional_names(name: str, count: int) -> tuple[str, ...]:
  """Argument names of `count` positional arguments of method `name`."""
  if name in _RATE_OR_NM:
    return ("rate",) if count == 1 else ("n", "m")
  return tuple(p.name for p in _SIGNATURES[name])


def _check_values(name: str, a: dict[str, Any]) -> None:
  """Model-independent range checks of normalized method args; raises DtmError."""
  if name == "magnitude" and not 0.0 <= a["rate"] < 1.0:
    raise DtmError(f"magnitude sparsity rate must be in [0, 1), got {a['rate']}")
  if name == "nm":
    n, m = a["n"], a["m"]
    if m < 1 or n < 0:
      raise DtmError(f"nm(n={n}, m={m}): need m >= 1 and n >= 0")
    if n > m:
      raise DtmError(f"nm(n={n}, m={m}): N:M pruning keeps n of every m weights, so n must be <= m")
  if name == "absmax":
    if not 2 <= a["bits"] <= 8:
      raise DtmError(f"absmax bits must be in 2..8, got {a['bits']}")
    gran, g = a["granularity"], a["group_size"]
    if gran not in GRANULARITIES:
      raise DtmError(f"absmax granularity must be one of {', '.join(GRANULARITIES)}, got {gran!r}")
    if gran == "group" and g is None:
      raise DtmError("absmax granularity=group needs group_size, e.g. "
                     "absmax(bits=4,granularity=group,group_size=128)")
    if gran != "group" and g is not None:
      raise DtmError(f"absmax group_size only applies to granularity=group (got granularity={gran}); "
                     f"write absmax(bits={a['bits']},granularity=group,group_size={g})")
    if g is not None and g < 1:
      raise DtmError(f"absmax group_size must be >= 1, got {g}")
  if name in _RATE_OR_NM:
    _check_rate_or_nm(name, a)
  if name in ("gptq", "rtn"):
    _check_gptq_rtn(name, a)
  if name == "llm_int8" and not (math.isfinite(a["threshold"]) and a["threshold"] > 0):
    raise DtmError(f"llm_int8 outlier threshold must be a finite number > 0 (|x| >= threshold "
                   f"marks an outlier feature; the paper uses 6.0), got {a['threshold']}; for "
                   f"no decomposition use w8a8")


def _check_gptq_rtn(name: str, a: dict[str, Any]) -> None:
  from dtm.compress import gptq as gptq_lib  # lazy: that module is imported by users of this one
  lo, hi = gptq_lib.MIN_BITS, gptq_lib.MAX_BITS
  if not lo <= a["bits"] <= hi:
    raise DtmError(f"{name} bits must be in {lo}..{hi}, got {a['bits']}")
  if a["group_size"] is not None and a["group_size"] < 1:
    raise DtmError(f"{name} group_size must be >= 1 (omit it for one grid per output row), "
                   f"got {a['group_size']}")
  if "damp" in a and not (math.isfinite(a["damp"]) and a["damp"] >= 0):
    raise DtmError(f"gptq damp (dampening, a fraction of the mean Hessian diagonal) must be "
                   f">= 0, got {a['damp']}")
  if "block_size" in a and a["block_size"] < 1:
    raise DtmError(f"gptq block_size must be >= 1, got {a['block_size']}")


def _check_rate_or_nm(name: str, a: dict[str, Any]) -> None:
  rate, n, m = a["rate"], a["n"], a["m"]
  if not ((rate is not None and n is None and m is None)
          or (rate is None and n is not None and m is not None)):
    raise DtmError(f"{name} takes either a sparsity rate or n and m (keep n of every m), e.g. "
                   f"{name}(0.5) or {name}(2,4); got "
                   f"{', '.join(f'{k}={v}' for k, v in a.items() if v is not None) or 'none'}")
  if rate is not None and not (math.isfinite(rate) and 0.0 <= rate < 1.0):
    raise DtmError(f"{name} sparsity rate must be in [0, 1), got {rate}")
  if n is not None:
    if m < 1 or n < 0:
      raise DtmError(f"{name}(n={n}, m={m}): need m >= 1 and n >= 0")
    if n > m:
      raise DtmError(f"{name}(n={n}, m={m}): N:M pruning keeps n of every m weights, so n must "
                     f"be <= m")
  if "percdamp" in a and not (math.isfinite(a["percdamp"]) and a["percdamp"] >= 0):
    raise DtmError(f"{name} percdamp (dampening, a fraction of the mean Hessian diagonal) must "
                   f"be >= 0, got {a['percdamp']}")
  if "blocksize" in a and a["blocksize"] < 1:
    raise DtmError(f"{name} blocksize must be >= 1, got {a['blocksize']}")


def _normalize_args(name: str, args: Any) -> tuple[tuple[str, Any], ...]:
  """Typed, defaulted, range-checked args as ((key, value), ...) in signature order."""
  if name not in _SIGNATURES:
    raise DtmError(f"unknown compression method {name!r}; expected one of {', '.join(METHOD_NAMES)}")
  given = dict(args or ())
  params = _SIGNATURES[name]
  unknown = sorted(set(given) - {p.name for p in params})
  if unknown:
    raise DtmError(f"{name}: unknown argument {unknown[0]!r}; signature is {_signature_text(name)}")
  out: dict[str, Any] = {}
  for p in params:
    if p.name not in given:
      if p.required:
        raise DtmError(f"{name}: missing argument {p.name!r}; signature is {_signature_text(name)}")
      out[p.name] = p.default
      continue
    try:
      out[p.name] = p.convert(given[p.name])
    except (TypeError, ValueError):
      raise DtmError(f"{name}: bad value {given[p.name]!r} for argument {p.name!r}") from None
  _check_values(name, out)
  if name == "gptq" and out["static_groups"] is None:  # gptq.gptq's default, made explicit
    out["static_groups"] = out["act_order"]
  return tuple((k, v) for k, v in out.items() if v is not None)


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
    object.__setattr__(self, "args", _normalize_args(self.name, self.args))

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
  if name not in _SIGNATURES:
    raise DtmError(f"unknown compression method {name!r}; expected one of {', '.join(METHOD_NAMES)}")
  params = _SIGNATURES[name]
  args: dict[str, str] = {}
  items = [s.strip() for s in arg_text.split(",")] if arg_text and arg_text.strip() else []
  seen_keyword = False
  positional = _positional_names(name, sum("=" not in item for item in items))
  for pos, item in enumerate(items):
    if "=" in item:
      key, value = (s.strip() for s in item.split("=", 1))
      seen_keyword = True
    else:
      if seen_keyword:
        raise DtmError(f"{text.strip()!r}: positional argument {item!r} after a keyword argument")
      if pos >= len(positional):
        raise DtmError(f"{text.strip()!r}: too many arguments; signature is {_signature_text(name)}")
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


def kernel_shapes(params) -> tuple[int, dict[str, tuple[int, int]]]:
  """(num_layers, {kind: (out, in)}) from a params tree (arrays or ShapeDtypeStructs)
  whose stacked kernels are [L, in, out]; kinds absent from the tree are left out."""
  num_layers, shapes = None, {}
  for kind in KINDS:
    try:
      shape = tuple(get_path(params, kernel_path(kind)).shape)
    except (KeyError, TypeError):
      continue
    if len(shape) != 3 or (num_layers is not None and shape[0] != num_layers):
      raise DtmError(f"kernel {'/'.join(kernel_path(kind))} has shape {shape}; expected "
                     f"[L, in, out] with the same L for every kind")
    num_layers = shape[0]
    shapes[kind] = (shape[2], shape[1])
  if num_layers is None:
    raise DtmError("params hold no compressible kernels under "
                   f"{'/'.join(kernel_path(KINDS[0])[:2])}/... ; is this a dtm Llama params tree?")
  return num_layers, shapes


def _check_shape(comp: Component, method: Method, out_in: tuple[int, int]) -> None:
  out_dim, in_dim = out_in
  a = method.kwargs
  if method.name == "absmax" and a["granularity"] == "group" and in_dim % a["group_size"]:
    raise DtmError(f"absmax group_size {a['group_size']} does not divide the input dimension of "
                   f"{comp.name} (HF weight [out={out_dim}, in={in_dim}])")
  if method.name in ("gptq", "rtn") and a.get("group_size") and in_dim % a["group_size"]:
    raise DtmError(f"{method.name} group_size {a['group_size']} does not divide the input "
                   f"dimension of {comp.name} (HF weight [out={out_dim}, in={in_dim}])")
  if method.name in ("nm",) + _RATE_OR_NM and a.get("m") and in_dim % a["m"]:
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


# --------------------------------------------------------------------- per-matrix functions
# All take an HF-layout weight w_OI [out, in] and return (w'_OI same shape/dtype, stats),
# stats = {'sparsity': f32 [] fraction of exactly-zero entries of w', 'bits': i32 [] bits per
# stored weight: b for absmax, the dtype's width otherwise}.


def _stats(w_OI: jax.Array, bits: int) -> dict[str, jax.Array]:
  return {"sparsity": jnp.mean(w_OI == 0, dtype=jnp.float32), "bits": jnp.asarray(bits, jnp.int32)}


def _dtype_bits(dtype) -> int:
  return jnp.finfo(dtype).bits


def num_pruned(rate: float, numel: int) -> int:
  """k = floor(rate * numel), the number of weights magnitude pruning zeroes. A 1e-12
  relative tolerance absorbs binary rounding of decimal rates (0.29 * 100 -> 29, not 28)."""
  return math.floor(rate * numel * (1 + 1e-12))


def prune_rank(w_OI: jax.Array) -> jax.Array:
  """int32 [out, in]: rank of each weight in ascending (|w|, flat HF index o*in+i) order.

  rank 0 is pruned first: magnitude pruning at k keeps exactly `rank >= k`, so a probe
  at any rate r can build its mask from one rank array without re-sorting. Pre-existing
  zeros have the smallest |w| and therefore the lowest ranks.
  """
  order = jnp.argsort(jnp.abs(w_OI).reshape(-1), stable=True)
  rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  return rank.reshape(w_OI.shape)


def prune_rank_kernel(kernel_IO: jax.Array) -> jax.Array:
  """prune_rank of a Flax kernel [in, out] (ranks in HF order), returned as [in, out]."""
  return prune_rank(kernel_IO.T).T


def prune_lowest(w_OI: jax.Array, k) -> jax.Array:
  """Zero the k weights of lowest prune_rank; k may be traced."""
  return jnp.where(magnitude_pruned(jnp.abs(w_OI), _flat_index(w_OI.shape), k),
                   jnp.zeros_like(w_OI), w_OI)


def _flat_index(shape_OI) -> jax.Array:
  out_dim, in_dim = shape_OI
  return jnp.arange(out_dim * in_dim, dtype=jnp.int32).reshape(out_dim, in_dim)


def magnitude_cut(abs_w: jax.Array, flat_index: jax.Array, k) -> tuple[jax.Array, jax.Array]:
  """The k-th smallest weight in (|w|, HF flat index) order, found without sorting.

  abs_w: |w| (any layout, float); flat_index: int32, same shape, each weight's HF
  row-major index o*in+i; k: int (may be traced), 1 <= k <= numel. Returns
  (v_bits, last) such that the first k weights in that order are exactly those with
  bits(|w|) < v_bits, or bits(|w|) == v_bits and flat_index <= last. Non-negative
  floats order like their int32 bit patterns, so two binary searches of counting
  passes (31 over values; over indices only when just some of the ties at the k-th
  value are pruned) replace an O(n log n) sort that is slow on CPU; the result equals
  `prune_rank(w) < k` exactly.
  """
  bits = jax.lax.bitcast_convert_type(abs_w.astype(jnp.float32), jnp.int32)
  k = jnp.asarray(k, jnp.int32)

  def search(count_ge, lo, hi):
    # smallest t in [lo, hi] with count_ge(t) true (non-decreasing in t); a while loop,
    # so an empty range (lo == hi) costs no pass
    def body(lohi):
      lo, hi = lohi
      mid = lo + (hi - lo) // 2
      ok = count_ge(mid)
      return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
    return jax.lax.while_loop(lambda lohi: lohi[0] < lohi[1], body,
                              (jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)))[0]

  v = search(lambda t: jnp.sum(bits <= t, dtype=jnp.int32) >= k, 0, 0x7F800000)
  ties = bits == v
  need = k - jnp.sum(bits < v, dtype=jnp.int32)  # how many ties at v are pruned
  # Usually every tie at v is pruned (often there is just one): then no index search.
  all_ties = need >= jnp.sum(ties, dtype=jnp.int32)
  top = jnp.max(flat_index)
  last = search(lambda j: jnp.sum(ties & (flat_index <= j), dtype=jnp.int32) >= need,
                jnp.where(all_ties, top, 0), top)
  return v, last


def magnitude_pruned(abs_w: jax.Array, flat_index: jax.Array, k) -> jax.Array:
  """bool mask of the k weights magnitude pruning zeroes (see `magnitude_cut`); k traced ok."""
  v, last = magnitude_cut(abs_w, flat_index, jnp.maximum(k, 1))
  bits = jax.lax.bitcast_convert_type(abs_w.astype(jnp.float32), jnp.int32)
  return ((bits < v) | ((bits == v) & (flat_index <= last))) & (k > 0)


@functools.partial(jax.jit, static_argnames=("rate",))
def magnitude(w_OI: jax.Array, rate: float):
  """Unstructured magnitude pruning: zero exactly k = num_pruned(rate, numel) weights,
  the smallest |w|, ties -> lower HF flat index pruned first. Pre-existing zeros count
  among the k (they are pruned first), so achieved sparsity = max(k, #zeros) / numel."""
  w = prune_lowest(w_OI, num_pruned(rate, w_OI.size))
  return w, _stats(w, _dtype_bits(w.dtype))


@functools.partial(jax.jit, static_argnames=("n", "m"))
def nm(w_OI: jax.Array, n: int, m: int):
  """N:M pruning: in each group of m consecutive input weights of every output row keep
  the n largest |w|, zero the other m - n (ties -> lower index pruned first). in % m == 0."""
  keep = nm_rank(w_OI, m) >= m - n
  w = jnp.where(keep, w_OI, jnp.zeros_like(w_OI))
  return w, _stats(w, _dtype_bits(w.dtype))


def nm_rank(w_OI: jax.Array, m: int) -> jax.Array:
  """int32 [out, in]: rank of each weight inside its group of m consecutive input weights,
  ascending (|w|, index) order: rank_i = #{j : |w_j| < |w_i| or (|w_j| == |w_i| and j < i)}.
  N:M keeps `rank >= m - n`. Pairwise counting (m^2 work, fused), far faster than sorting."""
  out_dim, in_dim = w_OI.shape
  a_OGm = jnp.abs(w_OI).reshape(out_dim, in_dim // m, m)
  a_i, a_j = a_OGm[..., :, None], a_OGm[..., None, :]
  j_before_i = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [i, j]
  rank = jnp.sum((a_j < a_i) | ((a_j == a_i) & j_before_i), axis=-1, dtype=jnp.int32)
  return rank.reshape(out_dim, in_dim)


def _group_width(in_dim: int, granularity: str, group_size: int | None) -> int:
  return group_size if granularity == "group" else in_dim


def absmax_scale(w_OI: jax.Array, bits: int, granularity: str = "channel",
                 group_size: int | None = None) -> jax.Array:
  """f32 AbsMax scale = max|w| / (2^(bits-1) - 1) over each quantization group.

  Shape broadcasts against w reshaped to [out, in // g, g] (g = in unless 'group'):
  tensor [1, 1, 1], channel [out, 1, 1], group [out, in // group_size, 1].
  """
  return _absmax_scale(w_OI, jnp.float32(2 ** (bits - 1) - 1), granularity, group_size)


def _absmax_scale(w_OI: jax.Array, qmax, granularity: str, group_size: int | None) -> jax.Array:
  out_dim, in_dim = w_OI.shape
  g = _group_width(in_dim, granularity, group_size)
  absw_OGg = jnp.abs(w_OI.astype(jnp.float32)).reshape(out_dim, in_dim // g, g)
  axes = (0, 1, 2) if granularity == "tensor" else (2,)
  amax = jnp.max(absw_OGg, axis=axes, keepdims=True)
  # XLA rewrites x / broadcast(s) as x * (1/s), which is not IEEE division and moves
  # some weights to the neighbouring grid point; materialising the divisors behind an
  # optimization barrier keeps the divisions exact (as numpy / torch compute them).
  # The divisor is made a function of amax so that under vmap it is batched like amax
  # (an unbatched one is broadcast after the barrier and XLA turns the division into a
  # reciprocal multiply again: one ulp off on ~40 % of the scales inside apply_spec).
  qmax_full = jnp.full(amax.shape, qmax, jnp.float32)
  return amax / jax.lax.optimization_barrier(jnp.where(amax == amax, qmax_full, qmax_full))


@functools.partial(jax.jit, static_argnames=("bits", "granularity", "group_size"))
def absmax(w_OI: jax.Array, bits: int, granularity: str = "channel", group_size: int | None = None):
  """Symmetric weight-only AbsMax fake quantization to `bits` bits:
  q = clip(round_half_even(w / scale), ±(2^(bits-1) - 1)), w' = q * scale (computed in f32,
  cast back to w's dtype); an all-zero group (scale 0) stays zero."""
  w = absmax_values(w_OI, jnp.float32(2 ** (bits - 1) - 1), granularity, group_size)
  return w, _stats(w, bits)


def absmax_values(w_OI: jax.Array, qmax, granularity: str = "channel",
                  group_size: int | None = None) -> jax.Array:
  """The AbsMax fake-quantized weight for a (possibly traced) f32 qmax = 2^(bits-1) - 1;
  shared by `absmax` and the vmapped probes so both give bit-identical weights."""
  out_dim, in_dim = w_OI.shape
  g = _group_width(in_dim, granularity, group_size)
  scale = _absmax_scale(w_OI, qmax, granularity, group_size)
  w_OGg = w_OI.astype(jnp.float32).reshape(out_dim, in_dim // g, g)
  divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(scale == 0, 1.0, scale),
                                                          w_OGg.shape))
  q = jnp.clip(jnp.round(w_OGg / divisor), -qmax, qmax)
  return (q * scale).reshape(out_dim, in_dim).astype(w_OI.dtype)


@jax.jit
def identity(w_OI: jax.Array):
  return w_OI, _stats(w_OI, _dtype_bits(w_OI.dtype))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym"))
def rtn(w_OI: jax.Array, bits: int, group_size: int | None = None, sym: bool = False):
  """Round-to-nearest on GPTQ's min-max grid (`dtm.compress.gptq.rtn`: per output row, or
  per group of group_size consecutive inputs; asymmetric unless sym) -> (w', stats)."""
  from dtm.compress import gptq as gptq_lib  # lazy, as the other method modules
  w = gptq_lib.rtn(w_OI, bits, group_size, sym).w
  return w, _stats(w, bits)


def compress(w_OI: jax.Array, method: Method):
  """Apply `method` to one HF-layout weight [out, in] -> (w', stats). Traceable.
  Methods of CALIBRATED_METHODS need statistics: `compress_calibrated` (DtmError here)."""
  if method.name in ("w8a8", "llm_int8"):
    raise DtmError(f"{method.to_string()} quantizes activations at run time and has no weight-only "
                   f"form; apply it with apply_spec (mode leaves read by the model's matmul)")
  if method.name in CALIBRATED_METHODS:
    raise DtmError(f"{method.to_string()} needs calibration statistics of the weight's input, "
                   f"which this path does not have (use apply_spec(..., calibration=...) or a "
                   f"job with a calibration block)")
  fn = {"identity": identity, "magnitude": magnitude, "nm": nm, "absmax": absmax,
        "rtn": rtn}[method.name]
  return fn(w_OI, **method.kwargs)


def compress_calibrated(w_OI: jax.Array, method: Method, stats, component: Component | None = None,
                        *, kernel: bool = False):
  """Apply a method of CALIBRATED_METHODS to one HF weight [out, in] -> (w', stats dict).

  `stats` holds the statistics of the weight's input over the calibration tokens
  (`calibration.InputStats` or anything with the same attributes): `sq_norms` f32 [in]
  (Wanda) and `hessian` f32 [in, in] (SparseGPT, GPTQ). The stats dict is `compress`'s
  (for gptq 'bits' = bits) plus, for sparsegpt and gptq, 'damp' (f32 [], the relative
  dampening used). kernel=True: `w_OI` is
  a Flax kernel [in, out] instead, and so is w'.
  Not traceable: a Hessian that SparseGPT or GPTQ cannot factorize even with their
  increased dampening (`sparsegpt.inverse_hessian_factor`, gptq's retries up to
  `gptq.MAX_DAMP`) raises DtmError naming `component` and the dampenings tried.
  """
  from dtm.compress import gptq as gptq_lib  # lazy: those modules import this one
  from dtm.compress import sparsegpt as sparsegpt_lib
  what = component.name if component is not None else f"a weight of shape {tuple(w_OI.shape)}"
  in_dim = w_OI.shape[0 if kernel else 1]
  if method.name not in CALIBRATED_METHODS:
    raise ValueError(f"{method.name} is not a calibrated method")
  needs_hessian = method.name in HESSIAN_METHODS
  if needs_hessian:
    _check_stat(stats, "hessian", (in_dim, in_dim), what, method)
  else:
    _check_stat(stats, "sq_norms", (in_dim,), what, method)
  # (transposes outside the jit: inside, they double XLA:CPU's compile time of wanda)
  w, out = _calibrated(w_OI.T if kernel else w_OI,
                       stats.hessian if needs_hessian else stats.sq_norms, method)
  w = w.T if kernel else w
  if "damp" in out and not math.isfinite(float(out["damp"])):
    if method.name == "gptq":
      tried = ", ".join(f"{d:g}" for d in gptq_lib._damp_schedule(method.kwargs["damp"]))
      raise DtmError(
          f"gptq: the input Hessian of {what} is not positive definite even after dampening "
          f"(tried H + d * mean(diag H) * I for d = {tried}); the calibration activations may "
          f"hold inf/NaN, or too few calibration tokens; quantize {what} with rtn instead")
    tried = ", ".join(f"{d:g}" for d in sparsegpt_lib.damp_schedule(method.kwargs["percdamp"]))
    raise DtmError(
        f"sparsegpt: the input Hessian of {what} is not positive definite even after "
        f"dampening (tried H + d * mean(diag H) * I for d = {tried}, each followed by "
        f"Cholesky factorizations of the matrix and its inverse); the calibration "
        f"activations may hold inf/NaN, or the statistics are not a Gram matrix "
        f"sum_t x_t x_t^T")
  return w, out


@functools.partial(jax.jit, static_argnames=("method",))
def _calibrated(w_OI, stat, method: Method):
  """One jit per (shape, method): (w', stats) of a calibrated method; `stat` is the
  Hessian for HESSIAN_METHODS, the squared norms otherwise."""
  from dtm.compress import sparsegpt as sparsegpt_lib  # lazy: those modules import this one
  from dtm.compress import wanda as wanda_lib
  from dtm.compress import gptq as gptq_lib
  extra = {}
  if method.name == "wanda":
    new = wanda_lib.wanda(w_OI, stat, **method.kwargs)
  elif method.name == "gptq":
    res = gptq_lib.gptq(w_OI, stat, **method.kwargs)
    new, extra["damp"] = res.w, res.damp
    return new, {**_stats(new, method.kwargs["bits"]), **extra}
  else:
    new, extra["damp"] = sparsegpt_lib.sparsegpt(w_OI, stat, **method.kwargs)
  return new, {**_stats(new, _dtype_bits(new.dtype)), **extra}


@functools.partial(jax.jit, static_argnames=("method",))
def compress_kernel(kernel_IO: jax.Array, method: Method):
  """`compress` of a Flax kernel [in, out] -> (kernel' [in, out], stats); one jit."""
  new_OI, stats = compress(kernel_IO.T, method)
  return new_OI.T, stats


def _check_stat(stats, name: str, shape: tuple[int, ...], what: str, method: Method) -> None:
  value = getattr(stats, name, None)
  if value is None:
    raise DtmError(f"{method.to_string()} on {what} needs the calibration statistic {name!r}, "
                   f"which was not collected (collect_statistics(..., hessian=True) collects "
                   f"the Hessian)")
  if tuple(value.shape) != shape:
    raise DtmError(f"calibration statistic {name!r} for {what} has shape {tuple(value.shape)}, "
                   f"expected {shape}; were the statistics collected on this model?")


# ------------------------------------------------------------------------------ params tree


@functools.partial(jax.jit, static_argnames=("method", "batch_size"))
def _compress_layers(kernel_LIO: jax.Array, layers_N: jax.Array, method: Method,
                     batch_size: int | None):
  """Compress kernel_LIO[layers_N] (each transposed to HF [out, in]) with one method;
  vmapped over the N layers, or lax.map in chunks of batch_size to bound memory."""
  w_NOI = jnp.swapaxes(kernel_LIO[layers_N], -1, -2)
  fn = functools.partial(compress, method=method)
  if batch_size is None:
    new_NOI, stats = jax.vmap(fn)(w_NOI)
  else:
    new_NOI, stats = jax.lax.map(fn, w_NOI, batch_size=batch_size)
  return kernel_LIO.at[layers_N].set(jnp.swapaxes(new_NOI, -1, -2)), stats


def _set_path(tree, path: tuple[str, ...], value):
  """Copy of `tree` with tree[path] = value; only the dicts along the path are copied."""
  if not path:
    return value
  frozen = isinstance(tree, flax.core.FrozenDict)
  new = dict(tree)
  new[path[0]] = _set_path(tree[path[0]], path[1:], value)
  return flax.core.FrozenDict(new) if frozen else new


def apply_spec(params, spec: str | Spec, *, batch_size: int | None = None,
               calibration: Mapping[Component, Any] | None = None):
  """Compress the components selected by `spec` -> (new_params, report).

  Pure: the input tree is not modified; untouched leaves are the same arrays. Components
  sharing (kind, method) are compressed by one jitted call vmapped over their layers
  (`batch_size` switches to lax.map over chunks of that many layers, to bound memory on
  large models). report[Component.name] = {'method': canonical method string,
  'sparsity': achieved fraction of exact zeros, 'bits': bits per weight}, ordered by name.
  Raises DtmError if the spec does not fit the model (see `validate`).

  Methods of CALIBRATED_METHODS (wanda, sparsegpt, gptq) need `calibration`: a mapping
  Component -> input statistics (`calibration.collect_statistics(cfg, params, windows)`,
  every statistic from the original model); they are applied one component at a time
  and sparsegpt's and gptq's report entries also hold 'damp'. For the reference procedure, where
  layer l's statistics come from the already compressed layers < l, use
  `calibration.calibrate_and_compress`.

  w8a8 / llm_int8 components keep their float kernel; their kinds get int32 mode and f32
  threshold leaves [L] beside the kernel (`act_quant.attach`), which the model's matmul
  reads, so the returned tree works with every `Llama.apply({'params': ...})` caller.
  """
  num_layers, shapes = kernel_shapes(params)
  spec = validate(spec, num_layers, shapes)
  groups: dict[tuple[str, Method], list[int]] = collections.defaultdict(list)
  calibrated: dict[Component, Method] = {}
  activation: dict[Component, Method] = {}
  for comp, method in spec.resolve(num_layers).items():
    if method.name in ("w8a8", "llm_int8"):  # activation methods: dtm.compress.act_quant
      activation[comp] = method
    elif method.name in CALIBRATED_METHODS:
      calibrated[comp] = method
    else:
      groups[(comp.kind, method)].append(comp.layer)
  _check_calibration(calibrated, calibration)
  new_params, device_stats = params, {}
  for (kind, method), layers in groups.items():
    path = kernel_path(kind)
    kernel, stats = _compress_layers(get_path(new_params, path), jnp.asarray(layers, jnp.int32),
                                     method=method, batch_size=batch_size)
    new_params = _set_path(new_params, path, kernel)
    device_stats[(kind, method, tuple(layers))] = stats
  # one transfer for the whole report (a list: pytree dict keys must sort, Methods do not)
  host_stats = zip(device_stats, jax.device_get(list(device_stats.values())))
  report = {}
  for (kind, method, layers), stats in host_stats:
    for i, layer in enumerate(layers):
      report[Component(layer, kind).name] = {"method": method.to_string(),
                                             "sparsity": float(stats["sparsity"][i]),
                                             "bits": int(stats["bits"][i])}
  new_params, calibrated_report = _apply_calibrated(new_params, calibrated, calibration)
  report.update(calibrated_report)
  if activation:
    from dtm.compress import act_quant  # lazy, as the other method modules
    new_params = act_quant.attach(new_params, activation)
    zeros = jax.device_get({c: jnp.mean(get_path(new_params, kernel_path(c.kind))[c.layer] == 0,
                                        dtype=jnp.float32) for c in activation})
    report.update({c.name: {"method": m.to_string(), "sparsity": float(zeros[c]), "bits": 8}
                   for c, m in activation.items()})
  return new_params, dict(sorted(report.items()))


def _check_calibration(calibrated: Mapping[Component, Method], calibration) -> None:
  if not calibrated:
    return
  first = next(iter(calibrated))
  if calibration is None:
    raise DtmError(
        f"compression method {calibrated[first].name} ({first.name}, ...) needs calibration "
        f"statistics: pass apply_spec(..., calibration=dtm.compress.calibration."
        f"collect_statistics(cfg, params, windows)), or run dtm.compress.calibration."
        f"calibrate_and_compress(cfg, params, spec, windows) (layer by layer, as the "
        f"reference implementations)")
  missing = [c.name for c in calibrated if c not in calibration]
  if missing:
    raise DtmError(f"calibration statistics are missing for {', '.join(missing[:5])}"
                   f"{' ...' if len(missing) > 5 else ''} (needed by {calibrated[first].name}); "
                   f"collect them for every layer the spec prunes")


def report_entry(method: Method, stats) -> dict[str, Any]:
  """One report record from a (host) stats dict of `compress` / `compress_calibrated`."""
  entry = {"method": method.to_string(), "sparsity": float(stats["sparsity"]),
           "bits": int(stats["bits"])}
  if "damp" in stats:  # the f32 value's shortest repr: 0.01, not 0.009999999776
    entry["damp"] = float(str(np.float32(stats["damp"])))
  return entry


def set_kernel_layers(params, kind: str, items: list[tuple[int, jax.Array]]):
  """Copy of `params` whose stacked `kind` kernel has kernel[l] = k for (l, k [in, out]) in
  items (one jitted update); the other leaves are the same arrays."""
  path = kernel_path(kind)
  kernel = _set_layers(get_path(params, path), jnp.asarray([l for l, _ in items], jnp.int32),
                       tuple(k for _, k in items))
  return _set_path(params, path, kernel)


@jax.jit
def _set_layers(kernel_LIO, layers_N, new_IO: tuple[jax.Array, ...]):
  return kernel_LIO.at[layers_N].set(jnp.stack(new_IO).astype(kernel_LIO.dtype))


@jax.jit
def _layer_kernel(kernel_LIO: jax.Array, layer) -> jax.Array:
  return kernel_LIO[layer]


def _apply_calibrated(params, calibrated: Mapping[Component, Method], calibration):
  """Compress each component of `calibrated` with its statistics; one update per kind."""
  by_kind: dict[str, list[tuple[int, jax.Array]]] = collections.defaultdict(list)
  report = {}
  for comp, method in calibrated.items():
    kernel = _layer_kernel(get_path(params, kernel_path(comp.kind)), comp.layer)
    new, stats = compress_calibrated(kernel, method, calibration[comp], comp, kernel=True)
    by_kind[comp.kind].append((comp.layer, new))
    report[comp.name] = report_entry(method, jax.device_get(stats))
  for kind, items in by_kind.items():
    params = set_kernel_layers(params, kind, items)
  return params, report
