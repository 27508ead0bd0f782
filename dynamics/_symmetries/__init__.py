"""Symmetries of MLPs: generators, the charges they give, the conservation-law count."""

from ._charges import linear_balance as linear_balance, rescaling as rescaling
from ._count import (
    ConservationLawCount as ConservationLawCount,
    count_conservation_laws as count_conservation_laws,
    independent_functions as independent_functions,
    known_count as known_count,
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
