"""Method signatures: each compression method's arguments (names, types, defaults, positional
order) and their value checks; the method sets that need calibration or the Hessian.

`dtm.compress.spec.Method` normalizes its args through `normalize_args`; the grammar and
its documentation live in `dtm.compress.spec`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

from dtm.compress import gptq as gptq_lib
from dtm.errors import DtmError

GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")




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
SIGNATURES: dict[str, tuple[_Param, ...]] = {
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
METHOD_NAMES: tuple[str, ...] = tuple(SIGNATURES)

# Methods that take either (rate) or (n, m): positionally one argument is the rate, two
# are n and m.
RATE_OR_NM: tuple[str, ...] = ("wanda", "sparsegpt")
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


def signature_text(name: str) -> str:
  if name in RATE_OR_NM:
    extra = [f"{p.name}={p.default}" for p in SIGNATURES[name][3:]]
    return f"{name}(rate) or {name}(n, m)" + (f", optional {', '.join(extra)}" if extra else "")
  return f"{name}({', '.join(p.name for p in SIGNATURES[name])})"


def positional_names(name: str, count: int) -> tuple[str, ...]:
  """Argument names of `count` positional arguments of method `name`."""
  if name in RATE_OR_NM:
    return ("rate",) if count == 1 else ("n", "m")
  return tuple(p.name for p in SIGNATURES[name])


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
  if name in RATE_OR_NM:
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


def normalize_args(name: str, args: Any) -> tuple[tuple[str, Any], ...]:
  """Typed, defaulted, range-checked args as ((key, value), ...) in signature order."""
  if name not in SIGNATURES:
    raise DtmError(f"unknown compression method {name!r}; expected one of {', '.join(METHOD_NAMES)}")
  given = dict(args or ())
  params = SIGNATURES[name]
  unknown = sorted(set(given) - {p.name for p in params})
  if unknown:
    raise DtmError(f"{name}: unknown argument {unknown[0]!r}; signature is {signature_text(name)}")
  out: dict[str, Any] = {}
  for p in params:
    if p.name not in given:
      if p.required:
        raise DtmError(f"{name}: missing argument {p.name!r}; signature is {signature_text(name)}")
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
