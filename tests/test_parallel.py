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


def _fail_init():
    raise ValueError("cannot load the model")


def test_an_initializer_that_raises_stops_the_run():
    with pytest.raises(ValueError, match="cannot load the model"):
        list(ordered_map(_square_or_fail, [1, 2], 2, initializer=_fail_init))
