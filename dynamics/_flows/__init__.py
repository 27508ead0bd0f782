"""The Lagrangian catalogue: one final `eqx.Module` per flow, split by family.

- `_base`: the abstract bases (`AbstractFlow`, first/second order, the marker classes)
  and the helpers every entry shares (coefficients stored as arrays, schedules).
- `_classical`: gradient, mirror, Newtonian, Nesterov, heavy-ball, general κ1/κ2 and
  Lagrangian flows (Głuch & Urbanke Table 1).
- `_modified`: modified equations of GD, heavy ball and Nesterov momentum (backward
  error analysis; the counterparts of `dyn.discrete`).
- `_balancing`: Saul's weight-balancing flows.
- `_bregman`: the Bregman Lagrangian flows of Wibisono, Wilson & Jordan.
- `_normalized`: Theory III's weight-normalization, Lagrange-multiplier and Halpern flows.

Further families live in files of their own beside these and are re-exported here.
"""

from ._balancing import WeightBalancingFlow as WeightBalancingFlow
from ._base import (
    AbstractFirstOrderFlow as AbstractFirstOrderFlow,
    AbstractFlow as AbstractFlow,
    AbstractKappaFlow as AbstractKappaFlow,
    AbstractSecondOrderFlow as AbstractSecondOrderFlow,
    AbstractSeparableFlow as AbstractSeparableFlow,
    Loss as Loss,
)
from ._bregman import BregmanLagrangianFlow as BregmanLagrangianFlow
from ._classical import (
    GeneralFlow as GeneralFlow,
    GradientFlow as GradientFlow,
    HeavyBallFlow as HeavyBallFlow,
    LagrangianFlow as LagrangianFlow,
    MirrorFlow as MirrorFlow,
    NesterovFlow as NesterovFlow,
    NewtonianFlow as NewtonianFlow,
)
from ._edge import (
    CentralFlow as CentralFlow,
    CentralFlowState as CentralFlowState,
)
from ._modified import (
    AbstractModifiedFlow as AbstractModifiedFlow,
    ModifiedGradientFlow as ModifiedGradientFlow,
    ModifiedHeavyBallFlow as ModifiedHeavyBallFlow,
    ModifiedNesterovMomentumFlow as ModifiedNesterovMomentumFlow,
    modified_second_order_flow as modified_second_order_flow,
)
from ._normalized import (
    HalpernFlow as HalpernFlow,
    LagrangeMultiplierFlow as LagrangeMultiplierFlow,
    PowerDecay as PowerDecay,
    WeightNormFlow as WeightNormFlow,
)
from ._stochastic import (
    SME as SME,
    AbstractStochasticFlow as AbstractStochasticFlow,
)
