"""One small piece of parallel plumbing shared by ingest and the ``label`` command.

:func:`ordered_map` runs tasks on spawned worker processes and hands the results back in task
order, which keeps stores and output tables deterministic. It is a small pool of its own rather
than :class:`concurrent.futures.ProcessPoolExecutor`, for two guarantees that executor does not
give:

* **one dead worker does not stop the run.** When a worker process dies (killed by the OOM
  killer or by hand, or a C library crashing on one file), ``ProcessPoolExecutor`` fails *every*
  pending task with ``BrokenProcessPool``. Here each worker has its own pipe, so the task that
  was running in the dead process is known exactly; only that worker is replaced, the other
  workers and their tasks carry on, and the task is run once more (a kill from outside should
  not cost its files). A task whose worker dies :data:`MAX_WORKER_DEATHS` (2) times is given up:
  ``on_error`` receives a :class:`WorkerDied` saying so, and the run goes on;
* **workers die with their parent.** A worker that outlived a ``kill -9`` of its parent would
  keep computing for nothing and hold the parent's stdout/stderr pipes open, so that a caller
  waiting for EOF hangs. Each worker asks the Linux kernel to SIGKILL it when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), and on every platform a watchdog thread in the worker exits it
  within :data:`PARENT_POLL_S` of the parent's death (the worker is then re-parented, so
  ``os.getppid()`` changes); an idle worker also sees its task pipe close.

A task whose function raises does not stop the run either: ``on_error`` turns the exception into
that task's result. At most ``in_flight_per_worker * n_workers`` results are buffered (one task
runs in each worker and one more waits in its pipe, so a worker never idles while the parent is
busy with another's result; the rest wait in the parent), so memory stays bounded however many
tasks there are. When a worker dies, the task it was running counts the death; the one waiting
in its pipe had not started and is simply sent again.

Catalogue inference over many machines uses Dask instead (:mod:`lamostcannon.catalog`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing import get_context
from multiprocessing.connection import wait as _wait

log = logging.getLogger(__name__)

__all__ = ["ordered_map", "WorkerDied", "die_with_parent", "keep_freed_memory",
           "MAX_WORKER_DEATHS", "PARENT_POLL_S"]

#: A task whose worker process dies this many times is reported as failed (never retried more).
MAX_WORKER_DEATHS = 2
#: Seconds between a worker's checks that its parent is alive (the portable fallback).
PARENT_POLL_S = 0.2
#: Tasks sent to a worker at once: the one it runs and one waiting in its pipe (so a worker
#: that finishes does not wait for the parent's loop, busy with another worker's result).
_TASKS_PER_WORKER = 2
#: Replacement workers that die before taking a task, in a row, before the run gives up.
_MAX_STARTUP_DEATHS = 3


class WorkerDied(RuntimeError):
    """The worker process running a task died (a signal or an exit without a result).

    Attributes
    ----------
    index : int
        The task.
    deaths : int
        How many workers died while running it.
    exitcode : int or None
        The last dead worker's exit code (negative: killed by that signal).
    """

    def __init__(self, index: int, deaths: int, exitcode, pid):
        self.index, self.deaths, self.exitcode, self.pid = index, deaths, exitcode, pid
        super().__init__(f"the worker process died ({_how(exitcode)}) while working on this "
                         f"task, {deaths} time{'s' if deaths != 1 else ''} (last pid {pid}); "
                         "not retried again")

    def __reduce__(self):
        return (type(self), (self.index, self.deaths, self.exitcode, self.pid))


def _how(exitcode) -> str:
    if exitcode is None:
        return "without a result"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"with exit code {exitcode}"


def die_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """Make this (worker) process exit when process ``parent_pid`` dies.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel kills it at once. Everywhere: a
    daemon thread that exits the process within ``poll_s`` seconds once ``os.getppid()`` is no
    longer ``parent_pid``. Usable as (part of) any pool's worker initializer.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the thread still works
            pass
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(70)

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(70)

    threading.Thread(target=watch, name="lamostcannon-parent-watch", daemon=True).start()


