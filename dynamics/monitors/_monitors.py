"""Monitors: quantities recorded at the save times, computed inside the solve.

Each monitor is evaluated by diffrax's `SaveAt(fn=...)` at every save time, so a run
keeps only what is monitored, not the parameters of every step (unless asked to). A
monitor that carries state from one save to the next is an `AbstractCarryingMonitor`
(`_carrying.py`), evaluated after the solve by a scan over the saved states.
"""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._problem import Problem
from .._tree import leaves, sqnorm
from ..symmetries._charges import rescaling


class AbstractMonitor(eqx.Module):
    """A quantity m(t, w, ẇ) recorded along a trajectory under the key `name`.

    On a first-order flow `v` is None and a monitor that needs ẇ evaluates the flow's
    field itself. One that sets `reads_velocity = True` accepts ẇ as `v` there too: then
    where `simulate` already has ẇ at a save (fixed-step Euler with a save at a step end:
    the step's own evaluation, see `LossCarryingEuler`) it passes it, and the monitor
    costs no gradient of its own."""

    name: eqx.AbstractVar[str]
    reads_velocity: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, t, w: PyTree, v: PyTree | None, problem: Problem) -> Array:
        """Evaluate on the dynamic parameters `w` (and velocity `v` or None)."""

    def coords(self, params: PyTree) -> dict[str, np.ndarray]:
        """Coordinates of the recorded value's first axis (after time), by name, for the
        full model `params`: `Trajectory.to_xarray` puts them on `<name>_dim1`, so that a
        reader can tell its entries apart (default: none)."""
        return {}


class AbstractIntegralMonitor(AbstractMonitor):
    """A monitor that needs a running integral I(t) = ∫_{t0}^t g(s, w, ẇ) ds.

    `simulate` carries I as an extra component of the solver state, integrated by the
    same solver at the same tolerance as the flow (so I is as accurate as w), and
    records `value(t, w, v, problem, I)` at the save times. Charge laws in integrated
    form use this, e.g. for Nesterov t³⟨w, Aẇ⟩ − ∫ t³⟨ẇ, Aẇ⟩ dt is constant.
    """

    @abc.abstractmethod
    def integrand(self, t, w: PyTree, v: PyTree | None, problem: Problem) -> PyTree:
        """g(t, w, ẇ): a pytree of arrays (the integral has the same structure)."""

    @abc.abstractmethod
    def value(self, t, w: PyTree, v: PyTree | None, problem: Problem,
              integral: PyTree) -> Array:
        """The recorded value, given the running integral I(t)."""

    def __call__(self, t, w, v, problem):
        raise TypeError(
            f"{type(self).__name__} needs its running integral; it is evaluated by "
            "`simulate`, which carries the integral in the solver state."
        )


class Loss(AbstractMonitor):
    """The loss L(w)."""

    name: ClassVar[str] = "loss"

    def __call__(self, t, w, v, problem):
        return problem.loss(w)


class Energy(AbstractMonitor):
    """The flow's energy-like quantity: L for first-order flows, ½‖ẇ‖² + L for the
    second-order entries (½κ2‖ẇ‖² + L for `GeneralFlow`, the Jacobi integral for
    `LagrangianFlow`); see each flow's `energy`."""

    name: ClassVar[str] = "energy"

    def __call__(self, t, w, v, problem):
        return problem.flow.energy(t, w, v, problem.loss)


class GradNorm(AbstractMonitor):
    """‖∇L(w)‖ (Euclidean norm over all parameters)."""

    name: ClassVar[str] = "grad_norm"

    def __call__(self, t, w, v, problem):
        return jnp.sqrt(sqnorm(jax.grad(problem.loss)(w)))


def layer_arrays(params) -> list:
    """The weight matrices of an MLP-like model (anything with `weights`), else every
    array leaf in flattening order."""
    return list(params.weights) if hasattr(params, "weights") else leaves(params)


def layer_norms(params):
    """Frobenius norms ‖W_k‖ of `layer_arrays(params)`, stacked."""
    return jnp.stack([jnp.sqrt(jnp.sum(a**2)) for a in layer_arrays(params)])


class LayerNorms(AbstractMonitor):
    """Frobenius norms ‖W_k‖ of each weight matrix of an MLP (one entry per layer);
    for any other pytree, the norm of each array leaf in flattening order."""

    name: ClassVar[str] = "layer_norms"

    def __call__(self, t, w, v, problem):
        return layer_norms(problem.params(w))


class Function(AbstractMonitor):
    """A user monitor: `fn(t, params, velocity) -> array`, on the full model pytree.
    For first-order flows the velocity is ẇ = f(t, w) from the vector field (XLA drops
    that evaluation when `fn` does not use it)."""

    fn: Callable
    name: str = "function"

    def __check_init__(self):
        if not callable(self.fn):
            hint = (f" (did you mean Function(fn, name={self.fn!r})?)"
                    if isinstance(self.fn, str) else "")
            raise ValueError(
                f"Function: `fn` must be a function (t, params, velocity) -> array, got "
                f"{self.fn!r}{hint}."
            )
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Function: `name` must be a non-empty string, got {self.name!r}.")

    def __call__(self, t, w, v, problem):
        if v is None:
            v = problem.flow.vector_field(t, w, problem.loss)
        return jnp.asarray(self.fn(t, problem.params(w), problem.params(v)))


class RescalingCharges(AbstractMonitor):
    """Per-neuron rescaling charges of an MLP (`dyn.charges.rescaling`), concatenated
    over hidden layers: conserved by gradient flow, driven by ⟨ẇ, Aẇ⟩ otherwise."""

    name: ClassVar[str] = "rescaling_charges"

    def __call__(self, t, w, v, problem):
        return jnp.concatenate(rescaling(problem.params(w)))

    def coords(self, params):
        """`layer` (1 for the first hidden layer, between W_1 and W_2) and `unit` (the
        neuron's index in its layer) of each charge."""
        sizes = [s.shape[0] for s in eqx.filter_eval_shape(rescaling, params)]
        return {"layer": np.concatenate([np.full(n, k + 1) for k, n in enumerate(sizes)]),
                "unit": np.concatenate([np.arange(n) for n in sizes])}
