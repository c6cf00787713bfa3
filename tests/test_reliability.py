"""Races, killed processes and dead workers (issue 14), each case run for real.

* the store's write lock: pairs of forked processes released together by a
  :class:`multiprocessing.Barrier` open one store for writing; at most one may hold it;
* concurrent ingests into one new store lose no row and leave metadata matching the spectra;
* ``kill -9`` of ``python -m lamostcannon label`` and of an ingest script leaves no worker
  process behind, and a caller reading their output pipes sees EOF;
* a worker killed by pid in the middle of a run: every file is still labelled / stored (its
  chunk is run again); a chunk whose worker is killed twice is listed with the reason.

The attacks live in ``tests/reliability_harness.py``; ``benchmarks/bench_reliability.py``
repeats them more often and records the figures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import reliability_harness as rh
from lamostcannon.store import SpectraStore

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds a command's workers through /proc")


# ------------------------------------------------------------------------------ the write lock

def test_the_write_lock_has_one_holder_in_200_simultaneous_openings(tmp_path):
    path = tmp_path / "s.zarr"
    SpectraStore.create(path).close()
    got = rh.simultaneous_openings(path, 100)
    assert got["errors"] == 0, got["first_error"]
    assert got["double"] == 0, got
    assert got["held"] >= 100  # every pair: at least one opener got it
    if got["busy"]:
        assert "open for writing by another process" in got["busy_message"]


def test_a_killed_writer_releases_the_lock_and_readers_are_never_blocked(tmp_path):
    path = tmp_path / "s.zarr"
    SpectraStore.create(path).close()
    code = ("import sys, time\nfrom lamostcannon.store import SpectraStore\n"
            "s = SpectraStore(sys.argv[1], 'a')\nprint('locked', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"open for writing by another process.*{proc.pid}"):
            SpectraStore(path, "a")
        assert len(SpectraStore(path)) == 0  # readers are not blocked
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with SpectraStore(path, "a") as store:  # the OS released the dead writer's lock
        assert store.mode == "a"


def test_racing_ingests_into_one_new_store_lose_no_rows(real_lamost, tmp_path):
    files = sorted((real_lamost / "dr10").glob("*.fits.gz"))
    got = rh.racing_ingests(files, tmp_path, n_trials=8)
    assert got["errors"] == 0, got["first_error"]
    assert got["lost_rows"] == 0 and got["mismatched_rows"] == 0, got
    assert got["multi_line_messages"] == 0, got["refusal"]
    if got["one_refused"]:
        assert "open for writing by another process" in got["refusal"] \
            or "created by another process" in got["refusal"], got["refusal"]


# ------------------------------------------------------------------------------ kill -9, workers

@pytest.fixture(scope="module")
def small_model(real_lamost, tmp_path_factory):
    return rh.train_small_model(real_lamost, tmp_path_factory.mktemp("model"))


@linux_only
def test_kill_9_of_label_and_of_ingest_leaves_no_worker_and_no_hanging_pipe(
        real_lamost, small_model, tmp_path):
    dr10 = real_lamost / "dr10"
    label = rh.kill_parent_count_orphans(
        rh.label_command(small_model, [dr10], tmp_path / "labels.fits"), n_kills=2)
    ingest = rh.kill_parent_count_orphans(
        rh.ingest_command(dr10, tmp_path / "s.zarr", tmp_path), n_kills=2)
    for got in (label, ingest):
        assert got["kills"] == 2 and got["workers_seen"] >= 4, got
        assert got["surviving_workers"] == 0 and got["hung_pipes"] == 0, got
        assert got["max_seconds_to_eof"] < 10, got


@linux_only
def test_one_killed_worker_costs_nothing_and_a_chunk_killed_twice_is_listed(
        real_lamost, small_model, tmp_path):
    from astropy.table import Table

    files = sorted((real_lamost / "dr10").glob("*.fits.gz"))[:600]
    out = tmp_path / "labels.fits"
    once = rh.kill_workers_during_run(rh.label_command(small_model, files, out), times=1)
    assert once["returncode"] == 0, once["stderr"][-3000:]
    assert len(Table.read(out)) == len(files)  # the killed chunk was run again
    assert "died (killed by SIGKILL)" in once["stderr"]  # and the log says what happened
    errors = pd.read_csv(tmp_path / "labels.errors.csv")
    assert len(errors) == 0, errors

    twice = rh.kill_workers_during_run(rh.label_command(small_model, files, out), times=2)
    assert twice["returncode"] == 0, twice["stderr"][-3000:]
    assert len(twice["killed"]) == 2
    errors = pd.read_csv(tmp_path / "labels.errors.csv")
    labelled = Table.read(out)
    assert len(errors) == 8 and len(labelled) == len(files) - 8  # one chunk of 8 files
    assert errors["reason"].str.contains("WorkerDied").all()
    assert errors["reason"].str.contains("killed by SIGKILL").all()
    assert set(errors["source"]) | set(labelled["source"]) == {str(f) for f in files}


@linux_only
def test_ingest_goes_on_when_a_worker_is_killed(real_lamost, tmp_path):
    files = sorted((real_lamost / "dr10").glob("*.fits.gz"))[:400]
    folder = tmp_path / "in"
    folder.mkdir()
    for f in files:
        (folder / f.name).symlink_to(f)
    store = tmp_path / "s.zarr"
    got = rh.kill_workers_during_run(rh.ingest_command(folder, store, tmp_path), times=2)
    assert got["returncode"] == 0, got["stderr"][-3000:]
    report = pd.read_csv(store / "ingest_report.csv")
    failed = report[report["status"] == "failed"]
    assert len(failed) == 8 and failed["reason"].str.contains("WorkerDied").all(), failed
    assert (report["status"] == "stored").sum() == len(files) - 8
    assert len(SpectraStore(store)) == len(files) - 8


def test_label_lists_dangling_links_and_link_loops_in_its_errors(real_lamost, small_model,
                                                                  tmp_path):
    from lamostcannon import cli

    top = tmp_path / "spectra"
    (top / "sub").mkdir(parents=True)
    good = sorted((real_lamost / "dr10").glob("*.fits.gz"))[300:303]
    for f in good:
        (top / f.name).symlink_to(f)
    (top / "gone.fits.gz").symlink_to(tmp_path / "nowhere.fits.gz")
    (top / "loop1.fits").symlink_to(top / "loop2.fits")
    (top / "loop2.fits").symlink_to(top / "loop1.fits")
    (top / "sub" / "up").symlink_to(top)
    run = cli.label_files(small_model, [top], tmp_path / "out.csv", workers=1, progress=False)
    assert run.n_labelled == 3 and run.n_failed == 4
    errors = pd.read_csv(run.errors).set_index("source")
    assert errors.loc[str(top / "gone.fits.gz"), "reason"].startswith("dangling symbolic link")
    for name in ("loop1.fits", "loop2.fits", "sub/up"):
        assert errors.loc[str(top / name), "reason"].startswith("symbolic link loop"), name


def test_a_model_from_another_version_loads_with_a_warning(small_model, tmp_path, caplog):
    import logging
    import warnings

    from astropy.io import fits

    from lamostcannon import __version__
    from lamostcannon.cannon import CannonModel

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same version: no warning at all
        CannonModel.read(small_model)
    major, minor = (int(v) for v in __version__.split(".")[:2])
    for other, warned in ((f"{major}.{minor}.99", False), (f"{major}.{minor + 1}.0", True),
                          (f"{major + 1}.0.0", True)):
        path = tmp_path / f"model_{other}.fits"
        with fits.open(small_model) as hdul:
            hdul[0].header["LCVERS"] = other
            hdul.writeto(path, checksum=True)
        caplog.clear()
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            model = CannonModel.read(path)
        assert model.meta["version"] == other
        text = [str(w.message) for w in got if issubclass(w.category, UserWarning)]
        assert bool(text) == warned, (other, text)
        logged = [r for r in caplog.records if r.levelno == logging.WARNING
                  and "written by lamostcannon" in r.getMessage()]
        assert bool(logged) == warned
        if warned:
            assert f"written by lamostcannon {other}, this is {__version__}" in text[0]
