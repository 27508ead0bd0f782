"""Monitors recorded inside the solve: `dyn.monitors.Loss()`, `Energy()`, ..."""

from ._balance_monitors import Imbalance as Imbalance, LpqNorm as LpqNorm
from ._discrete._laws import (
    ChargeForcing as ChargeForcing,
    GDChargeDrift as GDChargeDrift,
    HeavyBallChargeDrift as HeavyBallChargeDrift,
)
from ._filippov import ActivePattern as ActivePattern
from ._margin_monitors import (
    Margin as Margin,
    NormProduct as NormProduct,
    NullSpaceComponent as NullSpaceComponent,
)
from ._monitors import (
    AbstractIntegralMonitor as AbstractIntegralMonitor,
    AbstractMonitor as AbstractMonitor,
    Energy as Energy,
    Function as Function,
    GradNorm as GradNorm,
    LayerNorms as LayerNorms,
    Loss as Loss,
    RescalingCharges as RescalingCharges,
)
from ._symmetry_monitors import (
    AngularMomentum as AngularMomentum,
    ChargeLaw as ChargeLaw,
    EnergyLaw as EnergyLaw,
    LinearBalance as LinearBalance,
    NDBound as NDBound,
    RescalingResiduals as RescalingResiduals,
    SymmetryResidual as SymmetryResidual,
)
