"""dynamics: neural-network training as a dynamical system.

A study pairs an Equinox model with a flow from the Lagrangian catalogue, integrates it
with Diffrax (with events) through `simulate`, and records monitors along the way.
"""

import importlib.metadata

from . import (
    balance as balance,
    charges as charges,
    datasets as datasets,
    discrete as discrete,
    events as events,
    losses as losses,
    monitors as monitors,
    regularizers as regularizers,
    solvers as solvers,
    symmetries as symmetries,
)
from ._architectures import ConvNet as ConvNet
from ._concatenate import concatenate as concatenate
from ._convergence import (
    ConvergenceOrder as ConvergenceOrder,
    convergence_order as convergence_order,
)
from ._filippov import (
    ChatteringWarning as ChatteringWarning,
    Filippov as Filippov,
    FilippovError as FilippovError,
    FilippovWarning as FilippovWarning,
)
from ._flows import (
    SME as SME,
    AbstractFirstOrderFlow as AbstractFirstOrderFlow,
    AbstractFlow as AbstractFlow,
    AbstractKappaFlow as AbstractKappaFlow,
    AbstractSecondOrderFlow as AbstractSecondOrderFlow,
    AbstractSeparableFlow as AbstractSeparableFlow,
    AbstractStochasticFlow as AbstractStochasticFlow,
    BregmanLagrangianFlow as BregmanLagrangianFlow,
    CentralFlow as CentralFlow,
    CentralFlowState as CentralFlowState,
    GeneralFlow as GeneralFlow,
    GradientFlow as GradientFlow,
    HalpernFlow as HalpernFlow,
    HeavyBallFlow as HeavyBallFlow,
    LagrangeMultiplierFlow as LagrangeMultiplierFlow,
    LagrangianFlow as LagrangianFlow,
    MirrorFlow as MirrorFlow,
    ModifiedGradientFlow as ModifiedGradientFlow,
    ModifiedHeavyBallFlow as ModifiedHeavyBallFlow,
    ModifiedNesterovMomentumFlow as ModifiedNesterovMomentumFlow,
    NesterovFlow as NesterovFlow,
    NewtonianFlow as NewtonianFlow,
    PowerDecay as PowerDecay,
    WeightBalancingFlow as WeightBalancingFlow,
    WeightNormFlow as WeightNormFlow,
    modified_second_order_flow as modified_second_order_flow,
)
from ._gap import gap as gap, gap_order as gap_order
from ._io import load as load, save as save
from ._models import (
    MLP as MLP,
    AbstractActivation as AbstractActivation,
    Identity as Identity,
    LeakyReLU as LeakyReLU,
    Polynomial as Polynomial,
    ReLU as ReLU,
    RePU as RePU,
    Swish as Swish,
    Tanh as Tanh,
    activation_from_name as activation_from_name,
)
from ._paths import Paths as Paths
from ._projection import (
    AbstractProjection as AbstractProjection,
    AbstractSchedule as AbstractSchedule,
    Every as Every,
    OnEvent as OnEvent,
)
from ._recurrent import RNN as RNN, ResidualMLP as ResidualMLP
from ._reparam import NormCoordinates as NormCoordinates
from ._simulate import simulate as simulate
from ._sweep._simulation import Simulation as Simulation
from ._sweep._sweep import SweepResult as SweepResult, sweep as sweep
from ._trajectory import Trajectory as Trajectory
from ._weak import weak_gap as weak_gap, weak_order as weak_order
from ._work_precision._diffrax import NonsmoothMethod as NonsmoothMethod
from ._work_precision._external import (
    ScipyMethod as ScipyMethod,
    TorchdiffeqMethod as TorchdiffeqMethod,
)
from ._work_precision._work_precision import work_precision as work_precision

try:
    __version__ = importlib.metadata.version("dynamics")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