#: glibc ``M_MMAP_THRESHOLD`` set by :func:`keep_freed_memory` (the most glibc's own dynamic
#: threshold reaches on 64-bit Linux).
MALLOC_MMAP_THRESHOLD = 32 * 2 ** 20
#: glibc ``M_TRIM_THRESHOLD`` set by :func:`keep_freed_memory` (twice the mmap threshold, as
#: glibc's dynamic rule).
MALLOC_TRIM_THRESHOLD = 64 * 2 ** 20


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS at once.

    Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``
    (``distributed.nanny.pre-spawn-environ``). Setting any glibc malloc threshold switches off
    glibc's *dynamic* mmap threshold, so in such a worker every array above 128 kB is a fresh
    ``mmap``, zero-filled page by page on first touch and unmapped when freed. The batched test
    step allocates many arrays of a few MB per batch: measured on the catalogue's chunks, user
    time +7% and system time from 0.003 to 0.07 ms per observation (page faults), so a Dask
    worker spent ~1.3x the CPU of the same code in a plain process. This sets the values that
    glibc's dynamic rule reaches by itself in a plain process (mmap threshold 32 MiB, trim
    threshold 64 MiB): memory stays bounded by the working set plus 64 MiB.

    Returns
    -------
    bool
        True when the settings were applied (glibc on Linux); False elsewhere (no-op).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no such tunables): nothing to do
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)
                and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


# ------------------------------------------------------------------------------------------------
# The worker side
# ------------------------------------------------------------------------------------------------

