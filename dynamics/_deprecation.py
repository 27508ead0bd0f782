"""Old public names kept for one release after a rename, with a DeprecationWarning that
names the new one (a namespace's module-level `__getattr__`, PEP 562)."""

import warnings
from collections.abc import Callable
from typing import Any


def deprecated_names(namespace: str, renamed: dict[str, tuple[str, Any]]) -> Callable:
    """A module `__getattr__` that serves each old name in `renamed` (old -> (new name,
    object)) with a DeprecationWarning, and raises AttributeError for anything else."""

    def __getattr__(name: str) -> Any:
        if name in renamed:
            new, obj = renamed[name]
            warnings.warn(
                f"{namespace}.{name} is deprecated and will be removed in the next release; "
                f"use {namespace}.{new} (the same object).",
                DeprecationWarning,
                stacklevel=2,
            )
            return obj
        raise AttributeError(f"module {namespace!r} has no attribute {name!r}")

    return __getattr__
