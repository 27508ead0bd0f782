"""The balancing fixes: `dyn.balance.min_norm_fix(model)`, `dyn.balance.MinNormFix()`, ...

Rescalings along the symmetry orbit of a homogeneous MLP that leave the network function
unchanged and minimize a regularizer (Saul, Alg. 1; Baldi et al., sec. 2; Stock et al.
2019), or restore the gradient-flow charges; each also an `AbstractProjection`.
"""

from ._charge import ChargeProjection as ChargeProjection
from ._common import BalanceInfo as BalanceInfo, lpq_norm as lpq_norm
from ._minnorm import MinNormFix as MinNormFix, min_norm_fix as min_norm_fix
from ._neuron import (
    ENorm as ENorm,
    NeuronBalance as NeuronBalance,
    enorm as enorm,
    neuron_balance as neuron_balance,
)
