"""`dyn.Filippov`: the exact mode for piecewise-linear networks, and its part in the
compiled solve (the driver's hook, `dynamics/_driver/_hooks.py`): the switching
functions as an exact trigger, the switch as an action, the mode's records, its stall
event, and the message a stalled run ends with."""

import warnings
from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._driver._actions import ACTION_ROOT_FINDER, AbstractAction, ActingSolver
from .._driver._controllers import LandOnEvent
from .._driver._hooks import AbstractNonsmooth, AbstractSwitchedField
from .._driver._terms import partitioned
from .._driver._triggers import AbstractExactTrigger
from .._models import MLP
from .._surfaces import Surfaces, data_term_index, is_piecewise_linear, pair_location
from .._validate import positive_int
from ..solvers._base import AbstractFlowSolver
from ._state import (
    AbstractModeEvent,
    FilippovOverflow,
    FilippovStall,
    FilippovZeno,
    Linearisation,
)
from ._switch import switch
from ._switching import Switching

# What a Filippov solve records at every save (`FilippovField.record`).
RECORDS = ("crossings", "sliding_entries", "sliding_exits", "sliding_overflow",
           "sliding_pairs")


class Filippov(AbstractNonsmooth):
    """Integrate a flow on a ReLU or LeakyReLU `dyn.MLP` exactly through its kinks:
    `simulate(..., nonsmooth=dyn.Filippov())`.

    The switching surfaces z_{n,i}(w) = 0 are the pre-activations of every hidden unit
    on every input of the loss (a data loss of `dyn.losses`, alone or plus penalties).
    Between crossings the activation pattern is frozen, so the solver sees a smooth
    field and keeps its order; a crossing is root-found on the step's dense output and
    the solve restarts there; where both sides push into a surface the solution slides
    along it (Filippov's convex combination). See `dynamics/_filippov/_switching.py`.

    **Arguments:**

    - `max_sliding`: how many pairs may slide at once (the multiplier system's size
      K: a K-column Jacobian when the sliding set changes, a K×K matrix–vector
      product per chord iteration while pairs slide). A pair that would slide while all
      slots are taken would cross instead, which is not the Filippov solution: the run
      stops at the end of that step with the event `filippov_overflow`, a
      `FilippovWarning` and a message naming this argument
      (`monitors["sliding_overflow"]` counts them). 64 by
      default: the 5-7-6-3 net of the tests has up to ~8 pairs sliding at once, the
      64-32-32-10 digits MLP on 64 examples 16; 64 slots cost that run ~15% more than 16.
      For gradient flow on at least max(4K, 128) examples the system is evaluated on
      the K slots' examples instead of all of them (`_system.py`): fewer slots make
      each of its evaluations cheaper (N = 256 digits to t = 1: 33 s with 16 slots,
      41 s with 64).
    - `samples`: dense-output points per step at which the switching functions are
      checked; a pair that dips across and back between two samples is missed.
    - `zeno`: how many times in a row one pair may cross its surface, each crossing
      within 1e-2·max(1, |t|) of its last, before the run stops with the event
      `filippov_zeno` (`FilippovZeno`): an accumulation of crossings, which a
      second-order flow (heavy ball, Nesterov) makes where a surface pulls from both
      sides, and whose limit (sliding with z = ż = 0) the mode does not integrate.
      64 by default; raise it only for a genuine oscillation that fast.

    The trajectory gains the monitors `crossings`, `sliding_entries`, `sliding_exits`
    (cumulative counts), `sliding_pairs` (the flat indices of the sliding pairs at each
    save, -1 for an empty slot; `Filippov.pair(p, model, loss)` names a pair) and
    `sliding_overflow`. `dyn.monitors.ActiveFraction()` records the fraction of active
    pairs per hidden layer.

    A run the mode cannot continue exactly ends with an event, `success` False, a
    `FilippovWarning`, and (with `throw=True`) a `FilippovError` whose `trajectory`
    holds everything computed up to there: `filippov_overflow` (above),
    `filippov_stall` (switches that no longer advance time, `FilippovStall`) and
    `filippov_zeno` (above).
    """

    max_sliding: int = eqx.field(static=True)
    samples: int = eqx.field(static=True)
    zeno: int = eqx.field(static=True)

    def __init__(self, max_sliding: int = 64, samples: int = 4, zeno: int = 64):
        self.max_sliding = positive_int(max_sliding, "max_sliding", "Filippov")
        self.samples = positive_int(samples, "samples", "Filippov")
        self.zeno = positive_int(zeno, "zeno", "Filippov")

    @staticmethod
    def pair(p: int, model, loss) -> tuple[int, int, int]:
        """(hidden layer, example, unit) of the flat pair index `p` that the
        `sliding_pairs` monitor records, for `model` and `loss` of the run."""
        surfaces = Surfaces(loss, model)
        p = positive_int(p, "p", "Filippov.pair", low=0)
        if p >= surfaces.num_pairs:
            raise ValueError(f"Filippov.pair: `p` = {p} >= {surfaces.num_pairs} pairs.")
        return pair_location(surfaces, p)

    # -- the hook of the driver (`dynamics/_driver/_hooks.py`) ------------------------

    def check(self, *, params, loss, solver, controller, monitors) -> None:
        if not isinstance(params, MLP):
            raise ValueError(
                "`nonsmooth`: the Filippov mode reads its switching surfaces from a "
                "dyn.MLP with ReLU or LeakyReLU activations; `params` is a "
                f"{type(params).__name__}."
            )
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(eqx.filter(params, eqx.is_inexact_array))}
        if dtypes != {jnp.dtype("float64")}:
            # Refused rather than run: a float32 run of the 5-7-6-3 net of the tests
            # (Dopri5, rtol 1e-4) finished with success and 4 sliding entries where
            # float64 has 10, 2.0 away from the float64 solution.
            raise ValueError(
                "`nonsmooth`: the Filippov mode needs float64 parameters (got "
                f"{', '.join(sorted(str(d) for d in dtypes))}): in float32 its decisions "
                "between crossing and sliding are made on rounding noise and the run "
                "leaves the Filippov solution without a sign. Call "
                "jax.config.update('jax_enable_x64', True) before building the model."
            )
        if not is_piecewise_linear(params):
            raise ValueError(
                "`nonsmooth`: the Filippov mode is for piecewise-linear activations (ReLU, "
                f"LeakyReLU); {type(params.activation).__name__} is smooth, so its flow "
                "needs no switching: drop `nonsmooth`."
            )
        if data_term_index(loss) is None:
            raise ValueError(
                "`nonsmooth`: the switching surfaces are the pre-activations on the loss's "
                "inputs, which the package can only see in its own data losses: "
                "dyn.losses.mse, cross_entropy, exponential or logistic, alone or plus "
                f"dyn.losses.l2 / lp penalties; got {type(loss).__name__}."
            )
        if (not isinstance(solver, diffrax.AbstractAdaptiveSolver) or partitioned(solver)
                or isinstance(solver, AbstractFlowSolver)):
            raise ValueError(
                "`nonsmooth`: the crossings are root-found on the dense output of an "
                f"adaptive Runge–Kutta step; `solver` {type(solver).__name__} has none (or "
                "its own terms). Use diffrax.Tsit5(), Dopri5() or Dopri8()."
            )
        if not isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
            raise ValueError(
                "`nonsmooth`: steps must end at the crossings, which needs an adaptive "
                "`stepsize_controller` such as diffrax.PIDController(rtol=1e-8, atol=1e-8)."
            )

    def events(self):
        return (FilippovStall(), FilippovOverflow(), FilippovZeno(crossings=self.zeno))

    def record_names(self):
        return RECORDS

    def build(self, problem, first_order, w0):
        surfaces = Surfaces(problem.user_loss, problem.params(w0))
        switching = Switching(problem, surfaces, first_order, self.max_sliding)
        return FilippovField(switching, self.samples)

    def finish(self, traj, *, throw):
        for name in RECORDS:
            traj.monitors[name] = np.asarray(traj.monitors[name]).astype(int)
        overflow = int(traj.monitors["sliding_overflow"][-1])
        if traj.event == FilippovOverflow.name:
            what = (f"a pair had to slide while all max_sliding = {self.max_sliding} slots "
                    "were taken (crossing it instead would leave the Filippov solution)")
        elif traj.event == FilippovStall.name:
            what = (f"{FilippovStall.switches} switches within {FilippovStall.window:g} in "
                    f"t did not advance time ({overflow} sliding overflows in all, "
                    f"max_sliding = {self.max_sliding})")
        elif traj.event == FilippovZeno.name:
            what = (f"one pair crossed its surface {self.zeno} times in a row, each "
                    f"within {FilippovZeno.window:g}·max(1, |t|) of the last: the "
                    "crossings accumulate (Zeno), and beyond them the solution slides along "
                    "the surface with z = ż = 0, which the mode does not integrate")
        else:
            return traj
        if traj.event == FilippovZeno.name:
            remedy = ("end the run before this time, use a first-order flow (gradient "
                      "flow slides exactly in the mode) or a smooth activation, or, for a "
                      "genuine oscillation that fast, pass dyn.Filippov(zeno=...) larger.")
        else:
            remedy = "pass dyn.Filippov(max_sliding=...) with more slots."
        message = (f"simulate: the Filippov mode stopped at t = {traj.t_final:.6g}: {what}; "
                   + remedy)
        traj = eqx.tree_at(lambda t: (t.success, t.result), traj, (False, message))
        if throw:
            raise FilippovError(message + " The partial trajectory is the error's "
                                "`trajectory` (throw=False returns it).", traj)
        warnings.warn(message, FilippovWarning, stacklevel=3)
        return traj


