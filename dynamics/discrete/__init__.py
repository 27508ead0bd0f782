"""Discrete optimizers on the flow's time axis: `dyn.discrete.run(dyn.discrete.GD(0.1), ...)`.

Each algorithm knows its continuous counterpart (`alg.flow`) and time map
(`alg.time_step`), so `dyn.gap` can measure how far the iterates stray from the flow.
"""

from ..monitors._charge_laws import (
    ChargeForcing as ChargeForcing,
    GDChargeDrift as GDChargeDrift,
    HeavyBallChargeDrift as HeavyBallChargeDrift,
)
from ..symmetries._laws import (
    charge_closed_form as charge_closed_form,
    charge_start as charge_start,
    gd_charge_drift as gd_charge_drift,
    heavy_ball_charge_drift as heavy_ball_charge_drift,
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
from ._nmgd import NMGD as NMGD
from ._run import edge_of_stability as edge_of_stability, run as run
