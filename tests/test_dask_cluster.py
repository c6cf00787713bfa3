"""Catalogue inference on a real Dask cluster started from the command line, as on an HPC system.

A ``dask scheduler`` and two ``dask worker`` processes (each with its nanny, one thread) are
started with the ``dask`` command-line interface on 127.0.0.1 (free ports chosen by the OS, the
address read from the scheduler file), exactly as a batch job would start them on cluster
nodes; :func:`lamostcannon.catalog.run_inference` is given only the scheduler address. The
per-observation table must hold the same rows as the in-process run of the same store. Every
process is started in its own session and killed with its process group at the end, also when
the test fails.

Equality: both runs execute the same ``label_chunk`` code on the same chunks, with one BLAS
thread, on this machine, so in practice they agree bit for bit; the code does not guarantee
that by construction (the test step's floating-point sums follow the BLAS build and CPU), so
float columns are compared with a relative tolerance of 1e-9 and everything else (obsid, row,
designation, model choice, flags, pixel and iteration counts, convergence) exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from lamostcannon import catalog, labels
from quadratic_teacher import teacher

pytestmark = pytest.mark.slow

P = 3909
N_OBS = 480
CHUNK = 60


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    from lamostcannon.spectra import SpectraStore

    rng = np.random.default_rng(17)
    root = tmp_path_factory.mktemp("cluster_survey")
    draws, models = {}, {}
    for group, names in (("dwarf", labels.DWARF_LABELS), ("giant", labels.GIANT_LABELS)):
        models[group], draws[group] = teacher(names, rng, n=300)
        models[group].write(root / f"model_{group}.fits")
    giant = rng.random(N_OBS) < 0.4
    flux = np.empty((N_OBS, P), np.float32)
    for group, sel in (("dwarf", ~giant), ("giant", giant)):
        lab = draws[group][rng.integers(0, len(draws[group]), sel.sum())]
        flux[sel] = models[group].predict(lab) + 0.02 * rng.standard_normal((sel.sum(), P))
    ivar = np.full((N_OBS, P), 1 / 0.02 ** 2, np.float32)
    ivar[7] = 0.0  # one empty spectrum: flagged, not fitted
    obsid = 50_000 + np.arange(N_OBS)
    designation = [f"J{k - (k % 7 == 1):06d}" for k in range(N_OBS)]  # some repeats
    with SpectraStore.create(root / "survey.zarr", chunk_rows=64) as store:
        store.append(flux, ivar, pd.DataFrame({"obsid": obsid, "designation": designation,
                                               "snrz": 50.0}))
    teff = np.where(giant, 4700.0, 5800.0)
    teff[::23] = np.nan  # no LASP labels: both models, the lower chi2 wins
    lamost = pd.DataFrame({"obsid": obsid, "designation": designation, "snrz": 50.0,
                           "ra": np.linspace(10, 60, N_OBS), "dec": np.linspace(0, 40, N_OBS),
                           "rv": 0.0, "teff": teff, "logg": np.where(giant, 2.5, 4.4)})
    return root, lamost


def _start(cmd, log_path):
    """Start a command-line process in its own session (so its children die with the group)."""
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _stop(procs):
    """SIGTERM each process group, then SIGKILL whatever is left after 10 s."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:  # the group too: a worker process whose nanny already exited
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            p.wait(5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two single-threaded workers, started as ``dask scheduler`` and
    ``dask worker`` on 127.0.0.1 with OS-chosen ports; yields the scheduler address."""
    root = tmp_path_factory.mktemp("dask_cluster")
    sched_file = root / "scheduler.json"
    procs = []
    try:
        procs.append(_start([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1",
                             "--port", "0", "--no-dashboard", "--scheduler-file",
                             str(sched_file)], root / "scheduler.log"))
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            if procs[0].poll() is not None:
                break
            time.sleep(0.1)
        assert sched_file.exists(), (root / "scheduler.log").read_text()[-3000:]
        address = json.loads(sched_file.read_text())["address"]
        for k in range(2):
            procs.append(_start([sys.executable, "-m", "dask", "worker", address,
                                 "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                                 "--name", f"lamost-worker-{k}", "--local-directory",
                                 str(root / f"w{k}")], root / f"worker{k}.log"))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
        yield address
    finally:
        _stop(procs)
        alive = [p.pid for p in procs if p.poll() is None]
        assert not alive, f"processes still alive after the test: {alive}"


def test_inference_through_a_command_line_cluster_equals_the_in_process_run(
        survey, cluster, tmp_path, record_property):
    root, lamost = survey
    ctx = catalog.load_context(root)
    serial = catalog.run_inference(root / "survey.zarr", ctx, lamost_catalog=lamost,
                                   parts_dir=tmp_path / "serial", chunk_size=CHUNK, n_workers=1,
                                   progress=False)
    t = time.perf_counter()
    remote = catalog.run_inference(root / "survey.zarr", ctx, lamost_catalog=lamost,
                                   parts_dir=tmp_path / "remote", chunk_size=CHUNK,
                                   scheduler_address=cluster, progress=False)
    seconds = time.perf_counter() - t
    assert serial.executor == "serial" and remote.executor == "dask"
    assert remote.n_workers == 2 and remote.chunks_run == remote.n_chunks == -(-N_OBS // CHUNK)
    assert remote.peak_memory_mb_per_worker > 0
    a = catalog.read_parts(tmp_path / "serial", serial.n_chunks)
    b = catalog.read_parts(tmp_path / "remote", remote.n_chunks)
    assert len(b) == N_OBS and b["obsid"].is_unique and (b["row"] == np.arange(N_OBS)).all()
    assert list(a.columns) == list(b.columns)
    floats = [c for c in a.columns if a[c].dtype.kind == "f"]
    others = [c for c in a.columns if c not in floats]
    pd.testing.assert_frame_equal(a[others], b[others], check_exact=True)
    pd.testing.assert_frame_equal(a[floats], b[floats], check_exact=False, rtol=1e-9, atol=0)
    fitted = (b["flag"] & catalog.FLAG_NO_PIXELS) == 0
    assert fitted.sum() == N_OBS - 1 and np.isfinite(b.loc[fitted, "teff"]).all()
    # the per-worker rate of this small run (start-up of the tasks included), for the README
    record_property("obs_per_s_per_worker", round(N_OBS / seconds / remote.n_workers, 1))
    record_property("serial_obs_per_s", round(serial.obs_per_s, 1))
    # the same cluster resumes: a second call finds every part done and runs nothing
    again = catalog.run_inference(root / "survey.zarr", ctx, lamost_catalog=lamost,
                                  parts_dir=tmp_path / "remote", chunk_size=CHUNK,
                                  scheduler_address=cluster, progress=False)
    assert again.chunks_run == 0 and again.chunks_done_before == remote.n_chunks
