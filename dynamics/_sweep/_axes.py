"""The axes of a sweep: checked, labelled for the Dataset, and each cell keyed."""

import dataclasses
import enum
import functools
import hashlib
import inspect
import json
import math
import numbers
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np

# Axis names whose values must be > 0: tolerances and step sizes.
TOLERANCE_AXES = ("rtol", "atol", "tol", "tolerance")
STEP_AXES = ("dt", "dt0", "step_size", "lr", "learning_rate", "eta")


def label(value: Any) -> Any:
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return value
    if value is None:
        return "none"
    return type(value).__name__


def axis_labels(name: str, values: list) -> list:
    labels = [label(v) for v in values]
    if len(set(labels)) < len(labels):  # e.g. GaussLegendre(2) and GaussLegendre(3)
        labels = [eqx.tree_pformat(v, short_arrays=False) if not isinstance(lab, int | float)
                  else lab for v, lab in zip(values, labels, strict=True)]
    if len(set(labels)) < len(labels):
        raise ValueError(f"axis `{name}` repeats a value ({values!r}); give distinct values.")
    kinds = {type(lab) for lab in labels}
    if len(kinds) > 1 and kinds != {int, float}:  # one dtype per coordinate
        labels = [str(lab) for lab in labels]
    return labels


def check_axes(run_fn: Callable, axes: Mapping[str, Iterable]) -> dict[str, list]:
    if not callable(run_fn):
        raise ValueError(f"`run_fn` must be a function of the axis values, got {run_fn!r}.")
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError(
            "`axes` must be a non-empty dict axis name -> values, e.g. "
            "{'seed': range(8), 'rtol': [1e-4, 1e-6]}."
        )
    try:
        params = inspect.signature(run_fn).parameters
    except (TypeError, ValueError):  # builtins, some callables: trust the user
        params = None
    named = []
    if params is not None:
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = [n for n, p in params.items() if p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        for name in axes:
            if not var_kw and name not in named:
                raise ValueError(
                    f"unknown axis name {name!r}: `run_fn` accepts {named}; name the axes "
                    "after its arguments (or give it **kwargs)."
                )
        missing = [n for n in named if n not in axes
                   and params[n].default is inspect.Parameter.empty]
        if missing:
            raise ValueError(
                f"`run_fn` needs {missing} but `axes` has no such axis; add one, or bind the "
                "argument with functools.partial."
            )
    out = {}
    for name, values in axes.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"axis names must be identifiers, got {name!r}.")
        if name in ("time", "cell") or name.startswith("sweep_"):
            raise ValueError(f"axis name {name!r} is reserved; accepted: any other identifier.")
        if isinstance(values, str | bytes) or not isinstance(values, Iterable):
            raise ValueError(
                f"axis {name!r} must be a list (or range, array) of values, got {values!r}."
            )
        values = list(values)
        if not values:
            raise ValueError(f"axis {name!r} is empty; give it at least one value.")
        if name in TOLERANCE_AXES + STEP_AXES:
            for v in values:
                ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0
                if not ok or not math.isfinite(v):
                    kind = "tolerances" if name in TOLERANCE_AXES else "step sizes"
                    raise ValueError(
                        f"axis {name!r} holds {v!r}; {kind} must be finite real numbers > 0."
                    )
        out[name] = values
    return out


def cell_key(keys: dict) -> str:
    """A cell's file key from its axes' value keys (`value_key`)."""
    text = json.dumps(sorted(keys.items()), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class Unkeyable(Exception):
    """A value with no identity that survives the process (a lambda, a local function,
    an object known only by its address)."""


def _qualified(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def _canonical(value: Any, seen: frozenset = frozenset()) -> Any:
    """`value` as plain JSON data that two processes build alike exactly when they
    hold the same value: the class and every field, arrays by dtype, shape and a hash
    of their bytes. Raises `Unkeyable` for what has no such form."""
    if isinstance(value, bool | np.bool_ | str) or value is None:
        return value if not isinstance(value, np.bool_) else bool(value)
    if isinstance(value, numbers.Integral):
        return ["int", int(value)]
    if isinstance(value, numbers.Real):
        return ["float", float(value).hex()]
    if isinstance(value, numbers.Complex):
        return ["complex", complex(value).real.hex(), complex(value).imag.hex()]
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype,
                                                                   jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        arr = np.ascontiguousarray(np.asarray(value))
        if arr.dtype == object:
            return ["objects", arr.shape, [_canonical(x, seen) for x in arr.ravel()]]
        return ["array", arr.dtype.str, list(arr.shape), hashlib.sha1(arr.tobytes()).hexdigest()]
    if id(value) in seen:
        raise Unkeyable(f"{type(value).__name__} refers to itself")
    seen = seen | {id(value)}
    if isinstance(value, list | tuple):
        return [type(value).__name__, [_canonical(x, seen) for x in value]]
    if isinstance(value, dict):
        return ["dict", sorted([json.dumps(_canonical(k, seen)), _canonical(v, seen)]
                               for k, v in value.items())]
    if isinstance(value, type):
        return ["type", _qualified(value)]
    if isinstance(value, enum.Enum):
        return ["enum", _qualified(type(value)), value.name]
    if isinstance(value, functools.partial):
        return ["partial", _canonical(value.func, seen), _canonical(value.args, seen),
                _canonical(value.keywords, seen)]
    if isinstance(value, types.MethodType):
        return ["method", _canonical(value.__self__, seen), value.__name__]
    if dataclasses.is_dataclass(value):  # every eqx.Module: class and all fields
        return ["object", _qualified(type(value)),
                {f.name: _canonical(getattr(value, f.name, None), seen)
                 for f in dataclasses.fields(value)}]
    if callable(value) and hasattr(value, "__qualname__"):
        name = value.__qualname__
        if "<lambda>" in name or "<locals>" in name:
            raise Unkeyable(f"{value!r} is a lambda or a local function")
        return ["function", _qualified(value)]
    text = repr(value)
    if " at 0x" in text:  # the default repr: an address, not a value
        raise Unkeyable(f"{text} is known only by its address")
    return ["repr", _qualified(type(value)), text]


def value_key(value: Any) -> str:
    """A key for one axis value that is the same in every process exactly when the
    value is: numbers and strings by their label (as earlier versions keyed them, so
    their cell files still resume), other objects by their class name and a hash of
    their fields (`rotational_toy(1.0)` and `rotational_toy(2.0)` differ).
    Raises `Unkeyable`."""
    lab = label(value)
    if isinstance(value, numbers.Real | str | np.bool_) or value is None:
        return lab
    text = json.dumps(_canonical(value), sort_keys=True)
    return f"{lab}#{hashlib.sha1(text.encode()).hexdigest()[:16]}"


def axis_keys(name: str, values: list) -> list[str]:
    """`value_key` of each value of axis `name`, or a ValueError naming the axis."""
    keys = []
    for v in values:
        try:
            keys.append(value_key(v))
        except Unkeyable as exc:
            raise ValueError(
                f"axis {name!r} holds a value that cannot be keyed for `out` ({exc}): a "
                "resumed sweep could not tell whether its cells were solved for this "
                "value. Sweep over names or numbers and build the object inside "
                "`run_fn` (e.g. {'width': [8, 16]}), or pass out=None."
            ) from None
    if len(set(keys)) < len(keys):
        raise ValueError(f"axis `{name}` repeats a value ({values!r}); give distinct values.")
    return keys