class FilippovWarning(UserWarning):
    """A Filippov solve ended early (`filippov_overflow`, `filippov_stall` or
    `filippov_zeno`): the trajectory returned holds the run up to there, flagged
    `success=False`."""


class FilippovError(RuntimeError):
    """Raised by `simulate(..., throw=True)` when the Filippov mode ends a run early; the
    run up to there is kept on `trajectory` (a `Trajectory`, `success` False)."""

    def __init__(self, message: str, trajectory):
        super().__init__(message)
        self.trajectory = trajectory


class ChatteringWarning(UserWarning):
    """`simulate` on a ReLU or LeakyReLU `dyn.MLP` without `nonsmooth` rejected more than
    a third of its steps: the adaptive solver is chattering at the activation kinks.
    The remedy is `nonsmooth=dyn.Filippov()` (or a looser tolerance). A study that runs
    such a net at a loose tolerance on purpose can filter this class alone."""


# A run rejecting more than this fraction of its steps on a piecewise-linear network is
# chattering at kinks.
_CHATTER_FRACTION = 1.0 / 3.0


def warn_if_chattering(traj, params) -> None:
    """Warn when a run on a ReLU / LeakyReLU MLP rejected more than a third of its
    steps without `nonsmooth`: the adaptive solver is chattering at the kinks."""
    if not is_piecewise_linear(params):
        return
    steps = traj.stats.get("num_steps", 0)
    rejected = traj.stats.get("num_rejected_steps", 0)
    if steps and rejected / steps > _CHATTER_FRACTION:
        warnings.warn(
            f"simulate: {rejected} of {steps} steps ({100 * rejected / steps:.0f}%) were "
            f"rejected on a network with {type(params.activation).__name__} activations: "
            "the solver is chattering at the kinks of the loss (its gradient is "
            "discontinuous there). Pass nonsmooth=dyn.Filippov() to integrate through "
            "the kinks exactly, or loosen the tolerance.",
            ChatteringWarning,
            stacklevel=3,
        )


