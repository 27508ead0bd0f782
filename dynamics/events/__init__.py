"""Events that stop a run: `dyn.events.LossBelow(value)`, `NormAbove(value)`, ..."""

from ._events import (
    AbstractDivergenceEvent as AbstractDivergenceEvent,
    AbstractEvent as AbstractEvent,
    Condition as Condition,
    LossBelow as LossBelow,
    NonFinite as NonFinite,
    NormAbove as NormAbove,
)
