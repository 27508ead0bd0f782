"""The `dynamics` command line (also `python -m dynamics`).

    dynamics list                              the studies, one line each
    dynamics run NAME [--quick] [--out DIR]    run a study; figures go to DIR/figures,
                                               results to DIR/results

Studies live in the `studies` package, beside the library; they are imported by name
here, never by the library itself.
"""

import argparse
import sys
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


def _run(name: str, out: Path, quick: bool) -> int:
    import studies

    if name not in studies.available():
        valid = ", ".join(studies.available()) or "(none)"
        print(f"dynamics: error: unknown study {name!r}; valid studies are: {valid}.",
              file=sys.stderr)
        return 2
    # The first part of --out that exists must be a directory (the rest is created).
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        print(f"dynamics: error: --out {str(out)!r}: {str(existing)!r} is a file; give a "
              "directory (it is created if missing), e.g. --out results-dir.",
              file=sys.stderr)
        return 2
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
