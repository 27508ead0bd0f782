"""Discrete optimizers on their flow's time axis (issue 8): the algorithms, `run`, the
exact discrete charge laws. Public names are re-exported by `dynamics.discrete`."""