class FilippovField(AbstractSwitchedField):
    """The traced part of `Filippov`: the mode (`FilippovState`) in the solver state,
    the field of its piece, and the solver that switches it at the crossings."""

    switching: Switching
    samples: int = eqx.field(static=True)

    def init(self, t0, w0, v0):
        return self.switching.init(w0)

    def rate(self, t, w, v, mode, args):
        # inside a step, args is the step's Linearisation (FilippovTrigger.step_args)
        guess = args if isinstance(args, Linearisation) else None
        return self.switching.rate(t, w, v, mode, guess=guess)

    def wrap(self, solver, controller, unpack, pack, n_record, saves=None):
        trigger = FilippovTrigger(self.switching, unpack, self.samples)
        action = FilippovAction(self.switching, unpack, pack)
        solver = ActingSolver(solver, trigger, action, n_record, ACTION_ROOT_FINDER,
                              saves)
        return solver, LandOnEvent(controller, split=True, saves=saves)

    def record(self, mode):
        # The mode rides in the state, so every save sees it: cumulative event counts
        # and which pairs slide (their flat indices, -1 for a free slot). Floats here
        # (diffrax fills unreached saves with inf), integers on the Trajectory.
        c = mode.counts
        return {"crossings": c[0], "sliding_entries": c[1], "sliding_exits": c[2],
                "sliding_overflow": c[3], "sliding_pairs": mode.slots}

    def stops(self, event, mode):
        return event.reached(mode) if isinstance(event, AbstractModeEvent) else None

    def reset(self, t, w, v, mode):
        return self.switching.reset(w, mode)


