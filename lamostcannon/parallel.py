"""One small piece of parallel plumbing shared by ingest and the ``label`` command.

:func:`ordered_map` runs tasks on spawned worker processes with at most a few tasks in flight
per worker (so memory stays bounded however many files there are) and hands the results back in
task order, which keeps stores and output tables deterministic. A task whose worker raises does
not stop the run: ``on_error`` turns the exception into that task's result.

Catalogue inference over many machines uses Dask instead (:mod:`lamostcannon.catalog`).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

log = logging.getLogger(__name__)


def ordered_map(fn, payloads, n_workers: int, *, initializer=None, initargs=(),
                on_error=None, in_flight_per_worker: int = 2, env=None):
    """Yield ``(index, fn(payload))`` in payload order, computed on ``n_workers`` processes.

    Parameters
    ----------
    fn : callable
        A module-level (picklable) function of one payload.
    payloads : sequence
        The work items, e.g. lists of file names.
    n_workers : int
        Worker processes (``spawn`` start method, so the caller needs the usual
        ``if __name__ == "__main__":`` guard in scripts).
    initializer, initargs
        Run once in each worker (e.g. load a model).
    on_error : callable, optional
        ``on_error(index, exc) -> result`` for a payload whose worker raised; without it the
        exception propagates.
    in_flight_per_worker : int
        Payloads submitted ahead per worker; bounds memory.
    env : dict, optional
        Environment variables set while the workers start (they inherit them), e.g.
        ``{"OPENBLAS_NUM_THREADS": "1"}``.
    """
    n_workers = max(1, min(n_workers, len(payloads)))
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        pool = ProcessPoolExecutor(n_workers, mp_context=get_context("spawn"),
                                   initializer=initializer, initargs=initargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    pending: deque = deque()
    queue = iter(enumerate(payloads))
    try:
        for index, payload in queue:
            pending.append((index, pool.submit(fn, payload)))
            if len(pending) >= in_flight_per_worker * n_workers:
                break
        while pending:
            index, future = pending.popleft()
            try:
                result = future.result()
            except Exception as exc:
                if on_error is None:
                    raise
                log.error("a worker failed on task %d: %s: %s", index, type(exc).__name__, exc)
                result = on_error(index, exc)
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(fn, nxt[1])))
            yield index, result
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
