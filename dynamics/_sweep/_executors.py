"""Running a sweep's cells as Dask distributed tasks."""

from collections.abc import Iterator

import jax

from ._batch import run_chunk

# How long to wait for a Dask scheduler before saying it cannot be reached.
CONNECT_TIMEOUT = "5s"


def client_of(executor):
    try:
        import distributed
    except ImportError:
        raise ValueError(
            "`executor` needs Dask distributed, which is not installed; pip install "
            "'dynamics[dist]', or pass executor=None to run in this process."
        ) from None
    if isinstance(executor, distributed.Client):
        return executor, False
    if executor == "dask":
        try:
            return distributed.get_client(), False
        except ValueError:
            raise ValueError(
                "executor='dask' but no Dask client is running; create one first "
                "(distributed.Client() or Client('tcp://host:8786')), pass it, or pass "
                "executor=None to run in this process."
            ) from None
    if isinstance(executor, str):
        try:
            return distributed.Client(executor, timeout=CONNECT_TIMEOUT), True
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"could not reach a Dask scheduler at {executor!r} within {CONNECT_TIMEOUT} "
                f"({exc}); "
                "start one (`dask scheduler`), check the address (tcp://host:8786), or "
                "pass executor=None to run in this process."
            ) from None
    raise ValueError(
        "`executor` must be None (in this process), 'dask' (the current Dask client), a "
        f"distributed.Client or a scheduler address 'tcp://host:port'; got {executor!r}."
    )


def run_dask(client, run_fn, todo, chunk_size) -> Iterator[list[tuple[tuple, dict]]]:
    import distributed

    workers = max(len(client.scheduler_info().get("workers", {})), 1)
    size = chunk_size or -(-len(todo) // (2 * workers))  # two tasks per worker
    x64 = bool(jax.config.read("jax_enable_x64"))
    futures = [client.submit(run_chunk, run_fn, todo[i:i + size], chunk_size or size, x64,
                             pure=False)
               for i in range(0, len(todo), size)]
    try:
        for future in distributed.as_completed(futures):
            yield from future.result()
    finally:
        client.cancel(futures)
