"""The diffrax terms of a run: the flow's field on the state laid out by `StateLayout`.

Most solvers get one `ODETerm` of the whole state: the flow's ẇ (or (ẇ, v̇)), the
integrands of integral monitors beside it, and zero for a nonsmooth mode's discrete
state. Three kinds of solver take other terms: partitioned (symplectic) solvers the
pair ẇ = v, v̇ = F(w); our `AbstractFlowSolver`s build their own from the flow; and
`LossCarryingEuler` a field that also returns the loss it evaluated. A stochastic flow
(`dyn.SME`) is one `ControlTerm` on the control (t, B_t) (`_noise.stochastic_term`).
"""

import diffrax
import jax
import jax.numpy as jnp

from .._flows import AbstractFirstOrderFlow
from .._problem import Problem
from ..solvers._base import AbstractFlowSolver
from ..solvers._loss_carrying import LossCarryingEuler
from ._hooks import AbstractSwitchedField
from ._layout import StateLayout
from ._noise import AbstractStochasticFlow, brownian_dtype, stochastic_term


def partitioned(solver: diffrax.AbstractSolver) -> bool:
    """Whether `solver` integrates ẇ = v, v̇ = F(w) as two terms (symplectic Euler, ...)."""
    return isinstance(solver.term_structure, tuple) and len(solver.term_structure) == 2


def make_terms(problem: Problem, solver: diffrax.AbstractSolver, layout: StateLayout,
               integrals: tuple, field: AbstractSwitchedField | None = None, y0=None,
               key=None):
    """The terms `solver` integrates. `integrals`: the integral monitors (their running
    integrals ride in the state); `field`: a nonsmooth mode's field, which replaces the
    flow's own and is what the integrands see (its `rate` in the current mode); `key`,
    `y0`: a stochastic flow's Brownian key and initial state (its dtype)."""
    flow = problem.flow
    if isinstance(flow, AbstractStochasticFlow):  # (prepare refused everything else)
        return stochastic_term(problem, key, brownian_dtype(y0))
    if isinstance(solver, AbstractFlowSolver):  # it needs more of the flow (e.g. κ1, κ2)
        # (its own state layout: integral monitors are refused for it in `prepare`)
        return solver.make_terms(flow, problem.loss)
    if isinstance(solver, LossCarryingEuler):
        def field_and_carried(t, y, _):  # shaped like y = (w, (L(w), ẇ or None))
            f, loss = flow.vector_field_and_loss(t, y[0], problem.loss)
            return f, (loss, f if solver.field else None)

        return diffrax.ODETerm(field_and_carried)
    if partitioned(solver):
        return (
            diffrax.ODETerm(lambda t, v, _: v),
            diffrax.ODETerm(lambda t, w, _: flow.acceleration(t, w, None, problem.loss)),
        )
    first_order = isinstance(flow, AbstractFirstOrderFlow)

    def rate(t, u, args):
        """(ẇ, v̇ or None) at the unpacked state u."""
        if field is not None:
            out = field.rate(t, u.w, u.v, u.mode, args)
        elif first_order:
            out = flow.vector_field(t, u.w, problem.loss)
        else:
            out = (u.v, flow.acceleration(t, u.w, u.v, problem.loss))
        return (out, None) if first_order else out

    def vector_field(t, y, args):
        u = layout.unpack(y)
        wdot, vdot = rate(t, u, args)
        ints = None
        if integrals:
            # dI/dt = g(t, w, ẇ): the running integrals ride along as state components.
            ints = {m.name: m.integrand(t, u.w, u.v, problem) for m in integrals}
        mode = None if u.mode is None else jax.tree.map(jnp.zeros_like, u.mode)
        return layout.pack(wdot, vdot, integrals=ints, mode=mode)

    return diffrax.ODETerm(vector_field)
