"""Monitors recorded inside the solve: `dyn.monitors.Loss()`, `Energy()`, ...

Each records under a name that is its class name in snake case (`GradNorm` ->
`grad_norm`), unless the user names it (`Function`, `ChargeLaw`, ...)."""

from .._deprecation import deprecated_names
from ._balance import Imbalance as Imbalance, LpqNorm as LpqNorm
from ._carrying import AbstractCarryingMonitor as AbstractCarryingMonitor
from ._charge_laws import (
    ChargeForcing as ChargeForcing,
    GDChargeDrift as GDChargeDrift,
    HeavyBallChargeDrift as HeavyBallChargeDrift,
)
from ._margin import (
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
from ._pattern import ActiveFraction as ActiveFraction
from ._spectrum import (
    AbstractSpectrumMonitor as AbstractSpectrumMonitor,
    Sharpness as Sharpness,
    SpectralDensity as SpectralDensity,
    TopEigenvalues as TopEigenvalues,
)
from ._stochastic import (
    AbstractMinibatchMonitor as AbstractMinibatchMonitor,
    ChargeGradientRate as ChargeGradientRate,
    ChargeNoiseRate as ChargeNoiseRate,
    SGDChargeDrift as SGDChargeDrift,
)
from ._symmetry import (
    AngularMomentum as AngularMomentum,
    ChargeLaw as ChargeLaw,
    EnergyLaw as EnergyLaw,
    LinearBalance as LinearBalance,
    NDBound as NDBound,
    RescalingResiduals as RescalingResiduals,
    SymmetryResidual as SymmetryResidual,
)

__getattr__ = deprecated_names("dynamics.monitors", {
    "ActivePattern": ("ActiveFraction", ActiveFraction),  # its record was `active_fraction`
})