def _worker_main(conn, parent_pid, fn, initializer, initargs):
    """A worker: set up, then ``(index, payload)`` -> ``(index, ok, result_or_exception)``.

    Tasks are received by a thread of their own, so the pipe towards the worker is always
    drained: the parent sends a second task while the first runs, and a payload bigger than
    the pipe's buffer would otherwise block the parent in that send while this worker blocks
    sending a big result, which the parent reads only after its send (a deadlock; ingest's
    payloads are file names, but kinematics sends arrays both ways).
    """
    import queue

    die_with_parent(parent_pid)
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def receive():
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent is gone or closed the pipe
                msg = None
            inbox.put(msg)
            if msg is None:
                return

    threading.Thread(target=receive, name="lamostcannon-worker-inbox", daemon=True).start()
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:  # tell the parent why, then stop
            _send(conn, ("init_failed", None, _portable(exc)))
            return
    while True:
        msg = inbox.get()
        if msg is None:
            return
        index, payload = msg
        try:
            out = (index, True, fn(payload))
        except Exception as exc:
            out = (index, False, _portable(exc))
        if not _send(conn, out):
            return


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles, else a RuntimeError with its text; the traceback rides along."""
    import pickle

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.dumps(exc)
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    exc._lamostcannon_remote_traceback = text  # type: ignore[attr-defined]
    return exc


def _send(conn, obj) -> bool:
    try:
        conn.send(obj)
        return True
    except (BrokenPipeError, EOFError, OSError):
        return False
    except Exception as exc:  # an unpicklable result: report it as the task's error
        index = obj[0] if isinstance(obj, tuple) else None
        try:
            conn.send((index, False, RuntimeError(f"result could not be sent to the parent: "
                                                  f"{type(exc).__name__}: {exc}")))
            return True
        except Exception:
            return False


# ------------------------------------------------------------------------------------------------
# The parent side
# ------------------------------------------------------------------------------------------------

class _Worker:
    def __init__(self, ctx, fn, initializer, initargs):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, daemon=False, name="lamostcannon-worker",
                                args=(child, os.getpid(), fn, initializer, initargs))
        self.proc.start()
        child.close()
        self.tasks: deque = deque()  # indices of the tasks sent to it: running, then queued
        self.done_any = False

    def stop(self, kill: bool = False) -> None:
        if self.proc.is_alive() and not kill:
            try:
                self.conn.send(None)
            except (OSError, EOFError):
                pass
        self.conn.close()
        if kill and self.proc.is_alive():
            self.proc.kill()


def ordered_map(fn, payloads, n_workers: int, *, initializer=None, initargs=(),
                on_error=None, in_flight_per_worker: int = 2, env=None,
                max_deaths: int = MAX_WORKER_DEATHS):
    """Yield ``(index, fn(payload))`` in payload order, computed on ``n_workers`` processes.

    Parameters
    ----------
    fn : callable
        A module-level (picklable) function of one payload.
    payloads : sequence
        The work items, e.g. lists of file names.
    n_workers : int
        Worker processes (``spawn`` start method, so the caller needs the usual
        ``if __name__ == "__main__":`` guard in scripts). They die with this process.
    initializer, initargs
        Run once in each worker (e.g. load a model); also in a worker that replaces a dead one.
        An initializer that raises stops the run with its exception.
    on_error : callable, optional
        ``on_error(index, exc) -> result`` for a payload whose function raised, or whose worker
        died ``max_deaths`` times (``exc`` is then a :class:`WorkerDied`); without it the
        exception propagates.
    in_flight_per_worker : int
        Tasks dispatched ahead of the next result to yield, per worker; bounds the results held
        in memory to ``in_flight_per_worker * n_workers``.
    env : dict, optional
        Environment variables set while the workers start (they inherit them), e.g.
        ``{"OPENBLAS_NUM_THREADS": "1"}``.
    max_deaths : int
        Worker deaths a task may cause before it is given up (default 2: one retry).

    Raises
    ------
    RuntimeError
        Replacement workers keep dying before they take a task (e.g. no memory to start).
    """
    payloads = list(payloads)
    n = len(payloads)
    if n == 0:
        return
    n_workers = max(1, min(int(n_workers), n))
    window = max(1, int(in_flight_per_worker)) * n_workers
    ctx = get_context("spawn")
    workers: list[_Worker] = []
    state = {"startup_deaths": 0}

    def start_worker() -> _Worker:
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            return _Worker(ctx, fn, initializer, initargs)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    results: dict = {}
    retry: deque = deque()
    deaths: dict[int, int] = {}
    next_new = 0
    next_yield = 0
    finished = False
    try:
        workers = [start_worker() for _ in range(n_workers)]
        while next_yield < n:
            # 1) dispatch: retries first, then new tasks inside the window; each worker gets
            #    a second task queued in its pipe, so that it never waits for this loop
            for depth in range(1, _TASKS_PER_WORKER + 1):
                for w in workers:
                    if len(w.tasks) >= depth:
                        continue
                    if retry:
                        index = retry.popleft()
                    elif next_new < n and next_new < next_yield + window:
                        index = next_new
                        next_new += 1
                    else:
                        break
                    w.tasks.append(index)
                    try:
                        w.conn.send((index, payloads[index]))
                    except (OSError, EOFError):
                        pass  # the worker is dead; its sentinel says so below
            # 2) yield what is ready, in order
            if next_yield in results:
                while next_yield in results:
                    yield next_yield, results.pop(next_yield)
                    next_yield += 1
                continue
            # 3) wait for a result or a death
            busy = [w for w in workers if w.tasks]
            if not busy:  # pragma: no cover - cannot happen: something is always dispatched
                raise RuntimeError("ordered_map: nothing to wait for")
            ready = set(_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy]))
            for k, w in enumerate(workers):
                if not w.tasks or (w.conn not in ready and w.proc.sentinel not in ready):
                    continue
                msg = None
                if w.conn in ready or w.conn.poll():
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                if msg is not None:
                    index, ok, value = msg
                    if index == "init_failed":
                        raise value
                    if index != w.tasks[0]:  # pragma: no cover - a worker works in order
                        raise RuntimeError(f"worker answered task {index}, expected "
                                           f"{w.tasks[0]}")
                    w.tasks.popleft()
                    w.done_any = True
                    state["startup_deaths"] = 0
                    if ok:
                        results[index] = value
                    else:
                        if on_error is None:
                            raise value
                        log.error("a worker failed on task %d: %s: %s", index,
                                  type(value).__name__, value)
                        results[index] = on_error(index, value)
                    continue
                # no result: the worker is dead (or dying: its pipe closed)
                w.proc.join(5)
                # the first task sent and not answered was running; the others had not started
                index, exitcode, pid = w.tasks.popleft(), w.proc.exitcode, w.proc.pid
                retry.extendleft(reversed(w.tasks))
                w.tasks.clear()
                deaths[index] = deaths.get(index, 0) + 1
                w.stop(kill=True)
                if not w.done_any:
                    state["startup_deaths"] += 1
                    if state["startup_deaths"] > _MAX_STARTUP_DEATHS + max_deaths:
                        raise RuntimeError(f"worker processes keep dying ({_how(exitcode)}) "
                                           "before they finish a task; giving up")
                if deaths[index] >= max_deaths:
                    exc = WorkerDied(index, deaths[index], exitcode, pid)
                    if on_error is None:
                        raise exc
                    log.error("task %d: %s", index, exc)
                    results[index] = on_error(index, exc)
                else:
                    log.warning("a worker process (pid %s) died (%s) while working on task %d; "
                                "starting a new worker and running the task again", pid,
                                _how(exitcode), index)
                    retry.appendleft(index)
                workers[k] = start_worker()
        finished = True
    finally:
        for w in workers:
            w.stop(kill=not finished)
        deadline = time.monotonic() + 10
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
