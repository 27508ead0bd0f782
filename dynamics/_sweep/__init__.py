"""`dyn.sweep` and `dyn.Simulation`: grids of runs, solved in vmapped groups, gathered
into one xarray Dataset (`_sweep`), with their axes (`_axes`), the batched solving
(`_batch`), Dask execution (`_executors`) and the records written per cell (`_records`)."""
