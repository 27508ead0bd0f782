"""The computations of the `integrators` study (`studies/integrators.py` describes it):
work-precision runs, references, the energy and charge runs."""

import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

import dynamics as dyn
from dynamics import datasets, losses
from dynamics._convergence import MAX_INTERVAL_WIDTH, asymptotic_range, fit_power_law

REF_TOL = 1e-12
# On ReLU a plain adaptive reference does not finish: Dopri8 chatters on the kinks'
# sliding surfaces (even the quick 64-8-10 net hit 100 000 steps at rtol 1e-9). The
# reference there is the Filippov mode (exact through kinks and sliding), or in quick
# mode Dopri8 at a fixed step T/REF_STEPS_RELU (error O(h) at each kink); either way its
# own error is stored as `reference_error` and drawn on the figure: below it nothing is
# measured.
REF_STEPS_RELU = 4096
FULL = {"widths": (64, 16, 10), "examples": 256, "t1_gf": 2.0,
        "tolerances": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10],
        "dts_gf": [0.2, 0.1, 0.05, 0.025, 0.0125],
        "dts_toy": [0.1, 0.05, 0.025, 0.0125, 0.00625],
        "energy_T": 2000.0, "charge_dts": [0.1, 0.05, 0.025, 0.0125], "all": True,
        "relu_reference": "filippov", "max_steps": 5000}
# Quick: one fixed-step and one adaptive method per panel (each method compiles once;
# compilation is most of a quick run). Five settings each: a slope needs three points in
# the asymptotic regime, and the coarsest are not (three gave Tsit5 "slope -15.1").
QUICK = {"widths": (64, 8, 10), "examples": 32, "t1_gf": 1.0,
         "tolerances": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7],
         "dts_gf": [0.2, 0.1, 0.05, 0.025, 0.0125],
         "dts_toy": [0.1, 0.05, 0.025, 0.0125, 0.00625], "energy_T": 200.0,
         "charge_dts": [0.1, 0.05], "all": False, "relu_reference": "fixed",
         "max_steps": 20_000}
# Legends and notes on the figures: never below this (pt).
H_ENERGY = 0.05
TOY_W0, TOY_V0, TOY_T = jnp.array([0.5, 0.5, 0.5]), jnp.array([-2.0, 1.0, 1.0]), 10.0


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def _runge_kutta(cfg) -> dict:
    """name -> solver: fixed-step ones first (swept over dts), then adaptive."""
    if not cfg["all"]:
        return {"Heun": diffrax.Heun(), "Tsit5": diffrax.Tsit5()}
    return {"Euler": diffrax.Euler(), "Heun": diffrax.Heun(), "Midpoint": diffrax.Midpoint(),
            "Ralston": diffrax.Ralston(), "Bosh3": diffrax.Bosh3(), "Tsit5": diffrax.Tsit5(),
            "Dopri5": diffrax.Dopri5(), "Dopri8": diffrax.Dopri8()}


def error_floor(ds) -> float:
    """The error below which nothing is measured: the reference's own (estimated) error,
    and never below 1e-13."""
    err = float(ds.attrs.get("reference_error", np.nan))
    return max(err, 1e-13) if np.isfinite(err) else 1e-13


def slope(ds, name) -> float:
    """log-log slope of error against gradient evaluations (−p for a method of order p
    on a smooth problem, at fixed or adaptive steps: error ∝ n^−p), fitted over the
    asymptotic regime only (`dyn.convergence_order`'s rule, cost in place of 1/dt):
    above the reference's error, below 0.1 (an error of the order of the solution
    itself is pre-asymptotic: Euler's three runs on the toy, errors 3–60, gave −2.1),
    and falling by √2 or more from each setting to the next. NaN, and no slope on the
    figure, unless three or more points qualify and their interval is narrower than
    convergence_order's bound (three quick Tsit5 points once printed "slope −15.1")."""
    row = ds.sel(solver=name)
    e, n = np.asarray(row["error"]), np.asarray(row["grad_evals"])
    ok = np.isfinite(e) & np.isfinite(n) & (n > 0)
    order = np.argsort(n[ok], kind="stable")
    e, n = e[ok][order], n[ok][order]
    # a setting that costs no more than the previous one says nothing about the slope
    keep = np.append(True, np.diff(n) > 0)
    e, n = e[keep], n[keep]
    used = asymptotic_range(e, error_floor(ds), len(e), ceiling=0.1)
    if used.sum() < 3:
        return np.nan
    p, (low, high) = fit_power_law(1.0 / n[used], e[used])
    return -p if high - low <= MAX_INTERVAL_WIDTH else np.nan


