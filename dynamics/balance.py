"""The balancing fixes: `dyn.balance.min_norm_fix(model)`, `dyn.balance.MinNormFix()`, ...

Rescalings along the symmetry orbit of a homogeneous MLP that leave the network function
unchanged and minimize a regularizer (Saul, Alg. 1; Baldi et al., sec. 2; Stock et al.
2019), or restore the gradient-flow charges; each also an `AbstractProjection`.
"""

from ._balance import (
    BalanceInfo as BalanceInfo,
    ChargeProjection as ChargeProjection,
    ENorm as ENorm,
    MinNormFix as MinNormFix,
    NeuronBalance as NeuronBalance,
    enorm as enorm,
    lpq_norm as lpq_norm,
    min_norm_fix as min_norm_fix,
    neuron_balance as neuron_balance,
)
