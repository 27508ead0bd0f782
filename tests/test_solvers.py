"""`LossCarryingEuler`: what `simulate` runs for Euler + a first-order flow + Loss.

The references are independent of the solver: the GD recursion written out by hand, and
the loss evaluated on the saved parameters afterwards.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn

ETA, STEPS = 0.1, 30
EULER = dict(t1=STEPS * ETA, dt0=ETA, solver=diffrax.Euler(),
             stepsize_controller=diffrax.ConstantStepSize())


class Counted(eqx.Module):
    """A loss that counts its forward evaluations at run time (not at trace time)."""

    calls: list = eqx.field(static=True)

    def __call__(self, w):
        jax.debug.callback(lambda: self.calls.append(1))
        return jnp.sum(jnp.log1p(jnp.exp(-w * jnp.arange(1.0, 4.0)))) + 0.1 * jnp.sum(w**4)


def gd(loss, w, steps):
    out = [w]
    for _ in range(steps):
        w = w - ETA * jax.grad(loss)(w)
        out.append(w)
    return np.stack(out)


@pytest.mark.parametrize("ts", [
    np.arange(STEPS + 1) * ETA,                         # every step end (k * dt, not t0 + T k/n)
    np.array([0.0, 0.05, 0.77, 1.5, 2.2999, STEPS * ETA]),  # mostly between steps
])
def test_matches_euler_and_the_loss_of_what_it_saves(ts):
    loss = Counted([])
    w0 = jnp.array([0.3, -0.2, 0.5])
    traj = dyn.simulate(dyn.GradientFlow(), w0, loss, ts=ts, monitors=(dyn.monitors.Loss(),),
                        **EULER)
    plain = dyn.simulate(dyn.GradientFlow(), w0, loss, ts=ts,
                         monitors=(dyn.monitors.GradNorm(),), **EULER)
    # Step times t0 + T k/n differ from k * dt by an ulp, hence not exactly 0.
    np.testing.assert_allclose(traj.params, plain.params, rtol=0, atol=1e-15)
    on_grid = np.isclose(ts / ETA, np.round(ts / ETA), rtol=0, atol=1e-9)
    expected = gd(loss, w0, STEPS)[np.round(ts / ETA).astype(int)[on_grid]]
    np.testing.assert_allclose(traj.params[on_grid], expected, rtol=1e-14)  # roundoff only
    direct = np.array([loss(w) for w in traj.params])
    np.testing.assert_allclose(traj.monitors["loss"], direct, rtol=1e-14)  # roundoff only


def test_one_evaluation_per_step():
    """n steps, the loss saved at each: n + 2 forward passes (L(w0), then one per
    value_and_grad at w0, ..., w_n), not n gradients plus n + 1 separate losses."""
    loss = Counted([])
    ts = np.arange(STEPS + 1) * ETA
    dyn.simulate(dyn.GradientFlow(), jnp.ones(3), loss, ts=ts,
                 monitors=(dyn.monitors.Loss(),), **EULER)  # compile, then count
    loss.calls.clear()
    traj = dyn.simulate(dyn.GradientFlow(), jnp.ones(3), loss, ts=ts,
                        monitors=(dyn.monitors.Loss(),), **EULER)
    assert traj.stats["num_steps"] == STEPS
    assert len(loss.calls) == STEPS + 2
    # Between step ends the loss is evaluated where it is asked: one more call each.
    loss.calls.clear()
    dyn.simulate(dyn.GradientFlow(), jnp.ones(3), loss, ts=ts[:-1] + ETA / 2,
                 monitors=(dyn.monitors.Loss(),), **EULER)
    assert len(loss.calls) == 2 * STEPS + 2


def test_mirror_flow_and_divergence():
    """A flow whose vector field is not −∇L, and a run that overflows."""
    loss = lambda w: jnp.sum((w - 2.0) ** 2)
    flow = dyn.MirrorFlow(lambda w: jnp.sum(w * jnp.log(w)))  # ẇ = −w ⊙ ∇L
    w0 = jnp.array([0.5, 1.0, 3.0])
    traj = dyn.simulate(flow, w0, loss, ts=np.arange(STEPS + 1) * ETA,
                        monitors=(dyn.monitors.Loss(),), **EULER)
    w, expected = np.asarray(w0), [np.asarray(w0)]
    for _ in range(STEPS):
        w = w - ETA * w * 2.0 * (w - 2.0)
        expected.append(w)
    np.testing.assert_allclose(traj.params, np.stack(expected), rtol=1e-13)  # roundoff only
    np.testing.assert_allclose(traj.monitors["loss"], [loss(w) for w in traj.params],
                               rtol=1e-13)
    # ẇ = w² overflows: stopped by the non-finite event with the loss saved until then.
    blow_up = dyn.simulate(dyn.GradientFlow(), jnp.array([1.0]), lambda w: -jnp.sum(w**3) / 3,
                           ts=np.arange(0.0, 50.0, 0.5), t1=50.0, dt0=0.5,
                           solver=diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize(),
                           monitors=(dyn.monitors.Loss(),))
    assert blow_up.diverged and blow_up.event == "non_finite"
    w = blow_up.params[:, 0]
    small = np.abs(w) < 1e100  # the cube of the last finite w's overflows already
    assert small.sum() > 5
    np.testing.assert_allclose(blow_up.monitors["loss"][small], -w[small] ** 3 / 3, rtol=1e-14)


def test_event_between_step_ends():
    """LossBelow stops inside a step: the state there is Euler's straight line, and the
    loss saved at the stop is L of that state (not a carried value)."""
    loss = lambda w: 0.5 * jnp.sum(w**2)
    traj = dyn.simulate(dyn.GradientFlow(), jnp.array([1.0, 2.0]), loss,
                        ts=np.arange(STEPS + 1) * ETA, monitors=(dyn.monitors.Loss(),),
                        events=(dyn.events.LossBelow(0.3),), **EULER)
    assert traj.event == "loss_below"
    # Euler on ẇ = −w: w_k = 0.9^k w0 at t_k = k/10, linear in between.
    k = int(traj.t_final / ETA)
    frac = traj.t_final / ETA - k
    w = (0.9**k + frac * (0.9 ** (k + 1) - 0.9**k)) * np.array([1.0, 2.0])
    assert 0 < frac < 1
    np.testing.assert_allclose(0.5 * np.sum(w**2), 0.3, rtol=1e-10)  # root-find tolerance
    np.testing.assert_allclose(traj.final_params, w, rtol=1e-12)  # roundoff only
    np.testing.assert_allclose(traj.monitors["loss"][-1], 0.5 * np.sum(w**2), rtol=1e-12)
    assert np.all(np.diff(traj.ts) > 0) and traj.ts[-1] == traj.t_final
