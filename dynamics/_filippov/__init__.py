"""Exact integration of flows on piecewise-linear (ReLU, LeakyReLU) networks:
`dyn.Filippov`, a nonsmooth mode of `simulate` (`dynamics/_driver/_hooks.py`)."""

from .._surfaces import (
    Surfaces as Surfaces,
    data_term_index as data_term_index,
    is_piecewise_linear as is_piecewise_linear,
    pair_location as pair_location,
)
from ._driver import (
    ChatteringWarning as ChatteringWarning,
    Filippov as Filippov,
    FilippovError as FilippovError,
    FilippovWarning as FilippovWarning,
    warn_if_chattering as warn_if_chattering,
)
from ._state import (
    FilippovStall as FilippovStall,
    FilippovState as FilippovState,
    FilippovZeno as FilippovZeno,
)
from ._switching import Switching as Switching
