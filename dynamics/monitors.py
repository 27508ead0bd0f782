"""Monitors recorded inside the solve: `dyn.monitors.Loss()`, `Energy()`, ..."""

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
    SymmetryResidual as SymmetryResidual,
)