class FilippovTrigger(AbstractExactTrigger):
    """The switching functions of `Switching`, on the solver state `y`."""

    switching: Switching
    unpack: Callable
    samples: int = eqx.field(static=True)

    def values(self, t, y, state, args=None):
        w, _, mode = self.unpack(y)
        return self.switching.values(t, w, mode, guess=args)

    def value(self, t, y, state, args, c):
        w, _, mode = self.unpack(y)
        return self.switching.value(t, w, mode, c, guess=args)

    def noise(self, y):
        # the band: 1000 ulps of the pre-activations' scale, the hysteresis of `values`
        return self.unpack(y)[2].band

    def step_args(self, t0, y0, aux, previous=None):
        w, _, mode = self.unpack(y0)
        return self.switching.linearise(t0, w, mode, previous)

    def here(self, args):
        return args.at_its_point()


class FilippovAction(AbstractAction):
    """At an event: switch the mode, then correct the state for the time t1 − t_c it
    spent on the old piece past the crossing (≤ 1e-6 of the step): y += (t1 − t_c)
    (f_new − f_old), exact to O((t1 − t_c)²)."""

    switching: Switching
    unpack: Callable
    pack: Callable
    corrects_itself: ClassVar[bool] = True  # it also processes pairs that crossed after t_c

    def __call__(self, t, y, aux):
        raise NotImplementedError("the Filippov action is only fired at located events")

    def at_event(self, t, y, aux, t_event, info, args=None):
        sw = self.switching
        w, v, mode = self.unpack(y)
        s = sw.multipliers(t, w, mode, args)  # args: the step's Linearisation
        phi = sw.values(t, w, mode, s)
        # The located component is processed even where its value at t (a margin past
        # the root, re-evaluated from the state with freshly solved multipliers) is
        # still >= 0 by rounding: skipped, an exit function would start the next step
        # negative and never fire (a pair slid on with its multiplier past 1 until the
        # next switch: 2.9e-5 on the 5-7-6-3 net at rtol 1e-10, with a fix inside).
        first = jnp.argmin(jnp.where(info, phi, jnp.inf))
        crossed = ((phi < 0) & info).at[first].set(info[first])
        new, s_new = switch(sw, t, w, v, mode, crossed, phi, args)
        new = FilippovStall.tick(t, mode, new)  # counts switches that make no progress
        f_old, f_new = sw.rate(t, w, v, mode, s), sw.rate(t, w, v, new, s_new)
        gap = jnp.maximum(t - t_event, 0.0)
        step = jax.tree.map(lambda a, b: gap * (b - a), f_old, f_new)
        if sw.first_order:
            w = jax.tree.map(jnp.add, w, step)
        else:
            w, v = jax.tree.map(jnp.add, (w, v), step)
        return self.pack(y, w, v, new), aux