def _work_precision(flow, params, loss, methods, cfg, dts, t1, reference_error=np.nan,
                    **kwargs) -> xr.Dataset:
    start = time.perf_counter()
    ds = dyn.work_precision(flow, params, loss, methods, t1=t1, tolerances=cfg["tolerances"],
                            dts=dts, repeats=1, progress=False, **kwargs)
    ds.attrs["reference_error"] = reference_error
    ds["slope"] = ("solver", [slope(ds, n) for n in ds.solver.values])
    _say(f"{ds.attrs['flow']} work-precision, {len(methods)} methods: "
         f"{time.perf_counter() - start:.1f} s")
    return ds


def wp_gf(cfg, activation) -> xr.Dataset:
    data = datasets.digits(cfg["examples"])
    model = dyn.MLP(cfg["widths"], activation, key=jax.random.key(0))
    loss = losses.cross_entropy(data)
    methods = _runge_kutta(cfg)
    relu = isinstance(activation, dyn.ReLU)
    if cfg["all"] and not relu:
        # Not on ReLU: their Newton iterations need a Jacobian of a field that jumps, and
        # a step of Kvaerno5 (a 1210 × 1210 Jacobian) costs what hundreds of explicit ones
        # do, so a step budget does not bound the run (measured: > 10 min at rtol 1e-3).
        methods.update({"Kvaerno5": diffrax.Kvaerno5(),
                        "GaussLegendre(2)": dyn.solvers.GaussLegendre(2)})
    if cfg["all"]:
        methods.update({f"scipy {m}": dyn.ScipyMethod(m) for m in ("RK45", "DOP853", "LSODA")})
    if cfg["all"] and relu:
        # The remedy beside the plain methods: the same tableaus in the exact piecewise-smooth
        # mode, which locates every kink and slides on it, so no step straddles a jump
        methods.update({f"{m} Filippov": dyn.NonsmoothMethod(methods[m], dyn.Filippov())
                        for m in ("Dopri5", "Dopri8")})
    t1 = cfg["t1_gf"]
    if relu and cfg["relu_reference"] == "filippov":
        ref, ref_error = _filippov_reference(model, loss, t1)
    elif relu:
        ref, ref_error = _fixed_reference(model, loss, t1)
    else:
        ref, ref_error = _reference(dyn.GradientFlow(), model, loss, t1)
    # a step budget: on ReLU plain adaptive solvers chatter at tight tolerances (those
    # runs are drawn as not finished)
    ds = _work_precision(dyn.GradientFlow(), model, loss, methods, cfg, cfg["dts_gf"], t1,
                         reference=ref, max_steps=cfg["max_steps"], reference_error=ref_error)
    ds.attrs.update(activation=type(activation).__name__, widths=str(cfg["widths"]),
                    examples=cfg["examples"], max_steps=cfg["max_steps"] or 0)
    if relu:
        ds.attrs["reference"] = (
            f"Filippov mode, Dopri8 rtol = atol = {REF_TOL:g}"
            if cfg["relu_reference"] == "filippov"
            else f"Dopri8 at fixed dt = T/{2 * REF_STEPS_RELU}; plain adaptive ones chatter")
    return ds


