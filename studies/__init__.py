"""Studies: one module per study, each with `run(out: Path, quick: bool = False)`.

The registry is the package itself: every public module here (name not starting with
"_") is a study, described by the first line of its docstring. Listing reads the
docstrings without importing the modules (no JAX start-up for `dynamics list`); a
study is imported only when it is run. To add a study, add a module; nothing else.
A study's name is its module name with "_" written "-" (`saul_minnorm.py` is
`dynamics run saul-minnorm`); either spelling loads.
"""

import ast
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

__all__ = ["available", "load"]

_HERE = Path(__file__).parent


def _describe(path: Path) -> str:
    """The docstring's first paragraph on one line (its first line alone cut two
    descriptions mid-sentence)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    if not doc:
        return "(no description)"
    return " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())


def available() -> dict[str, str]:
    """Study name -> one-line description, sorted by name."""
    out = {}
    for info in sorted(pkgutil.iter_modules([str(_HERE)]), key=lambda i: i.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        out[info.name.replace("_", "-")] = _describe(_HERE / f"{info.name}.py")
    return out


def load(name: str) -> ModuleType:
    """Import the study `name`; ValueError naming the valid studies if there is none."""
    studies = available()
    name = name.replace("_", "-") if isinstance(name, str) else name
    if name not in studies:
        valid = ", ".join(studies) or "(none)"
        raise ValueError(f"unknown study {name!r}; valid studies are: {valid}.")
    module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
    if not callable(getattr(module, "run", None)):
        raise ValueError(f"study {name!r} has no run(out, quick) function.")
    return module
