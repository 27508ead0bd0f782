"""The `dynamics` command line (also `python -m dynamics`).

    dynamics list                              the studies, one line each
    dynamics run NAME [--quick] [--out DIR]    run a study; figures go to DIR/figures,
                                               results to DIR/results

Studies live in the `studies` package, beside the library; they are imported by name
here, never by the library itself.
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamics",
        description="Neural-network training as a dynamical system: run the studies.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the available studies")
    run = commands.add_parser("run", help="run a study")
    run.add_argument("name", metavar="NAME", help="the study to run (see `dynamics list`)")
    run.add_argument(
        "--quick", action="store_true",
        help="short horizons and small data: a smoke test in seconds, not the real figures",
    )
    run.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR",
        help="where to write figures/ and results/ (default: the current directory)",
    )
    return parser


def _list() -> int:
    import studies

    entries = studies.available()
    width = max((len(name) for name in entries), default=0)
    for name, description in entries.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _error(message: str) -> int:
    print(f"dynamics: error: {message}", file=sys.stderr)
    return 2


def _check_out(out: Path) -> str | None:
    """Why a study could not write to `out` (DIR/figures and DIR/results, each created
    if missing), or None. Checked before the study runs: a study that found out at the
    end lost its results (a raw FileExistsError after 48 s of solving)."""
    # The first part of --out that exists must be a directory (the rest is created).
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return (f"--out {str(out)!r}: {str(existing)!r} is a file; give a directory (it is "
                "created if missing), e.g. --out results-dir.")
    for sub in ("figures", "results"):
        folder = out / sub
        if folder.exists() and not folder.is_dir():
            return (f"--out {str(out)!r}: {str(folder)!r} is a file, where the study writes "
                    f"its {sub}; move it away or give another --out.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            return (f"--out {str(out)!r}: cannot write to {str(folder)!r} "
                    f"({exc.strerror or exc}); give a writable directory.")
    return None


def _run(name: str, out: Path, quick: bool) -> int:
    import studies

    # `saul_minnorm` and `saul-minnorm` are the same study (studies.load says so).
    if name.replace("_", "-") not in studies.available():
        valid = ", ".join(studies.available()) or "(none)"
        return _error(f"unknown study {name!r}; valid studies are: {valid}.")
    problem = _check_out(out)
    if problem is not None:
        return _error(problem)
    import jax

    # Studies integrate to tolerances near 1e-10, which float32 cannot reach. Set before
    # the study is imported: arrays a module builds at import take the dtype of that moment.
    jax.config.update("jax_enable_x64", True)
    module = studies.load(name)
    print(f"running {name}{' (quick)' if quick else ''} -> {out}", flush=True)
    start = time.perf_counter()
    written = module.run(out=out, quick=quick)
    elapsed = time.perf_counter() - start
    print(f"wrote ({elapsed:.1f} s):")
    for path in (written or {}).values():
        print(f"  {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default `sys.argv[1:]`); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already reported
        return e.code if isinstance(e.code, int) else 2
    if args.command == "list":
        return _list()
    return _run(args.name, args.out, args.quick)


if __name__ == "__main__":
    sys.exit(main())
