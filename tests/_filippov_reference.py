"""An independent reference for Filippov gradient flow on a one-hidden-unit ReLU
network f(x) = a·relu(w·x + b) + c (scalar input, scalar output, mean squared error),
written by hand in NumPy and integrated piece by piece with SciPy's DOP853.

On a piece the slopes d_n ∈ {0, 1} of the examples are fixed and the gradient is
  r_n = a d_n z_n + c − y_n,  z_n = w x_n + b,
  ∂L/∂w = mean(r_n a d_n x_n), ∂L/∂b = mean(r_n a d_n),
  ∂L/∂a = mean(r_n d_n z_n),   ∂L/∂c = mean(r_n).
Sliding on pair m (z_m = 0): Filippov's convex combination of the two sides' fields,
f = (1 − s) f_0 + s f_1 with s = ż_m(f_0) / (ż_m(f_0) − ż_m(f_1)), which keeps
ż_m = 0 (Filippov 1988, ch. 2 §4). Crossing: the new side's field carries z_m away.
"""

import jax
import numpy as np
from scipy.integrate import solve_ivp

import dynamics as dyn


def relu_network():
    """The 5-7-6-3 ReLU network with biases on 40 Gaussian inputs, teacher labels: the
    issue's network, shared by the mode's tests (not part of the reference)."""
    kx, km = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (40, 5))
    teacher = dyn.MLP((5, 7, 6, 3), activation=dyn.ReLU(), bias=True, key=jax.random.key(7))
    model = dyn.MLP((5, 7, 6, 3), activation=dyn.ReLU(), bias=True, key=km)
    return model, dyn.losses.mse(dyn.datasets.Dataset(x, jax.vmap(teacher)(x)))


def _grad(theta, x, y, d):
    w, b, a, c = theta
    z = w * x + b
    r = a * d * z + c - y
    return np.array([np.mean(r * a * d * x), np.mean(r * a * d), np.mean(r * d * z),
                     np.mean(r)])


def _zdot(field, x, m):
    return field[0] * x[m] + field[1]


def _field(theta, x, y, d, sliding):
    """−∇L on the piece d; with a sliding pair m, the Filippov combination."""
    if sliding is None:
        return -_grad(theta, x, y, d), None
    m = sliding
    d0, d1 = d.copy(), d.copy()
    d0[m], d1[m] = 0.0, 1.0
    f0, f1 = -_grad(theta, x, y, d0), -_grad(theta, x, y, d1)
    s = _zdot(f0, x, m) / (_zdot(f0, x, m) - _zdot(f1, x, m))
    return (1.0 - s) * f0 + s * f1, s


def filippov_reference(theta0, x, y, t1, rtol=1e-13, atol=1e-14):
    """(θ(t1), [(time, kind, pair)]) with kind 'cross', 'enter' or 'exit'."""
    theta = np.asarray(theta0, dtype=float)
    d = (theta[0] * x + theta[1] > 0).astype(float)
    sliding, t, events = None, 0.0, []
    while t < t1 and len(events) < 100:
        def rhs(_, th):
            return _field(th, x, y, d, sliding)[0]

        fns = []
        if sliding is None:
            for n in range(len(x)):
                fn = (lambda n: lambda _, th: th[0] * x[n] + th[1])(n)
                # Only crossings away from the pair's current side; a pair that just
                # left the surface (tangentially) may sit at z ≈ 0 for a while.
                fn.direction = -1.0 if d[n] > 0 else 1.0
                fn.terminal = True
                fns.append(fn)
        else:
            lo = lambda _, th: _field(th, x, y, d, sliding)[1]  # noqa: E731
            hi = lambda _, th: 1.0 - _field(th, x, y, d, sliding)[1]  # noqa: E731
            lo.terminal = hi.terminal = True
            lo.direction = hi.direction = -1.0
            fns = [lo, hi]
        # Events right at the start (the surface just left) are not events.
        sol = solve_ivp(rhs, (t, t1), theta, method="DOP853", rtol=rtol, atol=atol,
                        events=fns, first_step=None)
        theta, t = sol.y[:, -1], sol.t[-1]
        if sol.status != 1:
            break
        hit = [k for k, te in enumerate(sol.t_events) if te.size]
        k = hit[0]
        theta = sol.y_events[k][0]
        t = sol.t_events[k][0]
        if sliding is not None:
            d[sliding] = 0.0 if k == 0 else 1.0
            events.append((t, "exit", sliding))
            sliding = None
            t_restart = t
        else:
            m = k
            flipped = d.copy()
            flipped[m] = 1.0 - d[m]
            side = 1.0 if flipped[m] > 0 else -1.0
            if side * _zdot(-_grad(theta, x, y, flipped), x, m) > 0:
                d = flipped
                events.append((t, "cross", m))
            else:
                sliding = m
                events.append((t, "enter", m))
            t_restart = t
        # Step off the event time by a hair so the same root is not found again.
        theta = theta + 1e-15 * _field(theta, x, y, d, sliding)[0]
        t = t_restart + 1e-15
    return theta, events
