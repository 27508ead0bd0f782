"""Input validation shared by every public entry point.

One place for the checks a new user's mistakes hit, so that every entry point answers
the same mistake with the same ValueError (naming the argument and the fix):

- `as_tuple`: a single object or a sequence of them (`monitors=Loss()` is accepted);
- `prng_key`: a JAX PRNG key, or an int seed (converted with `jax.random.key`);
  `prng_keys`: one key, or a batch of keys (one per path of a stochastic run);
- `real`, `positive_int`: Python numbers, `bool` rejected (`max_steps=True` is a bug);
- `traced_scalar`, `float_array`: a user number stored as an array, so that jit traces
  it instead of hashing it and a new value (an event threshold, a reference time, a
  flow's coefficient) does not compile the solve again; `finite_nonnegative` checks
  such an array where it is concrete;
- `one_of`: a choice among named options;
- `dtype_eps`, `check_tolerance`: tolerances that follow the floating dtype in force;
  `check_tolerances`: a step-size controller's rtol and atol.
"""

import math
import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._tree import is_concrete


def _where(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def class_hint(value: Any, cls: type | tuple[type, ...]) -> str:
    """" (did you mean Loss()?)" when `value` is a subclass of `cls` given uninstantiated,
    the commonest slip with Equinox-style APIs; else ""."""
    if isinstance(value, type) and issubclass(value, cls):
        return f" (did you mean {value.__name__}()?)"
    return ""


def as_tuple(value: Any, name: str, cls: type | tuple[type, ...], example: str,
             owner: str | None = None) -> tuple:
    """`value` as a tuple of `cls` instances: one instance is wrapped, a list, tuple or
    other iterable is checked element by element, anything else is a ValueError."""
    if isinstance(value, cls):
        return (value,)
    if isinstance(value, str | bytes | dict) or not hasattr(value, "__iter__"):
        raise ValueError(
            f"{_where(owner)}`{name}` must be one object or a list/tuple of them, e.g. "
            f"{name}=({example},), got {value!r}{class_hint(value, cls)}."
        )
    value = tuple(value)  # a list, a tuple, a generator
    for item in value:
        if not isinstance(item, cls):
            raise ValueError(
                f"{_where(owner)}`{name}` must hold objects such as {example}, got "
                f"{item!r}{class_hint(item, cls)}."
            )
    return tuple(value)


def prng_key(key: Any, owner: str, name: str = "key"):
    """A JAX PRNG key. An int seed is accepted and converted with `jax.random.key`
    (`MLP(..., key=0)` is the same as `key=jax.random.key(0)`)."""
    fix = f"pass {name}=jax.random.key(0) (or an int seed, {name}=0)"
    if key is None:
        raise ValueError(f"{_where(owner)}a PRNG key is required; {fix}.")
    if isinstance(key, bool):
        raise ValueError(f"{_where(owner)}`{name}` must be a PRNG key, got {key!r}; {fix}.")
    if isinstance(key, numbers.Integral):
        if not 0 <= int(key) < 2**32:
            raise ValueError(
                f"{_where(owner)}an int seed `{name}` must lie in [0, 2**32), got {key!r}."
            )
        return jax.random.key(int(key))
    if isinstance(key, jax.Array | np.ndarray):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        # A legacy raw key, jax.random.PRNGKey(0): uint32 of shape (2,).
        if key.dtype == jnp.uint32 and key.shape == (2,):
            return key
        if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
            return prng_key(int(key), owner, name)
    raise ValueError(
        f"{_where(owner)}`{name}` must be one PRNG key (jax.random.key(seed)) or an int "
        f"seed, got {type(key).__name__} {getattr(key, 'shape', '')}; {fix}."
    )


def prng_keys(key: Any, owner: str, name: str = "key") -> tuple[Any, bool]:
    """(key, False) for one PRNG key or int seed (as `prng_key`), (keys, True) for a
    1-D batch of typed keys, `jax.random.split(key, m)`, one per path."""
    if (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            and key.ndim == 1):
        if key.shape[0] < 1:
            raise ValueError(f"{_where(owner)}`{name}` is an empty batch of keys; give "
                             "at least one, e.g. jax.random.split(jax.random.key(0), 100).")
        return key, True
    if isinstance(key, jax.Array | np.ndarray) and np.ndim(key) == 2:
        raise ValueError(
            f"{_where(owner)}`{name}`: a batch of raw uint32 keys is ambiguous; pass typed "
            "keys, jax.random.split(jax.random.key(seed), paths)."
        )
    return prng_key(key, owner, name), False


def real(value: Any, name: str, owner: str | None = None, *, low: float | None = None,
         strict: bool = False, high: float | None = None) -> float:
    """A finite Python float (a 0-d array is accepted, a bool is not). With `low`, also
    value > low (`strict`) or value >= low; with `high`, also value < high."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{_where(owner)}`{name}` must be a real number, got {value!r}.")
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        if np.ndim(value) != 0 or not is_concrete(value):
            raise ValueError(
                f"{_where(owner)}`{name}` must be a real number, got an array of shape "
                f"{np.shape(value)}."
            )
        if jnp.iscomplexobj(value) or jnp.issubdtype(value.dtype, jnp.bool_):
            raise ValueError(
                f"{_where(owner)}`{name}` must be a real number, got dtype {value.dtype}."
            )
        value = float(value)
    elif not isinstance(value, numbers.Real):
        raise ValueError(
            f"{_where(owner)}`{name}` must be a real number, got {type(value).__name__} "
            f"{value!r}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_where(owner)}`{name}` must be finite, got {value!r}.")
    too_low = low is not None and (value <= low if strict else value < low)
    if too_low or (high is not None and value >= high):
        bound = "" if low is None else (f"> {low:g}" if strict else f">= {low:g}")
        if high is not None:
            bound = f"{bound} and < {high:g}" if bound else f"< {high:g}"
        raise ValueError(f"{_where(owner)}`{name}` must be {bound}, got {value!r}.")
    return value


def positive_int(value: Any, name: str, owner: str | None = None, low: int = 1,
                 high: int | None = None) -> int:
    """An int >= `low` (and <= `high`, e.g. what an int32 counter holds); bools
    (`max_steps=True`) and floats (`n=10.0`) are rejected."""
    if (isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral)
            or value < low):
        raise ValueError(f"{_where(owner)}`{name}` must be an int >= {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(
            f"{_where(owner)}`{name}` must be at most {high} (the int32 counter that holds "
            f"it), got {value!r}."
        )
    return int(value)


def traced_scalar(value: Any, name: str, owner: str | None = None, *,
                  low: float | None = None, strict: bool = False,
                  high: float | None = None) -> Array:
    """A user number as a 0-d float64 NumPy array, checked like `real`.

    Stored this way in a module, the number is a leaf that jit traces rather than a
    static value it hashes, so a new threshold or reference time reuses the compiled
    solve. NumPy float64 rather than jnp (as `_float_array` in the flows): the
    precision is the one in force when the solve runs, not when the object was built.
    A traced value (a vmapped sweep) passes through unchecked.
    """
    if not is_concrete(value):
        return value
    return np.asarray(real(value, name, owner, low=low, strict=strict, high=high),
                      dtype=np.float64)


def float_array(x: Any) -> Array:
    """A numeric coefficient as an array, not a Python float: jit then traces it instead
    of hashing it, so a sweep over γ or κ compiles once. NumPy float64 rather than jnp:
    the precision is then the one in force when the solve runs, not when the object was
    built. Traced values (a vmapped sweep) pass through."""
    if not is_concrete(x):
        return x
    return np.asarray(x, dtype=np.float64)


def finite_nonnegative(value: Any, name: str, owner: str | None = None) -> None:
    """A ValueError unless `value` (an array) is finite and >= 0 where it is concrete;
    traced values (a sweep under vmap) pass."""
    if is_concrete(value):
        arr = np.asarray(value)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"{_where(owner)}`{name}` must be finite and >= 0, got {value}.")


def one_of(value: Any, name: str, options: tuple, owner: str | None = None,
           meaning: str = "") -> Any:
    """`value` if it is one of `options`, else a ValueError listing them (and what they
    mean, when given)."""
    if isinstance(value, str | int | float | bool | type(None)) and value in options:
        return value
    said = f" ({meaning})" if meaning else ""
    raise ValueError(f"{_where(owner)}`{name}` must be one of {options}{said}, got {value!r}.")


def dtype_eps(dtype: Any = None) -> float:
    """Machine epsilon of `dtype` (default: JAX's default float dtype, float32 unless
    `jax_enable_x64` is set)."""
    return float(jnp.finfo(jnp.result_type(float) if dtype is None else dtype).eps)


def check_tolerance(rtol: Any, dtype: Any) -> None:
    """Warn when a relative tolerance below the resolution of `dtype` is asked for: the
    controller then rejects steps for rounding errors it cannot remove, and the run is
    slow or stops at max_steps. Python's warning registry shows it once per value."""
    if rtol is None or not is_concrete(rtol):
        return
    rtol = float(np.min(np.asarray(rtol)))
    eps = dtype_eps(dtype)
    if 0 < rtol < eps:  # (rtol = 0: absolute control alone, by atol)
        warnings.warn(
            f"rtol = {rtol:g} is below the resolution of {jnp.dtype(dtype).name} "
            f"(eps = {eps:.3g}); it cannot be met. Use rtol >= {10 * eps:.1g}, or turn "
            "on float64 with jax.config.update('jax_enable_x64', True).",
            UserWarning,
            stacklevel=3,
        )


def check_tolerances(controller: Any, dtype: Any, name: str = "stepsize_controller") -> None:
    """A ValueError unless the `rtol` and `atol` of `controller` (where it has them, as
    diffrax's `PIDController` does) are finite and >= 0, and not both 0: a negative or
    infinite tolerance makes every error estimate pass (a wrong answer in a few steps).
    Then `check_tolerance`'s warning for an rtol below the resolution of `dtype`."""
    values = {}
    for attr in ("rtol", "atol"):
        value = getattr(controller, attr, None)
        if value is None or not is_concrete(value):
            continue
        try:
            arr = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            arr = np.asarray(np.nan)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(
                f"`{name}.{attr}` must be a finite number >= 0 (rtol or atol > 0), got "
                f"{value!r}; tolerances are small positive numbers such as 1e-6."
            )
        values[attr] = arr
    if len(values) == 2 and not (np.any(values["rtol"] > 0) or np.any(values["atol"] > 0)):
        raise ValueError(
            f"`{name}`: rtol and atol are both 0, which no step can meet; give rtol > 0 "
            "(e.g. 1e-6), atol > 0, or both."
        )
    check_tolerance(values.get("rtol"), dtype)
