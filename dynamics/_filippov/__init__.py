"""Exact integration of flows on piecewise-linear (ReLU, LeakyReLU) networks."""

from ._mode import (
    ChatteringWarning as ChatteringWarning,
    Filippov as Filippov,
    FilippovAction as FilippovAction,
    FilippovStall as FilippovStall,
    FilippovState as FilippovState,
    FilippovTrigger as FilippovTrigger,
    Linearisation as Linearisation,
    Switching as Switching,
)
from ._surfaces import (
    Surfaces as Surfaces,
    data_term_index as data_term_index,
    is_piecewise_linear as is_piecewise_linear,
    pair_location as pair_location,
)
