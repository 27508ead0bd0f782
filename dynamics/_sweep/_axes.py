"""The axes of a sweep: checked, labelled for the Dataset, and each cell keyed."""

import hashlib
import inspect
import json
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import equinox as eqx
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


def cell_key(labels: dict) -> str:
    text = json.dumps(sorted(labels.items()), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]
