"""Progress for long calls: a tqdm bar on a terminal, a few lines anywhere else.

tqdm redraws its bar with carriage returns; written to a pipe or a log file every
redraw is one more line (a stuck solve wrote ~5,000 lines of "0.00%"). `Progress`
therefore draws a bar only on a terminal (or in a notebook) and otherwise writes one
line when it starts, one at each quarter and one at the end, saying whether the work
finished. `SolveMeter` is the same for a diffrax solve (`simulate(progress=True)`): it
never shows 100% for a run that stopped short of t1.
"""

import sys
import threading
import time
from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

__all__ = ["Progress", "SolveMeter"]

# Fractions of the work at which a non-terminal gets a line.
_MILESTONES = (0.25, 0.5, 0.75)


def _interactive(file) -> bool:
    if "ipykernel" in sys.modules and file in (sys.stdout, sys.stderr):
        return True  # a notebook: tqdm.auto draws a widget
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


class Progress:
    """`total` units of work (cells, runs, steps) named `unit`, under the label `desc`.

    `update(n)` adds finished units, `set(done)` sets them (a solve's fraction of
    [t0, t1] with total=1), `close(ok)` ends: "done" when `ok` (with "k of n" when the
    work ended early by design, e.g. a rank that settled), "stopped at" otherwise.
    Disabled, it does nothing. Usable as a context manager (an exception closes it as
    stopped)."""

    def __init__(self, total: float, desc: str, *, unit: str = "", enabled: bool = True,
                 initial: float = 0, file=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = initial
        self.enabled = bool(enabled)
        self.file = sys.stderr if file is None else file
        self.start = time.perf_counter()
        self.closed = False
        self._bar = None
        self._next = 0
        if not self.enabled:
            return
        if _interactive(self.file):
            from tqdm.auto import tqdm

            fraction = "{desc}: {percentage:.1f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit or "it",
                             file=self.file, dynamic_ncols=True,
                             bar_format=fraction if self._fractional else None)
            return
        self._advance()
        if self._fractional:
            self._line("started")
            return
        before = f", {self._count(initial)} done before" if initial else ""
        self._line(f"started ({self._count(total)}{before})")

    @property
    def _fractional(self) -> bool:  # a fraction of the work (a solve), not units
        return self.total == 1 and not self.unit

    def _count(self, n) -> str:
        return f"{n:g} {self.unit}".strip()

    def _of(self, n) -> str:
        return f"{n:g} of {self._count(self.total)}"

    def _fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def _advance(self) -> None:
        while self._next < len(_MILESTONES) and self._fraction() >= _MILESTONES[self._next]:
            self._next += 1

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.file, flush=True)

    def set(self, done: float) -> None:
        if not self.enabled or self.closed:
            return
        done = min(max(done, 0), self.total)
        if self._bar is not None:
            self._bar.n = done if self.total != 1 else round(done, 4)
            self._bar.refresh()
            self.done = done
            return
        self.done = done
        crossed = self._next < len(_MILESTONES) and self._fraction() >= _MILESTONES[self._next]
        if crossed and self.done < self.total:
            self._advance()
            elapsed = time.perf_counter() - self.start
            eta = elapsed * (1 / self._fraction() - 1)
            of = "" if self._fractional else \
                f" ({self._of(done)})"
            self._line(f"{100 * self._fraction():.0f}%{of}, {_seconds(elapsed)}, "
                       f"about {_seconds(eta)} left")

    def update(self, n: float = 1) -> None:
        self.set(self.done + n)

    def close(self, ok: bool = True) -> None:
        if not self.enabled or self.closed:
            return
        self.closed = True
        if self._bar is not None:
            if not ok:
                self._bar.set_postfix_str("stopped")
            self._bar.close()
            return
        elapsed = _seconds(time.perf_counter() - self.start)
        if self._fractional:
            counts = ""
        elif ok and self.done >= self.total:
            counts = f"{self._count(self.total)}, "
        else:
            counts = f"{self._of(self.done)}, "
        if ok:
            self._line(f"done ({counts}{elapsed})")
        else:
            self._line(f"stopped at {100 * self._fraction():.3g}% ({counts}{elapsed})")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(ok=kind is None)


# Host side of `SolveMeter`: the open meters by index (a solve refers to its own by an
# integer, the only thing a callback can carry).
_meters: dict[int, Progress] = {}
_lock = threading.Lock()
_count = [0]


class _MeterState(eqx.Module):
    index: Any
    step: Any
    progress: Any


class SolveMeter(diffrax.AbstractProgressMeter):
    """diffrax's progress meter for `simulate(progress=True)`: a `Progress` over the
    fraction of [t0, t1] done, refreshed every `refresh_steps` steps. At the end it
    shows where the solve stopped: 100% only for a run that reached t1."""

    refresh_steps: int = 20
    desc: str = eqx.field(static=True, default="simulate")

    def init(self):
        desc = self.desc

        def _open():
            with _lock:
                _count[0] += 1
                _meters[_count[0]] = Progress(1, desc)
                return np.asarray(_count[0], dtype=np.int32)

        index = io_callback(_open, jax.ShapeDtypeStruct((), jnp.int32))
        return _MeterState(eqxi.nonbatchable(index), jnp.array(0), jnp.array(0.0))

    def step(self, state, progress):
        def _set(index, fraction):
            with _lock:
                meter = _meters.get(int(np.unique(index).item()))
            if meter is not None:
                meter.set(float(np.min(fraction)))
            return index

        due = eqxi.nonbatchable(eqxi.unvmap_max(state.step) % self.refresh_steps == 0)
        index = jax.lax.cond(
            due,
            lambda i: jax.pure_callback(_set, i, i, -eqxi.unvmap_max(-progress),
                                        vmap_method="expand_dims"),
            lambda i: i,
            state.index,
        )
        return _MeterState(index, state.step + 1, jnp.asarray(progress, state.progress.dtype))

    def close(self, state):
        def _close(index, fraction):
            with _lock:
                meter = _meters.pop(int(index), None)
            if meter is not None:
                fraction = float(fraction)
                meter.set(fraction)
                meter.close(ok=fraction >= 1.0)

        io_callback(_close, None, eqxi.unvmap_max(state.index),
                    -eqxi.unvmap_max(-state.progress))
