"""The driver of `simulate`: its input checks (`_prepare`) produce a `SolveSpec`
(`_spec`) that one compiled solve (`_solve`) runs with diffrax, on a state laid out by
`_layout`, with the terms of `_terms`; actions inside the solve (`_actions`: a
projection, `_projecting`; a nonsmooth mode's switches, `_hooks`)."""
