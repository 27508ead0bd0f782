"""Noether charges of MLP symmetries: `dyn.charges.rescaling(model)`, ..."""

from .symmetries import linear_balance as linear_balance, rescaling as rescaling
