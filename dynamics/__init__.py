"""dynamics: neural-network training as a dynamical system.

A study pairs an Equinox model with a flow from the Lagrangian catalogue, integrates it
with Diffrax (with events) through `simulate`, and records monitors along the way.
"""

import importlib.metadata

from . import (
    charges as charges,
    datasets as datasets,
    events as events,
    losses as losses,
    monitors as monitors,
    symmetries as symmetries,
)
from ._flows import (
    AbstractFirstOrderFlow as AbstractFirstOrderFlow,
    AbstractFlow as AbstractFlow,
    AbstractKappaFlow as AbstractKappaFlow,
    AbstractSecondOrderFlow as AbstractSecondOrderFlow,
    AbstractSeparableFlow as AbstractSeparableFlow,
    GeneralFlow as GeneralFlow,
    GradientFlow as GradientFlow,
    HeavyBallFlow as HeavyBallFlow,
    LagrangianFlow as LagrangianFlow,
    MirrorFlow as MirrorFlow,
    NesterovFlow as NesterovFlow,
    NewtonianFlow as NewtonianFlow,
)
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
from ._projection import (
    AbstractProjection as AbstractProjection,
    AbstractSchedule as AbstractSchedule,
    Every as Every,
    OnEvent as OnEvent,
)
from ._simulate import simulate as simulate
from ._trajectory import Trajectory as Trajectory

try:
    __version__ = importlib.metadata.version("dynamics")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
