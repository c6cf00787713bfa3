"""The ordered process-pool map shared by ingest and the label command."""

import os
import signal

import pytest

from lamostcannon.parallel import WorkerDied, ordered_map


def _square_or_fail(x):
    if x == 3:
        raise RuntimeError("three is bad")
    return x * x


def test_results_come_back_in_order_and_a_failed_task_does_not_stop_the_run():
    got = list(ordered_map(_square_or_fail, list(range(8)), 2,
                           on_error=lambda index, exc: f"failed: {exc}", in_flight_per_worker=1))
    assert [i for i, _ in got] == list(range(8))
    assert [r for _, r in got] == [0, 1, 4, "failed: three is bad", 16, 25, 36, 49]


def test_without_on_error_the_exception_propagates():
    with pytest.raises(RuntimeError, match="three is bad"):
        list(ordered_map(_square_or_fail, [1, 2, 3], 2))


def _die_on(payload):
    """Payload (x, marker): x == 5 kills its own worker every time; x == 2 kills it only once
    (the marker file remembers); other values are squared."""
    x, marker = payload
    if x == 5 or (x == 2 and not os.path.exists(marker)):
        if x == 2:
            open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def test_a_dead_worker_costs_only_its_task_and_a_twice_fatal_task_is_given_up(tmp_path):
    marker = str(tmp_path / "died_once")
    errors = {}

    def on_error(index, exc):
        errors[index] = exc
        return "lost"

    got = list(ordered_map(_die_on, [(x, marker) for x in range(9)], 2, on_error=on_error))
    assert [i for i, _ in got] == list(range(9))
    # task 2 killed its worker once and was run again; task 5 killed it twice and is given up
    assert [r for _, r in got] == [0, 1, 4, 9, 16, "lost", 36, 49, 64]
    assert list(errors) == [5] and isinstance(errors[5], WorkerDied)
    assert errors[5].deaths == 2 and "killed by SIGKILL" in str(errors[5])
    with pytest.raises(WorkerDied, match="killed by SIGKILL"):
        list(ordered_map(_die_on, [(5, marker), (1, marker)], 2))


def _slow_die_on(payload):
    import time

    time.sleep(0.05)  # long enough for the next task to be queued in the worker's pipe
    return _die_on(payload)


def test_a_task_queued_behind_a_fatal_one_is_sent_again_without_counting_a_death(tmp_path):
    """One worker holds two tasks (one running, one waiting in its pipe); when the running one
    kills it, the waiting one had not started: it runs on the next worker, and only the
    fatal task is given up."""
    marker = str(tmp_path / "died_once")
    errors = {}

    def on_error(index, exc):
        errors[index] = exc
        return "lost"

    got = list(ordered_map(_slow_die_on, [(x, marker) for x in (5, 1, 2, 3)], 1,
                           on_error=on_error, in_flight_per_worker=2))
    assert [r for _, r in got] == ["lost", 1, 4, 9]
    assert list(errors) == [0] and errors[0].deaths == 2


def _fail_init():
    raise ValueError("cannot load the model")


def test_an_initializer_that_raises_stops_the_run():
    with pytest.raises(ValueError, match="cannot load the model"):
        list(ordered_map(_square_or_fail, [1, 2], 2, initializer=_fail_init))


def test_keep_freed_memory_takes_large_arrays_from_the_heap_under_dasks_malloc_setting():
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes every array
    above 128 kB a fresh mmap (zero-filled page by page on each use); keep_freed_memory makes
    glibc serve them from the heap again. Checked with glibc's own count of mmapped chunks
    (mallinfo2().hblks) around an 8 MB array, which does not depend on the kernel's page size
    or huge pages (page-fault counts do)."""
    import subprocess
    import sys

    code = (
        "import ctypes, sys, numpy as np\n"
        "from lamostcannon import parallel\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks',"
        " 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc = ctypes.CDLL(None)\n"
        "try:\n"
        "    mallinfo2 = libc.mallinfo2\n"
        "except AttributeError:\n"
        "    print('no-mallinfo2'); sys.exit()\n"
        "mallinfo2.restype = Info\n"
        "applied = parallel.keep_freed_memory() if sys.argv[1] == '1' else False\n"
        "a = np.ones(1 << 20); del a\n"  # one cycle: what glibc's dynamic rule would learn from
        "before = mallinfo2().hblks\n"
        "a = np.ones(1 << 20)\n"
        "print(applied, mallinfo2().hblks - before)\n")
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    got = {}
    for fix in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, fix], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        if out == ["no-mallinfo2"]:
            pytest.skip("not glibc >= 2.33: no mallinfo2")
        got[fix] = (out[0] == "True", int(out[1]))
    if not got["1"][0]:
        pytest.skip("not glibc: malloc thresholds cannot be set")
    assert got["0"][1] == 1, got  # Dask's setting: the 8 MB array is a fresh mmap
    assert got["1"][1] == 0, got  # kept freed memory: it comes from the heap


def _big(payload):
    """A payload and a result bigger than a pipe's buffer (kinematics sends arrays both ways)."""
    import numpy as np

    return np.full(200_000, float(payload.sum()))


def test_payloads_and_results_bigger_than_the_pipe_do_not_deadlock():
    """With a second task queued per worker, a big payload sent while the worker sends a big
    result used to block both sides for ever; the worker now drains its pipe in a thread."""
    import numpy as np

    payloads = [np.full(300_000, float(k)) for k in range(6)]     # 2.4 MB each
    got = list(ordered_map(_big, payloads, 2, in_flight_per_worker=2))
    assert [i for i, _ in got] == list(range(6))
    assert all(r.shape == (200_000,) and r[0] == 300_000.0 * i for i, r in got)
