"""`prepare`'s checks of the solver and step-size controller pair (and the default
controller), in Python before anything is traced."""

import diffrax
import jax.numpy as jnp
from diffrax._root_finder import use_stepsize_tol  # diffrax 0.7.2: not re-exported

from .._flows import AbstractSeparableFlow
from .._validate import check_tolerances, class_hint
from ._terms import partitioned

# The default controller: rtol = 1e-7 in float64; float32 resolves only ~1.2e-7, so
# there the default is 100 eps (~1e-5), with atol two decades below rtol as in float64.
_DEFAULT_RTOL = {8: (1e-7, 1e-9), 4: (1e-5, 1e-7), 2: (1e-2, 1e-4)}


def check_solver(flow, solver, stepsize_controller, dtype):
    """The solver (default Tsit5) and step-size controller (default a PID controller at
    the dtype's tolerances) of a run of `flow`, checked as a pair.

    **Returns:** `(solver, stepsize_controller)`.

    **Raises:** `ValueError`, naming `solver` or `stepsize_controller` and the fix: not
    a diffrax solver or controller, a partitioned solver for a non-separable flow, bad
    tolerances, an adaptive controller for a solver without an error estimate, an
    implicit solver whose root finder has no tolerances with constant steps."""
    solver = diffrax.Tsit5() if solver is None else solver
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(
            f"`solver` must be a diffrax solver, got "
            f"{solver!r}{class_hint(solver, diffrax.AbstractSolver)}."
        )
    if partitioned(solver) and not isinstance(flow, AbstractSeparableFlow):
        raise ValueError(
            f"`solver` {type(solver).__name__} integrates ẇ = v, v̇ = F(w) and needs a "
            f"force independent of the velocity; {type(flow).__name__} is not separable. "
            "Use dyn.NewtonianFlow() or a Runge–Kutta solver such as diffrax.Tsit5()."
        )
    if stepsize_controller is None:
        rtol, atol = _DEFAULT_RTOL[jnp.dtype(dtype).itemsize]
        stepsize_controller = diffrax.PIDController(rtol=rtol, atol=atol)
    if not isinstance(stepsize_controller, diffrax.AbstractStepSizeController):
        raise ValueError(
            f"`stepsize_controller` must be a diffrax step-size controller, got "
            f"{stepsize_controller!r}"
            f"{class_hint(stepsize_controller, diffrax.AbstractStepSizeController)}."
        )
    check_tolerances(stepsize_controller, dtype)
    adaptive = isinstance(stepsize_controller, diffrax.AbstractAdaptiveStepSizeController)
    if adaptive and not isinstance(solver, diffrax.AbstractAdaptiveSolver):
        raise ValueError(
            f"`solver` {type(solver).__name__} has no error estimate for the adaptive "
            "`stepsize_controller`; pass stepsize_controller=diffrax.ConstantStepSize() "
            "and a `dt0`, or an adaptive solver such as diffrax.Tsit5()."
        )
    unset = unset_root_tolerances(solver)
    if not adaptive and unset:
        # (diffeqsolve says so too, but not for a solver that a projection wraps)
        raise ValueError(
            f"`solver` {type(solver).__name__} is implicit and leaves its root finder's "
            f"{', '.join(unset)} to the step-size controller, which with constant steps "
            "has none: pass an adaptive stepsize_controller such as "
            "diffrax.PIDController(rtol=1e-8, atol=1e-8), or give the root finder its "
            "own, e.g. root_finder=diffrax.VeryChord(rtol=1e-10, atol=1e-10)."
        )
    return solver, stepsize_controller


def unset_root_tolerances(solver) -> tuple[str, ...]:
    """The root-finder tolerances (of "rtol", "atol", "norm") that an implicit `solver`
    leaves to the step-size controller (`use_stepsize_tol`, diffrax's default)."""
    if not isinstance(solver, diffrax.AbstractImplicitSolver):
        return ()
    return tuple(a for a in ("rtol", "atol", "norm")
                 if getattr(solver.root_finder, a) is use_stepsize_tol)
