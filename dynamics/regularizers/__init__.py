"""Weight regularizers R(W) for weight-balancing flows: `dyn.regularizers.Lpq(p, q)`,
`Function(fn)`, and the imbalance Q_i they define (Saul 2023 eqs. 17, 26)."""

from ._regularizers import (
    AbstractRegularizer as AbstractRegularizer,
    Function as Function,
    Lpq as Lpq,
    imbalance as imbalance,
)
