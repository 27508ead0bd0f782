"""Methods of `work_precision` from other libraries: `scipy.integrate.solve_ivp`
(`ScipyMethod`) and `torchdiffeq.odeint` (`TorchdiffeqMethod`). Both call the flow's
vector field as one jitted JAX function of the flat state from their own loops, as a
user of those libraries would write it, and count its evaluations themselves."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._flows import AbstractFirstOrderFlow
from .._problem import Problem
from .._tree import partition
from ._base import AbstractMethod, AbstractRunner, RunResult, WorkProblem

# A budget of `max_steps` steps is this many field evaluations (a DOP853 step).
EVALUATIONS_PER_STEP = 12


class _OverBudget(Exception):
    pass


class _FlatProblem:
    """The problem on one flat state vector: `y0`, `unravel`, the jitted `field(t, y)`,
    and the monitors evaluated on a sequence of flat states."""

    def __init__(self, p: WorkProblem):
        w, static = partition(p.params)
        self.problem = Problem(p.flow, p.loss, static)
        self.first_order = isinstance(p.flow, AbstractFirstOrderFlow)
        tree = w if self.first_order else (
            w, jax.tree.map(jnp.zeros_like, w) if p.v0 is None else partition(p.v0)[0])
        self.tree0 = tree
        flat0, self.unravel = ravel_pytree(tree)
        self.y0 = np.asarray(flat0)
        flow, problem, unravel, first_order = p.flow, self.problem, self.unravel, \
            self.first_order

        @jax.jit
        def field(t, y):
            y = unravel(y)
            if first_order:
                return ravel_pytree(flow.vector_field(t, y, problem.loss))[0]
            w, v = y
            return ravel_pytree((v, flow.acceleration(t, w, v, problem.loss)))[0]

        self.field = field
        self.p = p

    def monitors(self, ts, states) -> dict:
        out = {}
        for m in self.p.monitors:
            values = []
            for t, y in zip(ts, states, strict=True):
                y = self.unravel(jnp.asarray(y))
                w, v = (y, None) if self.first_order else y
                values.append(np.asarray(m(t, w, v, self.problem)))
            out[m.name] = np.stack(values)
        return out

    @property
    def budget(self) -> int | None:
        steps = self.p.max_steps
        return None if steps is None else EVALUATIONS_PER_STEP * steps


_SCIPY_METHODS = ("RK45", "DOP853", "LSODA", "RK23", "Radau", "BDF")


class ScipyMethod(AbstractMethod):
    """`scipy.integrate.solve_ivp` with `method` (RK45, DOP853, LSODA, ...) as a method of
    `work_precision`: the flow's vector field is one jitted JAX function on the flat
    state, called from SciPy's Python loop (what a user of solve_ivp would write).
    Adaptive only: swept over the tolerances."""

    method: str = eqx.field(static=True)

    def __check_init__(self):
        if self.method not in _SCIPY_METHODS:
            raise ValueError(
                f"ScipyMethod: `method` must be one of {_SCIPY_METHODS}, got {self.method!r}."
            )

    def runner(self, problem):
        return _ScipyRunner(_FlatProblem(problem), self.method)


class _ScipyRunner(AbstractRunner):
    def __init__(self, flat: _FlatProblem, method: str):
        self.flat, self.method, self.calls = flat, method, 0

    def _rhs(self, t, y):
        self.calls += 1
        budget = self.flat.budget
        if budget is not None and self.calls > budget:
            raise _OverBudget  # solve_ivp has no step limit of its own
        return np.asarray(self.flat.field(t, y))

    def __call__(self, kind, tol, with_monitors):
        from scipy.integrate import solve_ivp

        p, flat = self.flat.p, self.flat
        self.calls = 0
        try:
            sol = solve_ivp(self._rhs, (p.t0, p.t1), flat.y0, method=self.method, rtol=tol,
                            atol=tol, t_eval=p.ts)
        except _OverBudget:
            return RunResult(flat.y0 * np.nan, {}, False, self.calls)
        values = flat.monitors(sol.t, sol.y.T) if with_monitors and sol.success else {}
        return RunResult(sol.y[:, -1], values, bool(sol.success), int(sol.nfev))


_TORCHDIFFEQ_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class TorchdiffeqMethod(AbstractMethod):
    """`torchdiffeq.odeint` with an adaptive `method` (dopri5, dopri8, bosh3, fehlberg2,
    adaptive_heun) as a method of `work_precision`, swept over the tolerances.

    The state is the tuple of the flow state's array leaves (in `jax.tree.leaves`
    order) as float64 torch tensors, as a torchdiffeq user passes a model's parameters.
    `vector_field(t, state) -> tuple of tensors` is the right-hand side written in
    torch (e.g. `-torch.autograd.grad(loss, params)`); without it the flow's own JAX
    vector field is called through DLPack (no copies), which times torchdiffeq's
    stepping around the same evaluations `dynamics` makes. Needs torch and torchdiffeq
    (`pip install 'dynamics[bench]'`)."""

    method: str = eqx.field(static=True)
    vector_field: Callable | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.method not in _TORCHDIFFEQ_METHODS:
            raise ValueError(
                f"TorchdiffeqMethod: `method` must be one of {_TORCHDIFFEQ_METHODS} (the "
                f"adaptive ones), got {self.method!r}."
            )
        if self.vector_field is not None and not callable(self.vector_field):
            raise ValueError(
                "TorchdiffeqMethod: `vector_field` must be a function (t, state) -> tuple "
                f"of torch tensors, or None for the flow's own field; got {self.vector_field!r}."
            )

    def check(self, name, dts):
        try:
            import torch  # noqa: F401
            import torchdiffeq  # noqa: F401
        except ImportError:
            raise ValueError(
                f"`methods[{name!r}]` is a TorchdiffeqMethod but torch/torchdiffeq are "
                "not installed; pip install 'dynamics[bench]' (a pinned CPU torch), or "
                "leave that method out."
            ) from None

    def runner(self, problem):
        return _TorchRunner(_FlatProblem(problem), self)


class _TorchRunner(AbstractRunner):
    def __init__(self, flat: _FlatProblem, method: TorchdiffeqMethod):
        import torch

        self.flat, self.method, self.calls = flat, method, 0
        leaves = [np.asarray(x) for x in jax.tree.leaves(flat.tree0)]
        sizes = tuple(np.cumsum([x.size for x in leaves])[:-1])
        self.state0 = tuple(torch.tensor(x) for x in leaves)
        if method.vector_field is None:
            def vector_field(t, state):
                # DLPack both ways: torch tensors in, JAX's jitted field, torch tensors out.
                y = jnp.concatenate([jnp.from_dlpack(x.contiguous()).ravel() for x in state])
                out = torch.from_dlpack(flat.field(float(t), y))
                return tuple(p.reshape(x.shape) for p, x in
                             zip(torch.tensor_split(out, sizes), state, strict=True))

            self.vector_field = vector_field
        else:
            self.vector_field = method.vector_field

    def _counted(self, t, state):
        self.calls += 1
        budget = self.flat.budget
        if budget is not None and self.calls > budget:
            raise _OverBudget
        return self.vector_field(t, state)

    def __call__(self, kind, tol, with_monitors):
        import torch
        import torchdiffeq

        flat, ts = self.flat, self.flat.p.ts
        self.calls = 0
        with torch.no_grad():
            try:
                out = torchdiffeq.odeint(self._counted, self.state0, torch.as_tensor(ts),
                                         method=self.method.method, rtol=tol, atol=tol)
                ok = all(bool(torch.isfinite(x).all()) for x in out)
            except (AssertionError, RuntimeError, _OverBudget):  # "underflow in dt"
                return RunResult(flat.y0 * np.nan, {}, False, self.calls)
        states = np.concatenate([x.reshape(len(ts), -1).numpy() for x in out], axis=1)
        values = flat.monitors(ts, states) if with_monitors and ok else {}
        return RunResult(states[-1], values, ok, self.calls)