def _max_difference(a, b) -> float:
    """max |a − b| over every leaf of two parameter pytrees."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _fixed_reference(model, loss, t1):
    """Dopri8 at fixed steps t1/REF_STEPS_RELU, and its error estimated against half
    that step (the same compiled solve: the step size is traced)."""
    finals = []
    for n in (REF_STEPS_RELU, 2 * REF_STEPS_RELU):
        traj = dyn.simulate(dyn.GradientFlow(), model, loss, t1=t1, dt0=t1 / n,
                            solver=diffrax.Dopri8(), stepsize_controller=diffrax.ConstantStepSize(),
                            save_params=False, max_steps=None)
        finals.append(traj.final_params)
    error = _max_difference(*finals)
    _say(f"ReLU reference: Dopri8 at dt = t1/{2 * REF_STEPS_RELU}, error ~{error:.1e}")
    return (lambda _: finals[1]), error


def _filippov_reference(model, loss, t1):
    """Dopri8 at rtol = atol = 1e-12 in the Filippov mode, its error estimated against
    the same at 1e-10 (one compiled solve: the tolerances are traced)."""
    finals = []
    for tol in (1e-10, REF_TOL):
        start = time.perf_counter()
        traj = dyn.simulate(dyn.GradientFlow(), model, loss, t1=t1, solver=diffrax.Dopri8(),
                            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                            nonsmooth=dyn.Filippov(), save_params=False)
        finals.append(traj.final_params)
        _say(f"ReLU reference: Filippov mode, Dopri8 at {tol:.0e}: {traj.stats['num_steps']} "
             f"steps, {int(traj.monitors['crossings'][-1])} crossings, "
             f"{time.perf_counter() - start:.1f} s")
    error = _max_difference(*finals)
    _say(f"ReLU reference error ~{error:.1e} (1e-10 against 1e-12)")
    return (lambda _: finals[1]), error


def _reference(flow, params, loss, t1, v0=None):
    """Dopri8 at rtol = atol = 1e-12, and its error estimated against the same at 1e-10
    (one compiled solve: the tolerances are traced)."""
    finals = []
    for tol in (1e-10, REF_TOL):
        traj = dyn.simulate(flow, params, loss, t1=t1, v0=v0, solver=diffrax.Dopri8(),
                            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                            save_params=False)
        finals.append(traj.final_params if traj.final_velocity is None
                      else (traj.final_params, traj.final_velocity))
    return (lambda _: finals[1]), _max_difference(*finals)


def wp_toy(cfg) -> xr.Dataset:
    toy = losses.rotational_toy()
    methods = _runge_kutta(cfg)
    methods["VelocityVerlet"] = dyn.solvers.VelocityVerlet()
    if cfg["all"]:
        methods.update({"SemiImplicitEuler": diffrax.SemiImplicitEuler(),
                        "Yoshida4": dyn.solvers.Yoshida4()})
        methods.update({f"GaussLegendre({s})": dyn.solvers.GaussLegendre(s) for s in (1, 2, 3)})
        methods["Kvaerno5"] = diffrax.Kvaerno5()
        methods.update({f"scipy {m}": dyn.ScipyMethod(m) for m in ("RK45", "DOP853", "LSODA")})
    flow = dyn.NewtonianFlow()
    ref, ref_error = _reference(flow, TOY_W0, toy, TOY_T, TOY_V0)
    ds = _work_precision(flow, TOY_W0, toy, methods, cfg, cfg["dts_toy"], TOY_T, v0=TOY_V0,
                         reference=ref, monitors=(dyn.monitors.Energy(),),
                         reference_error=ref_error)
    return ds


def energy_runs(cfg) -> xr.Dataset:
    toy, T = losses.rotational_toy(), cfg["energy_T"]
    ts = jnp.linspace(0.0, T, 2001)
    methods = {"VelocityVerlet": dyn.solvers.VelocityVerlet(), "Heun": diffrax.Heun()}
    if cfg["all"]:
        methods.update({"Yoshida4": dyn.solvers.Yoshida4(), "Tsit5": diffrax.Tsit5()})
    out, t_final = {}, {}
    for name, solver in methods.items():
        traj = dyn.simulate(dyn.NewtonianFlow(), TOY_W0, toy, t1=T, v0=TOY_V0, solver=solver,
                            dt0=H_ENERGY, stepsize_controller=diffrax.ConstantStepSize(), ts=ts,
                            monitors=(dyn.monitors.Energy(),), save_params=False,
                            max_steps=None)
        e = np.asarray(traj.monitors["energy"])
        # A run whose energy blew up stops at the non-finite event (Heun at h = 0.05 does,
        # at t ≈ 287): NaN after its last save time
        err = np.full(len(ts), np.nan)
        err[: e.size] = np.abs(e - e[0])
        out[name], t_final[name] = err, float(traj.t_final)
    half = len(ts) // 2
    ds = xr.Dataset({"energy_error": (("solver", "time"), np.stack(list(out.values()))),
                     "t_final": ("solver", list(t_final.values()))},
                    coords={"solver": list(out), "time": np.asarray(ts)},
                    attrs={"h": H_ENERGY, "T": T})
    # Bounded means: no growth from the first half of the run to the second (inf: the
    # run did not last into the second half).
    ds["growth"] = ("solver", [float(np.nanmax(v[half:]) / np.nanmax(v[1:half]))
                               if np.isfinite(v[half:]).any() else np.inf
                               for v in out.values()])
    return ds


def charge_runs(cfg) -> xr.Dataset:
    data = datasets.digits(cfg["examples"])
    model = dyn.MLP(cfg["widths"], dyn.Polynomial(2), key=jax.random.key(1), init="lecun")
    loss = losses.cross_entropy(data)
    methods = _runge_kutta(cfg) if cfg["all"] else {"Heun": diffrax.Heun()}
    stages = (1, 2, 3) if cfg["all"] else (2,)
    # GaussLegendre's default stage solve: fixed-point iteration, and Newton–GMRES on the
    # steps where it stalls. This net passes a stiff transient near t = 0.1 (the Hessian's
    # top eigenvalue ~115 against ~15 at t = 0), where fixed-point iteration alone stops
    # contracting for h ≥ 0.025 (h·ρ(A)·115 ≥ 0.83; measured: runs stopped at t = 0.1 for
    # h = 0.1, 0.05, 0.025); Newton–GMRES on every step keeps the same drift but took
    # 0.6–1.9 s a run against 0.1–0.2 s with the fallback (s = 2, full net).
    methods.update({f"GaussLegendre({s})": dyn.solvers.GaussLegendre(s) for s in stages})
    dts = cfg["charge_dts"]
    # Q is read at the saves, t = 0, 0.1, ..., 1: every h divides 0.1, so each save is a
    # step end (between steps the Hermite dense output does not keep Q: at h = 0.2 it
    # showed drifts of 5e-3 under Gauss–Legendre whose steps kept Q to 2e-15)
    assert all(abs(0.1 / h - round(0.1 / h)) < 1e-9 for h in dts), dts
    drift = np.full((len(methods), len(dts)), np.nan)
    for i, (name, solver) in enumerate(methods.items()):
        for j, dt in enumerate(dts):
            traj = dyn.simulate(dyn.GradientFlow(), model, loss, t1=1.0, dt0=dt, solver=solver,
                                stepsize_controller=diffrax.ConstantStepSize(),
                                ts=jnp.linspace(0.0, 1.0, 11), save_params=False,
                                monitors=(dyn.monitors.RescalingCharges(),), throw=False)
            q = np.asarray(traj.monitors["rescaling_charges"])
            if traj.success and np.all(np.isfinite(q)):
                drift[i, j] = np.max(np.abs(q - q[0]))
    return xr.Dataset({"charge_drift": (("solver", "dt"), drift)},
                      coords={"solver": list(methods), "dt": np.asarray(dts)},
                      attrs={"flow": "GradientFlow", "activation": "Polynomial(2)",
                             "t1": 1.0, "widths": str(cfg["widths"])})
