"""Weight regularizers R(W) for weight-balancing flows: `dyn.regularizers.Lpq(p, q)`,
`FromFunction(fn)`, and the imbalance Q_i they define (Saul 2023 eqs. 17, 26)."""

from .._deprecation import deprecated_names
from ._regularizers import (
    AbstractRegularizer as AbstractRegularizer,
    FromFunction as FromFunction,
    Lpq as Lpq,
    imbalance as imbalance,
)

__getattr__ = deprecated_names("dynamics.regularizers", {
    "Function": ("FromFunction", FromFunction),  # `Function` is also a monitor's name
})
