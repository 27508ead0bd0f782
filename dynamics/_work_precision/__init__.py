"""`dyn.work_precision`: error against cost for methods × tolerances. Each method class
brings its own runner (`_base.AbstractMethod`): diffrax solvers and `NonsmoothMethod`
(`_diffrax`), `ScipyMethod` and `TorchdiffeqMethod` (`_external`)."""
