"""Solvers around a diffrax solver: `WrappedSolver`, which reports what the wrapped one
is (its terms, orders, interpolation) and steps with it, and `TracedOnce`, the outermost
solver of every deterministic `simulate`, which has its step traced once per solve.

Diffrax traces a solver's step four times in one solve: once for the dense output's
structure, twice for the loop body's structure (`eqx.filter_eval_shape`, the second
because the first found the step's result traced), then the body itself. `TracedOnce`
steps through `eqx.filter_jit`, so the first trace's jaxpr is reused by the others
(JAX caches it by the function and the static parts; the compiled program is the same,
the call inlined). Measured: a 5-7-6-3 Filippov solve's tracing and lowering 2.2-2.5 ->
1.3-1.5 s; a small MLP's Tsit5 solve 0.89 -> 0.67 s. `ActingSolver` (`_actions`) is a
`WrappedSolver` too. A wrapper hides the solver's class from `diffeqsolve`, which reads
it in two places: an implicit solver's root-finder tolerances (`_solve` fills them in
before wrapping) and the SDE checks (stochastic flows are not wrapped).
"""

import diffrax
import equinox as eqx


class WrappedSolver(diffrax.AbstractAdaptiveSolver):
    """A solver around `solver`: its term structure, orders, interpolation, first
    derivative, state and step are the wrapped solver's unless a subclass says
    otherwise."""

    solver: eqx.AbstractVar[diffrax.AbstractSolver]

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        return self.solver.step(terms, t0, t1, y0, args, solver_state, made_jump)


class TracedOnce(WrappedSolver):
    """`solver`, whose step is traced once per solve (see the module docstring)."""

    solver: diffrax.AbstractSolver

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        return _step(self.solver, terms, t0, t1, y0, args, solver_state, made_jump)


@eqx.filter_jit
def _step(solver, terms, t0, t1, y0, args, solver_state, made_jump):
    return solver.step(terms, t0, t1, y0, args, solver_state, made_jump)
