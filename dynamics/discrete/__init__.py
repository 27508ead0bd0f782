"""Discrete optimizers on the flow's time axis: `dyn.discrete.run(dyn.discrete.GD(0.1), ...)`;
minibatch SGD with a key: `dyn.discrete.run(dyn.discrete.SGD(0.1, 16), ..., key=key)`.

Each algorithm knows its continuous counterpart (`alg.flow`) and time map
(`alg.time_step`), so `dyn.gap` can measure how far the iterates stray from the flow.
"""

from .._sampling import batch_factor as batch_factor, draw_batch as draw_batch
from ..monitors._charge_laws import (
    ChargeForcing as ChargeForcing,
    GDChargeDrift as GDChargeDrift,
    HeavyBallChargeDrift as HeavyBallChargeDrift,
)
from ..monitors._stochastic import SGDChargeDrift as SGDChargeDrift
from ..symmetries._laws import (
    charge_closed_form as charge_closed_form,
    charge_start as charge_start,
    gd_charge_drift as gd_charge_drift,
    heavy_ball_charge_drift as heavy_ball_charge_drift,
    nesterov_charge_drift as nesterov_charge_drift,
)
from ._algorithms import (
    GD as GD,
    NAGD as NAGD,
    AbstractDiscreteAlgorithm as AbstractDiscreteAlgorithm,
    AbstractFirstOrderAlgorithm as AbstractFirstOrderAlgorithm,
    ExponentiatedGD as ExponentiatedGD,
    HeavyBall as HeavyBall,
    Leapfrog as Leapfrog,
    NesterovMomentum as NesterovMomentum,
    State as State,
)
from ._checks import edge_of_stability as edge_of_stability
from ._minibatch import Minibatches as Minibatches
from ._nmgd import NMGD as NMGD
from ._run import run as run
from ._sgd import (
    SGD as SGD,
    SVAG as SVAG,
    AbstractStochasticAlgorithm as AbstractStochasticAlgorithm,
    HeavyBallSGD as HeavyBallSGD,
    NesterovSGD as NesterovSGD,
    StochasticState as StochasticState,
)
