"""Noether charges of MLP symmetries: `dyn.charges.rescaling(model)`, ..."""

from ._symmetries import linear_balance as linear_balance, rescaling as rescaling
