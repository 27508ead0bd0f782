"""The balancing fixes: rescalings along the symmetry orbit of a homogeneous MLP.

A rescaling by a_i = e^{u_i} > 0 at each hidden unit i of a d-homogeneous network
(σ(λz) = λ^d σ(z)) maps

    W_k[i, j] -> W_k[i, j] · a_i / a_j^d,    b_k[i] -> b_k[i] · a_i,

(a = 1 at input and output units) and leaves the network function unchanged (Saul,
eqs. 4–5 for d = 1; Baldi et al., App. B.5.2 for BiPU units of exponent c = d). The fixes
pick the rescaling that minimizes a regularizer:

- `min_norm_fix` (Saul, Alg. 1): parallel multiplicative updates on ‖W‖_{p,q};
- `neuron_balance` (Baldi et al., sec. 2, App. B): one neuron (or layer) at a time, in
  closed form for L_p and by a 1-D root solve for any additive regularizer Σ g(|w|);
- `enorm` (Stock et al. 2019): block coordinate descent layer by layer, p = q;
- `ChargeProjection`: back to the initial per-neuron gradient-flow charges.

Everything works on the log-scales u (one array per hidden layer) and applies them
once at the end, so the rescaled weights are exactly W0 · a_i/a_j^d.
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
