"""Symmetries: `dyn.symmetries.Rescaling(layer=h, neuron=i)`, `LayerRescaling(layer)`,
`LinearLayer(layer, A)`, `InputRotation(P)`, `TimeTranslation()`,
`check(gen, loss, params, key=key)` and `count_conservation_laws(model, x, key=key)`."""

from .._units import Slice as Slice, Units as Units
from ._charges import linear_balance as linear_balance, rescaling as rescaling
from ._count import (
    ConservationLawCount as ConservationLawCount,
    count_conservation_laws as count_conservation_laws,
    independent_functions as independent_functions,
)
from ._generators import (
    AbstractGenerator as AbstractGenerator,
    AbstractLinearGenerator as AbstractLinearGenerator,
    InputRotation as InputRotation,
    LayerRescaling as LayerRescaling,
    LinearLayer as LinearLayer,
    Rescaling as Rescaling,
    TimeTranslation as TimeTranslation,
    check as check,
)
from ._known import known_count as known_count
