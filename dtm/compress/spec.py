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
import math
import re
from typing import Any, Callable, Mapping

from dtm.components import KINDS, Component, all_components, kernel_path
from dtm.compress import gptq as gptq_lib
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
    # an allocation (dtm.compress.owl): per-layer rates of `method` from the dense
    # model's outlier ratios, averaging `rate`
    "owl": (_Param("rate", _to_float), _Param("method", _to_str, False, "wanda"),
            _Param("lamda", _to_float, False, 0.08), _Param("m", _to_float, False, 5.0)),
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
CALIBRATED_METHODS: frozenset[str] = frozenset({"wanda", "sparsegpt", "gptq", "owl"})
HESSIAN_METHODS: frozenset[str] = frozenset({"sparsegpt", "gptq"})
# The operators an owl allocation applies per layer.
OWL_OPERATORS: tuple[str, ...] = ("wanda", "sparsegpt", "magnitude")


def needs_hessian(method: "Method") -> bool:
  """Whether `method` needs the input Hessian (an owl allocation: its operator's need)."""
  if method.name == "owl":
    return method.kwargs["method"] in HESSIAN_METHODS
  return method.name in HESSIAN_METHODS


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
  if name == "owl":
    _check_owl(a)
  if name == "llm_int8" and not (math.isfinite(a["threshold"]) and a["threshold"] > 0):
    raise DtmError(f"llm_int8 outlier threshold must be a finite number > 0 (|x| >= threshold "
                   f"marks an outlier feature; the paper uses 6.0), got {a['threshold']}; for "
                   f"no decomposition use w8a8")


def _check_owl(a: dict[str, Any]) -> None:
  if not (math.isfinite(a["rate"]) and 0.0 < a["rate"] < 1.0):
    raise DtmError(f"owl sparsity rate must be in (0, 1), got {a['rate']}")
  if a["method"] not in OWL_OPERATORS:
    raise DtmError(f"owl method must be one of {', '.join(OWL_OPERATORS)} (the operator "
                   f"applied per layer), got {a['method']!r}")
  if not (math.isfinite(a["lamda"]) and 0.0 <= a["lamda"] < 0.5):
    raise DtmError(f"owl lamda (half the spread of the per-layer rates) must be in [0, 0.5), "
                   f"got {a['lamda']}")
  if not (math.isfinite(a["m"]) and a["m"] > 0):
    raise DtmError(f"owl m (outlier threshold, a multiple of the layer's mean Wanda metric) "
                   f"must be > 0, got {a['m']}")


def _check_gptq_rtn(name: str, a: dict[str, Any]) -> None:
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
