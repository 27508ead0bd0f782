"""Stochastic flows in the driver: their checks (`check_stochastic`) and their one
diffrax term (`stochastic_term`).

The term is a single `ControlTerm` on the control (t, B_t) ∈ R × R^n, whose vector
field at w is the linear map (dt, dB) ↦ f(t, w) dt + G(t, w) dB (`flow.increment`,
a `lineax.FunctionLinearOperator`, never a matrix). Drift and noise as one term share
one pass through the network per Euler–Maruyama step; as `MultiTerm(ODETerm,
ControlTerm)` they cost two forward and backward passes (up to 1.7x a hand-written
loop on the 64-16-10 digits MLP; XLA did not merge them). B is an
`UnsafeBrownianPath`: an independent normal increment per step, drawn from the key and
the step's two end times, so fixed steps only and no differentiation through the solve
(what `simulate` does anyway); a `VirtualBrownianTree` regenerates each increment
through a tree of splits and cost 2-3.4x.
"""

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx

from .._flows import AbstractFlow
from .._flows._stochastic import AbstractStochasticFlow
from .._problem import Problem
from .._sampling import check_batch_size
from .._validate import prng_key
from ..losses._per_example import as_data_loss, check_example_losses
from ..monitors._monitors import AbstractIntegralMonitor


class TimeAndBrownian(diffrax.AbstractPath):
    """The control (t, B_t): its increment over [t0, t1] is (t1 − t0, B_{t1} − B_{t0})."""

    brownian: diffrax.AbstractBrownianPath

    @property
    def t0(self):
        return self.brownian.t0

    @property
    def t1(self):
        return self.brownian.t1

    def evaluate(self, t0, t1=None, left=True):
        if t1 is None:
            return (t0, self.brownian.evaluate(t0, left=left))
        return (t1 - t0, self.brownian.evaluate(t0, t1, left=left))


def stochastic_term(problem: Problem, key, dtype) -> diffrax.ControlTerm:
    """The one term of a stochastic flow's solve, with B on R^n from `key`."""
    flow = problem.flow
    data = as_data_loss(problem.user_loss, "simulate")
    n = data.num_examples
    brownian = diffrax.UnsafeBrownianPath(shape=jax.ShapeDtypeStruct((n,), dtype), key=key)
    control = (jax.ShapeDtypeStruct((), dtype), jax.ShapeDtypeStruct((n,), dtype))

    def examples(w):
        return data.example_losses(problem.params(w))

    def vector_field(t, w, args):
        return lx.FunctionLinearOperator(
            lambda u: flow.increment(t, w, u[0], u[1], examples), control)

    return diffrax.ControlTerm(vector_field, TimeAndBrownian(brownian))


def stochastic_defaults(flow: AbstractFlow, solver, controller):
    """A stochastic flow's solver and controller: Euler–Maruyama at constant steps where
    left out (the deterministic defaults, Tsit5 with an adaptive controller, do not
    apply to an SDE), and nothing else. **Raises:** `ValueError` naming the argument."""
    if not isinstance(flow, AbstractStochasticFlow):
        return solver, controller
    name = type(flow).__name__
    solver = diffrax.Euler() if solver is None else solver
    controller = diffrax.ConstantStepSize() if controller is None else controller
    if type(solver) is not diffrax.Euler:
        raise ValueError(
            f"`solver` {type(solver).__name__}: {name} is an Itô SDE with multiplicative, "
            "non-commutative noise; pass diffrax.Euler() (Euler–Maruyama, weak order 1). "
            "Heun, midpoint and the other Runge–Kutta schemes converge to the Stratonovich "
            "solution, and diffrax's SRK solvers need additive or commutative noise; for "
            "weak order 2, extrapolate (dyn.weak_order does)."
        )
    if not isinstance(controller, (diffrax.ConstantStepSize, diffrax.StepTo)):
        raise ValueError(
            f"`stepsize_controller` {type(controller).__name__}: {name} is integrated at "
            "fixed steps (its Brownian increments are drawn per step); pass "
            "diffrax.ConstantStepSize() with a `dt0`, or diffrax.StepTo(ts)."
        )
    return solver, controller


def check_stochastic(flow, key, params, loss, monitors, projection, nonsmooth):
    """The key of a stochastic flow's solve (None for a deterministic flow), after
    checking what an SDE solve needs besides its solver (`stochastic_defaults`).
    **Raises:** `ValueError` naming the argument."""
    if not isinstance(flow, AbstractStochasticFlow):
        if key is not None:
            raise ValueError(
                f"`key` drives the Brownian motion of a stochastic flow (dyn.SME); "
                f"{type(flow).__name__} is deterministic: drop `key`."
            )
        return None
    name = type(flow).__name__
    key = prng_key(key, "simulate")
    data = as_data_loss(loss, f"simulate with {name}")
    check_example_losses(data, params, f"simulate with {name}")
    check_batch_size(getattr(flow, "batch_size", 1), data.num_examples, name)
    if any(isinstance(m, AbstractIntegralMonitor) for m in monitors):
        raise ValueError(
            f"`monitors`: integral monitors ride in the state as ODEs, which {name}'s "
            "stochastic term does not integrate; drop them or record the integrand."
        )
    if projection is not None or nonsmooth is not None:
        raise ValueError(
            f"{name}: `projection` and `nonsmooth` act on deterministic solves only; "
            "drop them for a stochastic flow."
        )
    return key


def brownian_dtype(y0):
    """The Brownian motion's dtype: that of the parameters."""
    return jnp.result_type(*jax.tree.leaves(y0))
