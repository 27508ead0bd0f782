"""The weak order from Monte Carlo gaps: a weighted fit of log|e| on log η with a paired
bootstrap interval over paths.

`dyn.fit_order` (an OLS Student-t interval) is for deterministic gaps: it ignores the
Monte Carlo error and, with common random numbers, the correlation between step sizes.
Here, per observable, with e_p(η) the per-path estimates (paths × step sizes):

- the fit weights each step size by (ē/se)² (the delta method: se(log|ē|) = se/|ē|);
- model "power", log|e| = a + p log η; if its χ² has a p-value below 0.05 with four or
  more step sizes (precise data resolve the next term of the expansion), the fit keeps
  that term, log|e| = a + p log η + c η ("power+linear"), and p is the asymptotic order
  (in the sgd-sme study's full run, 10,000 paths, E[Q] against gradient flow and SME-1
  needed it: docs/guides/sgd-sme.md);
- the interval is the percentile interval of p over bootstrap resamples of the paths,
  the same paths at every step size (paired: it carries the cross-η correlation);
- a resample in which some ē changes sign is a "flip": the gap there is not resolved
  from the noise. With more than 2.5% flips no order is reported (NaN), and
  `paths_needed` estimates the paths that would resolve every gap at 3σ.
"""

import numpy as np

# Flips allowed before the order is refused: the resamples' sign changes estimate how
# often the smallest gap's sign is wrong; 2.5% is one tail of the 95% interval.
MAX_FLIP_FRACTION = 0.025
# Resamples per batch of the bootstrap (memory: batch × paths × step sizes floats).
_BATCH = 50


def _design(h, linear):
    cols = [np.ones_like(h), np.log(h)] + ([h] if linear else [])
    return np.stack(cols, 1)


def _wls(h, e, weights, linear):
    x = _design(h, linear)
    y = np.log(np.abs(e))
    beta = np.linalg.solve(x.T @ (weights[:, None] * x), x.T @ (weights * y))
    return beta, float(np.sum(weights * (y - x @ beta) ** 2))


def fit_weak_order(h, estimates, *, confidence=0.95, resamples=1000, seed=0) -> dict:
    """The order of E[e](η) from per-path estimates `estimates` (paths × len(h)).

    **Returns:** dict(order, low, high, chi2, dof, p_value, model, flips, resolved,
    paths_needed, mean, se)."""
    import scipy.stats

    h = np.asarray(h, float)
    a = np.asarray(estimates, float)
    m = a.shape[0]
    mean, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(m)
    out = {"mean": mean, "se": se}
    # Paths that would resolve every gap at 3σ: se shrinks as 1/√M.
    ratio = np.max(3.0 * se / np.maximum(np.abs(mean), 1e-300))
    out["paths_needed"] = int(np.ceil(m * max(ratio, 1.0) ** 2)) if ratio > 1 else m
    if np.any(se <= 0) or np.any(mean == 0):
        return {**out, "order": np.nan, "low": np.nan, "high": np.nan, "chi2": np.nan,
                "dof": 0, "p_value": np.nan, "model": "none", "flips": resamples,
                "resolved": False}
    weights = (mean / se) ** 2
    beta, chi2 = _wls(h, mean, weights, linear=False)
    dof = h.size - 2
    p_value = float(scipy.stats.chi2.sf(chi2, dof)) if dof > 0 else np.nan
    linear = h.size >= 4 and p_value < 0.05
    if linear:
        beta, chi2 = _wls(h, mean, weights, linear=True)
        dof = h.size - 3
        p_value = float(scipy.stats.chi2.sf(chi2, dof)) if dof > 0 else np.nan
    rng = np.random.default_rng(seed)
    slopes, flips = [], 0
    for start in range(0, resamples, _BATCH):
        idx = rng.integers(0, m, (min(_BATCH, resamples - start), m))
        for mb in a[idx].mean(1):
            if np.any(np.sign(mb) != np.sign(mean)):
                flips += 1
                continue
            slopes.append(_wls(h, mb, weights, linear)[0][1])
    resolved = flips <= MAX_FLIP_FRACTION * resamples
    tail = 50.0 * (1.0 - confidence)
    low, high = (np.percentile(slopes, [tail, 100.0 - tail]) if resolved and slopes
                 else (np.nan, np.nan))
    return {**out, "order": float(beta[1]) if resolved else np.nan, "low": float(low),
            "high": float(high), "chi2": chi2, "dof": dof, "p_value": p_value,
            "model": "power+linear" if linear else "power", "flips": flips,
            "resolved": bool(resolved)}
