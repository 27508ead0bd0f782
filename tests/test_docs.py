"""The documentation runs as written, and names every public object.

- Every ```python block of README.md and of docs/**/*.md runs, in order, one namespace
  per file (a later block sees the names an earlier one made), in a fresh temporary
  working directory, in float64 (conftest). A block is skipped when the line before it
  is an HTML comment `<!-- docs-test: skip (why) -->`: slow runs, or files a user gives.
  `CHECKS` adds assertions on a page's namespace where its text makes claims (the tour).
- Every name a public namespace exports (`from ._x import Y as Y` in `dynamics/__init__.py`
  and in each `dynamics/<namespace>`) has a `::: dynamics.<namespace>.Y` directive in
  docs/api/, so the API reference cannot forget a new name.
- README.md stays short (≤ 200 lines) and its relative links resolve.
"""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest

import dynamics

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP = "<!-- docs-test: skip"
_FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})(?P<info>[^`]*)$")


def code_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(first line number, code, skipped) of each ```python block of `path`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, ticks, info = m["indent"], m["ticks"], m["info"].strip()
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != f"{indent}{ticks}":
            end += 1
        if info.split(" ")[0] == "python":
            before = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
            code = "\n".join(s[len(indent):] for s in lines[i + 1:end])
            blocks.append((i + 2, code, before.startswith(SKIP)))
        i = end + 1
    return blocks


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


RUNNABLE = [p for p in _pages() if any(not skip for _, _, skip in code_blocks(p))]


def _check_tour(ns):
    # The README's claims about its tour: the loss falls, and gradient flow keeps the
    # rescaling charges of a ReLU net (rtol = atol = 1e-6 leaves ~3e-6, measured).
    traj = ns["traj"]
    assert traj.ts.shape == (11,) and traj.monitors["loss"][-1] < traj.monitors["loss"][0]
    q = traj.monitors["rescaling_charges"]
    np.testing.assert_allclose(q, np.broadcast_to(q[0], q.shape), atol=1e-4)


# What a page's code claims beyond running, checked on its namespace afterwards.
CHECKS = {"README.md": _check_tour}


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write results/ where they run
    namespace = {"__name__": "__docs__"}
    for line, code, skip in code_blocks(path):
        if not skip:
            # Padded so that a traceback names the line of the page.
            exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)
    check = CHECKS.get(str(path.relative_to(ROOT)))
    if check is not None:
        check(namespace)


def public_namespaces() -> list[str]:
    """`dynamics` and its public submodules (dynamics.monitors, dynamics.plot, ...)."""
    return ["dynamics"] + sorted(
        f"dynamics.{m.name}" for m in pkgutil.iter_modules(dynamics.__path__)
        if not m.name.startswith("_"))


def exported(module: str) -> list[str]:
    """The names `module` re-exports explicitly (`from ._x import Y as Y`), namespaces
    themselves (`from . import losses as losses`) left out."""
    mod = importlib.import_module(module)
    tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and not (node.level == 1 and node.module is None):
            names += [a.name for a in node.names if a.asname == a.name]
    return names


def documented() -> set[str]:
    found = set()
    for page in DOCS.joinpath("api").rglob("*.md"):
        found |= set(re.findall(r"^::: *([\w.]+) *$", page.read_text(encoding="utf-8"), re.M))
    return found


def test_api_reference_covers_every_public_name():
    have = documented()
    missing = [f"{ns}.{name}" for ns in public_namespaces() for name in exported(ns)
               if f"{ns}.{name}" not in have]
    assert not missing, f"add a `::: name` directive to a page of docs/api/ for {missing}"


def test_api_reference_names_exist():
    # mkdocs build --strict fails on these too; this says so without building the site.
    broken = []
    for path in sorted(documented()):
        module, _, name = path.rpartition(".")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            broken.append(path)
    assert not broken, f"docs/api/ documents names that do not exist: {broken}"


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md: keep it to 200 lines; the rest goes to docs/"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files {missing}"
