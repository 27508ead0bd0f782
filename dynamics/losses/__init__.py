"""Losses and penalties: `dyn.losses.cross_entropy(data)`, `dyn.losses.l2(lam)`, ..."""

from ._losses import (
    AbstractDataLoss as AbstractDataLoss,
    AbstractLoss as AbstractLoss,
    CrossEntropy as CrossEntropy,
    ExponentialLoss as ExponentialLoss,
    L2Penalty as L2Penalty,
    LogisticLoss as LogisticLoss,
    LpPenalty as LpPenalty,
    MeanSquaredError as MeanSquaredError,
    RotationalToy as RotationalToy,
    Sum as Sum,
    cross_entropy as cross_entropy,
    exponential as exponential,
    l2 as l2,
    logistic as logistic,
    lp as lp,
    mse as mse,
    rotational_toy as rotational_toy,
    total as total,
)
from ._per_example import (
    Penalized as Penalized,
    PerExample as PerExample,
    as_data_loss as as_data_loss,
)
