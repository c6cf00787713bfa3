"""The ordered process-pool map shared by ingest and the label command."""

import pytest

from lamostcannon.parallel import ordered_map


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
