"""End-to-end benchmark from files: the whole path a user runs, on >= 100,000 mock LAMOST files.

What is measured
    ``ingest`` (``.fits.gz`` files -> continuum-normalised spectra store, 2 worker processes)
    -> ``label`` (:func:`lamostcannon.catalog.run_inference` on a 2-worker Dask LocalCluster,
    cluster start-up included, then :func:`~lamostcannon.catalog.assemble_observations` with
    ``stream=True``, part by part) -> the streaming per-star stages of
    :func:`~lamostcannon.catalog.build_catalog` (``stream=True``, buckets of ``--bucket-rows``
    observations, interleaved bucket by bucket and accounted per stage): ``partition`` (the
    observations into Parquet buckets by star) -> ``combine`` (repeat combination,
    :func:`~lamostcannon.catalog.combine_repeats`) -> ``gaia`` (1 arcsec join with the Gaia
    sources, :class:`~lamostcannon.catalog.GaiaIndex`) -> ``kinematics`` (Galactocentric
    positions, velocities and actions, :func:`~lamostcannon.catalog.add_kinematics`) ->
    ``table1`` (the Table 1 columns, units and descriptions, appended to the FITS and Parquet
    files). Per stage: wall seconds, CPU seconds of every
    process of the stage, rate, peak resident memory per process and of all the stage's
    processes together (sampled every 50 ms; the parent's exact ``VmHWM``), the disk its
    products take, and the load average of the machine before and after (the machine may be
    shared: wall figures move with the load, CPU figures much less).

The input
    A mock universe written by :func:`lamostcannon.mock.generate` (``n_lamost`` observations,
    seed 2020) under its own data root, ``data/bench/e2e_<n>/`` (``LAMOSTCANNON_DATA`` points
    there for the whole run, so the notebooks' ``data/raw/mock`` is never touched). It is reused
    when complete (the mock's manifest says so); ``--clean`` removes it at the end. 100,000
    spectra take ~3.4 GB. The Cannon models are the notebooks' (``data/processed/model_*``,
    copied) when they exist, otherwise trained here on this mock's reference set with the
    notebooks' calls (cleaning -> reference spectra -> training); their time is reported as
    set-up, not as a stage.

Projection
    ``e2e_projected_hours_4p5M`` = sum over the stages of seconds per observation x 4.5 million,
    with the one-time costs counted once, not per observation (``fixed_seconds`` and
    ``fixed_cpu_seconds`` of a stage): the set-up of galpy's action finder, and the start-up
    of ingest (spawning the worker processes, their imports, numba's compiled kernels) and of
    the label stage (the Dask cluster, each worker's imports, compiled kernels and density
    grid), each measured as the intercept of its cost against observations: the stage is run
    a second time, in a fresh process, on its first files (ingest: ``--ingest-start`` files,
    default 8,192) or its first ``2 x workers`` chunks (label) (``fixed_from`` in the
    result). Both ingest runs use the compiled kernels from their first spectrum
    (``LAMOSTCANNON_RESAMPLE_AFTER=0``), so that the two sizes share one rate; a survey run
    switches to them after 10,000 spectra per worker, ~1.5 s of CPU more in all (20,000
    spectra at ~0.075 ms), which the projection leaves out. Memory: the ingest and
    labelling stages hold one chunk per process (bounded by the chunk size); the per-star stages
    hold one bucket (``bucket_mb``, flat in N when the run has more than one bucket), plus the
    process base and the Gaia index and distances (``reference_mb``, which scales with the Gaia
    sources and is projected linearly): ``per_star_memory`` in the result. Run at two sizes
    with the same ``--bucket-rows`` to see the bucket term stay flat.

Baseline measured in the same run: the plain ``astropy.io.fits`` + numpy loop of
``bench_ingest.py`` on ``--plain`` of the same files (the test step against TheCannon 0.7.3 is
``bench_cannon.py``'s).

Besides the wall-clock projection, ``e2e_projected_hours_4p5M_from_cpu`` estimates what the same
work takes on otherwise idle cores (each stage's CPU seconds over the processes that share
it): on a shared machine the wall clock measures the other jobs as much as ours.

Run: ``python benchmarks/bench_e2e.py`` (``--n 101000`` asks the mock for 101,000 observations
and gets a little over 100,000 files, 3.4 GB; ~5 min to write them once, then ~5-10 min a run)
or ``--quick`` (5,000 spectra, ~2 min). Writes ``benchmarks/results/e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = HERE / "results" / "e2e.json"
N_SURVEY = 4_500_000
log = logging.getLogger("bench_e2e")


# ------------------------------------------------------------------------------------------------
# Measurement helpers (used inside the stage processes)
# ------------------------------------------------------------------------------------------------

class TreeMemory:
    """Samples the resident memory of this process and all its descendants every ``interval``
    seconds: the peak of each process and the peak of their sum."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._me = psutil.Process()
        self.interval = interval
        self.peak_by_pid: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.peak_total = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = 0.0
        try:
            procs = [self._me, *self._me.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                rss = p.memory_info().rss / 2 ** 20
            except psutil.Error:
                continue
            total += rss
            if rss > self.peak_by_pid.get(p.pid, 0.0):
                self.peak_by_pid[p.pid] = rss
                if p.pid not in self.names:
                    try:
                        cmd = " ".join(p.cmdline()[1:4])
                    except psutil.Error:
                        cmd = "?"
                    self.names[p.pid] = cmd
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict:
        me = os.getpid()
        others = {pid: mb for pid, mb in self.peak_by_pid.items() if pid != me}
        return {"peak_mb_parent": round(_hwm_mb(), 1),
                "peak_mb_per_child_max": round(max(others.values()), 1) if others else 0.0,
                "n_child_processes": len(others),
                "peak_mb_total": round(self.peak_total, 1)}


def _hwm_mb() -> float:
    """Peak resident memory of this process (``VmHWM``) in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    """Resident memory of this process now (``VmRSS``) in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that have exited (waited for)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _disk_bytes(*paths_) -> int:
    total = 0
    for p in paths_:
        p = Path(p)
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process, load average before/after)."""
    load0 = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c, (load0, os.getloadavg()[0])


# ------------------------------------------------------------------------------------------------
# Stage processes
# ------------------------------------------------------------------------------------------------

def stage_mock(n: int) -> dict:
    """Write (or find complete) the mock universe under this run's data root."""
    from lamostcannon import mock, paths

    t = time.perf_counter()
    out = mock.generate(out_dir=paths.raw_dir("mock"), size="small", seed=2020, n_lamost=n,
                        progress=False)
    spectra = out / "lamost" / "spectra"
    return {"seconds": time.perf_counter() - t, "folder": str(out),
            "n_files": sum(1 for _ in spectra.glob("*.fits.gz")),
            "spectra_disk_bytes": _disk_bytes(spectra)}


def stage_models(notebook_models: str) -> dict:
    """The dwarf and giant models in ``processed/``: the notebooks' or trained here."""
    from lamostcannon import cannon, cleaning, labels, paths

    processed = paths.ensure(paths.processed_dir())
    src = Path(notebook_models)
    found = {g: sorted(src.glob(f"model_{g}.*")) for g in ("dwarf", "giant")}
    t = time.perf_counter()
    if notebook_models and all(found.values()):
        for g, files in found.items():
            shutil.copy(files[0], processed / files[0].name)
            extrap = src / f"extrapolation_{g}.json"
            if extrap.exists():
                shutil.copy(extrap, processed / extrap.name)
        return {"models": f"the notebooks' ({src})", "seconds": time.perf_counter() - t}
    mine = processed / "trained_here.json"
    import hashlib

    mock_id = hashlib.sha256((paths.raw_dir() / "manifest.json").read_bytes()).hexdigest()
    if (mine.exists() and all((processed / f"model_{g}.fits").exists() for g in found)
            and json.loads(mine.read_text()).get("mock_manifest_sha256") == mock_id):
        return {**json.loads(mine.read_text()), "seconds": 0.0, "reused": True}
    raw = paths.raw_dir()
    reference, _ = cleaning.build_reference_set(raw)
    n_giant = int(sum(reference["giant"]))
    if min(n_giant, len(reference) - n_giant) >= 3 * cannon.n_terms(len(labels.GIANT_LABELS)):
        cleaning.write_reference_set(reference)
        cleaning.ingest_reference_spectra(reference, raw, progress=False)
        sizes = {}
        for group, giant in (("dwarf", False), ("giant", True)):
            table, flux, ivar, wave = cleaning.load_training_set(giant, reference)
            names = labels.model_labels(giant)
            errors = None if giant else cleaning.training_label_errors(table, names)  # as notebook 03
            model = cannon.CannonModel(names, wavelength=wave).train(
                table, flux, ivar, label_errors=errors)
            model.write(processed / f"model_{group}.fits", overwrite=True)
            sizes[group] = len(table)
        how = "this mock's reference set"
    else:  # a small mock (--quick) has too few reference stars for 55-66 terms
        sizes = _train_on_truth(processed)
        how = "this mock's LAMOST spectra with S/N(z) > 30 and their true labels (the " \
              "reference set is too small at this size)"
    info = {"models": f"trained here on {how} ({sizes['dwarf']} dwarfs, "
                      f"{sizes['giant']} giants)", "seconds": time.perf_counter() - t,
            "mock_manifest_sha256": mock_id}
    mine.write_text(json.dumps(info))
    return info


def _train_on_truth(processed: Path, per_group: int = 1200) -> dict:
    """Models from the mock's own spectra at their true labels (``s_fe`` = mean of Ba and Y)."""
    import numpy as np
    import pandas as pd
    from astropy.table import Table

    from lamostcannon import cannon, labels, paths, spectra

    raw = paths.raw_dir()
    cat = Table.read(raw / "lamost" / "catalog.fits").to_pandas()
    truth = Table.read(raw / "truth" / "truth.fits")
    keep = [c for c in truth.colnames if truth[c].ndim == 1]
    truth = truth[keep].to_pandas().drop_duplicates("designation")
    truth["s_fe"] = 0.5 * (truth["ba_fe"] + truth["y_fe"])
    for df in (cat, truth):
        df["designation"] = df["designation"].astype(str).str.strip()
    good = cat[cat["snrz"] > 30].drop_duplicates("designation").merge(
        truth, on="designation", suffixes=("", "_true"))
    good["filename"] = good["filename"].astype(str).str.strip()
    giant = np.asarray(labels.is_giant(good["teff_true"], good["logg_true"]), bool)
    sizes = {}
    for group, is_giant in (("dwarf", False), ("giant", True)):
        rows = good[giant == is_giant].head(per_group)
        spec = [spectra.read_lamost(raw / "lamost" / "spectra" / f) for f in rows["filename"]]
        flux, ivar = spectra.preprocess_many(spec)
        names = labels.model_labels(is_giant)
        table = pd.DataFrame({n: rows[f"{n}_true" if f"{n}_true" in rows else n].to_numpy()
                              for n in names})
        model = cannon.CannonModel(names, wavelength=spectra.common_wavelength()).train(
            table, flux, ivar)
        model.write(processed / f"model_{group}.fits", overwrite=True)
        sizes[group] = len(rows)
    return sizes


def _mock_files() -> list[Path]:
    import numpy as np
    from astropy.table import Table

    from lamostcannon import paths

    raw = paths.raw_dir()
    names = np.asarray(Table.read(raw / "lamost" / "catalog.fits")["filename"], dtype=str)
    return [raw / "lamost" / "spectra" / name for name in names]


def stage_ingest(n_workers: int, n_files: int = 0) -> dict:
    """Ingest the mock's files (the first ``n_files`` only when > 0: the short run whose store
    is removed afterwards)."""
    from lamostcannon import paths
    from lamostcannon.store import ingest

    files = _mock_files()
    store = paths.interim_dir() / "survey_spectra.zarr"
    if n_files > 0:
        files = files[:n_files]
        store = paths.interim_dir() / "survey_spectra_start.zarr"
    shutil.rmtree(store, ignore_errors=True)
    c0 = _cpu_s()
    with TreeMemory() as mem:
        report, wall, _, load = _timed(lambda: ingest(files, store, n_workers=n_workers,
                                                      progress=False))
    cpu = _cpu_s() - c0
    counts = report["status"].value_counts().to_dict()
    out = {"n_in": len(files), "n_out": int(counts.get("stored", 0)), "status": counts,
           "seconds": wall, "cpu_seconds": cpu, "load": load, **mem.summary(),
           "disk_bytes": _disk_bytes(store)}
    if n_files > 0:
        shutil.rmtree(store, ignore_errors=True)
        out = {k: out[k] for k in ("n_in", "n_out", "seconds", "cpu_seconds", "load")}
    return out


def stage_label(n_workers: int, chunk_size: int) -> dict:
    from lamostcannon import catalog, paths

    store = paths.interim_dir() / "survey_spectra.zarr"
    parts = paths.interim_dir() / "catalog_parts"
    shutil.rmtree(parts, ignore_errors=True)
    ctx = catalog.load_context()
    c0 = _cpu_s()
    with TreeMemory() as mem:
        def run():
            rep = catalog.run_inference(store, ctx, parts_dir=parts, chunk_size=chunk_size,
                                        n_workers=n_workers, overwrite=True, progress=False)
            t = time.perf_counter()
            path = catalog.assemble_observations(rep.parts_dir, rep.n_chunks, stream=True)
            return rep, path, time.perf_counter() - t

        (rep, path, assemble_s), wall, _, load = _timed(run)
    # driver and workers: the LocalCluster's worker processes are this process's children and
    # were waited for when run_inference closed the cluster
    cpu = _cpu_s() - c0
    import pyarrow.parquet as pq

    out = paths.processed_dir() / "labels_per_observation.parquet"
    return {"n_in": rep.n_obs, "n_out": pq.ParquetFile(path).metadata.num_rows, "seconds": wall,
            "cpu_seconds": cpu, "load": load, "executor": rep.executor,
            "n_workers": rep.n_workers, "assemble_seconds": assemble_s,
            "cluster_start_seconds": getattr(rep, "cluster_start_seconds", None),
            "peak_mb_per_worker_exact": round(rep.peak_memory_mb_per_worker, 1),
            **mem.summary(), "disk_bytes": _disk_bytes(parts, out)}


def stage_label_start(n_workers: int, chunk_size: int, n_chunks: int) -> dict:
    """The label stage on its first ``n_chunks`` chunks only (a fresh process and cluster, as
    the full stage): with the full stage's figures, the cost a run pays once whatever its size
    (the cluster's start-up, each worker's imports, compiled kernels and density grid) is the
    intercept of cost against observations, and only the slope scales to 4.5 million."""
    from lamostcannon import catalog, paths

    store = paths.interim_dir() / "survey_spectra.zarr"
    parts = paths.interim_dir() / "catalog_parts_start"
    shutil.rmtree(parts, ignore_errors=True)
    ctx = catalog.load_context()
    c0 = _cpu_s()
    rep, wall, _, load = _timed(lambda: catalog.run_inference(
        store, ctx, parts_dir=parts, chunk_size=chunk_size, n_workers=n_workers,
        overwrite=True, progress=False, max_chunks=n_chunks))
    cpu = _cpu_s() - c0
    import pyarrow.parquet as pq

    n = sum(pq.ParquetFile(f).metadata.num_rows for f in parts.glob("*.parquet"))
    shutil.rmtree(parts, ignore_errors=True)
    return {"n_in": n, "n_chunks": n_chunks, "seconds": wall, "cpu_seconds": cpu, "load": load,
            "cluster_start_seconds": getattr(rep, "cluster_start_seconds", None)}


def _intercept(full: dict, short: dict) -> tuple[float, float, float, float]:
    """(fixed wall s, fixed CPU s, wall s per observation, CPU s per observation) from a stage
    run at two sizes: cost = fixed + rate x observations. The fixed parts are clamped to
    [0, the short run's cost] (noise on a shared machine must not make them negative)."""
    dn = full["n_in"] - short["n_in"]
    out = []
    for key in ("seconds", "cpu_seconds"):
        rate = (full[key] - short[key]) / dn
        out.append(min(max(short[key] - rate * short["n_in"], 0.0), short[key]))
    return (out[0], out[1], (full["seconds"] - out[0]) / full["n_in"],
            (full["cpu_seconds"] - out[1]) / full["n_in"])


def stage_catalogue(bucket_rows: int) -> dict:
    """partition -> combine -> gaia -> kinematics -> table1: the streaming per-star stages
    (:func:`lamostcannon.catalog.build_catalog` with ``stream=True`` on the per-observation
    Parquet file) in one process; per stage the wall and CPU seconds summed over the buckets
    and the peak resident memory of the process while it ran (largest over the buckets)."""
    import pyarrow.parquet as pq

    from lamostcannon import catalog, paths

    obs = paths.processed_dir() / "labels_per_observation.parquet"
    gaia_dir = paths.raw_dir() / "gaia"
    # one-time costs (importing galpy, setting up the Staeckel action finder), counted once
    t, c = time.perf_counter(), time.process_time()
    from galpy.orbit import Orbit  # noqa: F401

    from lamostcannon import kinematics

    kinematics.action_angle()
    warm, warm_cpu = time.perf_counter() - t, time.process_time() - c
    base_mb = _rss_mb()  # after the imports, before any table: what does not scale
    fits_path = paths.processed_dir() / "catalog.fits"
    parquet_path = paths.processed_dir() / "catalog.parquet"
    bucket_dir = paths.interim_dir() / "catalog_buckets"
    shutil.rmtree(bucket_dir, ignore_errors=True)
    n_obs = pq.ParquetFile(obs).metadata.num_rows
    from astropy.io import fits

    with fits.open(gaia_dir / "gaia_source.fits") as h:
        n_gaia = int(h[1].header["NAXIS2"])
    result, wall, _, load = _timed(lambda: catalog.build_catalog(
        obs, gaia=gaia_dir / "gaia_source.fits", distances=gaia_dir / "distances.fits",
        fits_path=fits_path, parquet_path=parquet_path, stream=True, bucket_dir=bucket_dir,
        bucket_rows=bucket_rows, track_memory=True))
    stars = pq.read_table(parquet_path, columns=["source_id", "R"]).to_pandas()
    n_out = {"partition": n_obs, "combine": result.n_stars,
             "gaia": int((stars["source_id"] != catalog.NO_SOURCE_ID).sum()),
             "kinematics": int(stars["R"].notna().sum()), "table1": result.n_stars}
    n_in = {"partition": n_obs, "combine": n_obs, "gaia": result.n_stars,
            "kinematics": result.n_stars, "table1": result.n_stars}
    out = {}
    for name in ("partition", "combine", "gaia", "kinematics", "table1"):
        peak = result.stage_peak_rss_mb[name]
        out[name] = {"n_in": n_in[name], "n_out": n_out[name],
                     "seconds": result.stage_seconds[name],
                     "cpu_seconds": result.stage_cpu_seconds[name], "load": load,
                     "peak_mb_parent": round(peak, 1), "peak_mb_total": round(peak, 1),
                     "base_mb": round(base_mb, 1),
                     "reference_mb": round(result.reference_mb, 1),
                     "reference_nbytes": result.reference_nbytes,
                     "n_gaia_sources": n_gaia,
                     "bucket_rows": bucket_rows, "n_buckets": result.n_buckets}
    out["partition"]["disk_bytes"] = _disk_bytes(bucket_dir)
    out["kinematics"]["seconds"] += warm
    out["kinematics"]["fixed_seconds"] = warm
    out["kinematics"]["cpu_seconds"] += warm_cpu
    out["kinematics"]["fixed_cpu_seconds"] = warm_cpu
    # galpy's action loops run on OpenMP threads: the stage keeps that many cores busy
    out["kinematics"]["threads"] = kinematics.openmp_threads()
    out["table1"]["disk_bytes"] = _disk_bytes(fits_path, parquet_path)
    out["table1"]["catalogue_wall_seconds"] = wall
    return out


def stage_plain(n_files: int) -> dict:
    """The plain astropy + numpy loop of bench_ingest.py on the first mock files."""
    sys.path.insert(0, str(HERE))
    from bench_ingest import plain_loop

    return plain_loop(_mock_files()[:n_files])


STAGES = {"mock": stage_mock, "models": stage_models, "ingest": stage_ingest,
          "label": stage_label, "label_start": stage_label_start, "catalogue": stage_catalogue,
          "plain": stage_plain}


def _run_stage(name: str, env: dict, *args, timeout: float = 7200, label: str = "") -> dict:
    """Run one stage in a fresh Python process (its memory and CPU are its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, *map(str, args)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench_e2e: stage {name} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("  %s: %.1f s (process %.1f s)", label or name, out.get("seconds", float("nan")),
             time.perf_counter() - t)
    return out


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------

def _default_bucket_rows() -> int:
    sys.path.insert(0, str(ROOT))
    from lamostcannon import catalog

    return catalog.BUCKET_ROWS


def _memory_projection(v: dict, n_obs: int) -> dict:
    """Peak memory of a streaming per-star stage at 4.5 million observations: the process base
    and one bucket stay (flat in N when the run had more than one bucket, else scaled
    linearly, as the whole table was one bucket); the arrays of the Gaia index and distances
    (``reference_nbytes``) scale with the number of Gaia sources, taken proportional to the
    observations; the rest of their measured resident memory is counted once."""
    scale = N_SURVEY / n_obs
    reference = max(v["reference_mb"], 0.0)
    arrays = v.get("reference_nbytes", 0) / 2 ** 20
    bucket = max(v["peak_mb_total"] - v["base_mb"] - reference, 0.0)
    bounded = v["n_buckets"] > 1
    return {"bucket_mb": round(bucket, 1), "memory_bounded_by_bucket": bounded,
            "peak_mb_projected_4p5M": round(v["base_mb"] + max(reference - arrays, 0.0)
                                            + arrays * scale
                                            + (bucket if bounded else bucket * scale))}


def _per_star_memory(stages: dict, n_obs: int) -> dict:
    per = {k: v for k, v in stages.items() if "base_mb" in v}
    if not per:
        return {}
    any_ = next(iter(per.values()))
    return {"bucket_rows": any_["bucket_rows"], "n_buckets": any_["n_buckets"],
            "n_observations": n_obs, "base_mb": any_["base_mb"],
            "reference_mb": any_["reference_mb"], "n_gaia_sources": any_["n_gaia_sources"],
            "reference_array_bytes_per_gaia_source": round(
                any_.get("reference_nbytes", 0) / max(any_["n_gaia_sources"], 1), 1),
            "peak_mb_by_stage": {k: v["peak_mb_total"] for k, v in per.items()},
            "bucket_mb_by_stage": {k: v["bucket_mb"] for k, v in per.items()},
            "peak_mb_projected_4p5M_by_stage": {k: v["peak_mb_projected_4p5M"]
                                                for k, v in per.items()},
            "bounded": any_["n_buckets"] > 1}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=101_000,
                        help="LAMOST observations asked of the mock (101,000 gives > 100,000 files)")
    parser.add_argument("--quick", action="store_true", help="5,000 observations (check the script)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--plain", type=int, default=200, help="files for the astropy loop")
    parser.add_argument("--ingest-start", type=int, default=8192,
                        help="files of the short ingest run that measures ingest's start-up")
    parser.add_argument("--bucket-rows", type=int, default=None,
                        help="observations per bucket of the streaming per-star stages "
                             "(default lamostcannon.catalog.BUCKET_ROWS)")
    parser.add_argument("--root", type=Path, default=ROOT / "data" / "bench",
                        help="folder of the benchmark's own data roots (ignored by git)")
    parser.add_argument("--models", default=str(ROOT / "data" / "processed"),
                        help="folder with the notebooks' model_{dwarf,giant}.*; '' trains here")
    parser.add_argument("--clean", action="store_true",
                        help="remove this run's data root (mock included) at the end")
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        name, *rest = args.stage
        fn = STAGES[name]
        conv = [int(x) if x.lstrip("-").isdigit() else x for x in rest]
        print(json.dumps(fn(*conv), default=float))
        return {}

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n = 5000 if args.quick else args.n
    data_root = (args.root / f"e2e_{n}").resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    need = n * 40_000 + n * 30_000  # the mock's spectra + the store (bytes, with margin)
    free = shutil.disk_usage(data_root).free
    have_mock = (data_root / "raw" / "mock" / "manifest.json").exists()
    if free < (need if not have_mock else n * 30_000):
        raise SystemExit(f"bench_e2e: {free / 1e9:.1f} GB free under {data_root}, need about "
                         f"{need / 1e9:.1f} GB for {n} spectra; use --root or --n")
    env = dict(os.environ, LAMOSTCANNON_DATA=str(data_root), LAMOSTCANNON_SOURCE="mock",
               LAMOSTCANNON_SIZE="small", LAMOSTCANNON_SEED="2020",
               LAMOSTCANNON_WORKERS=str(args.workers), PYTHONPATH=str(ROOT))
    t_all = time.perf_counter()
    log.info("bench_e2e: %d observations under %s (load %.1f)", n, data_root, os.getloadavg()[0])
    mock = _run_stage("mock", env, n)
    models = _run_stage("models", env, args.models)
    stages = {}
    log.info("stages (%d workers):", args.workers)
    # both ingest runs compile the kernels at once (module docstring, Projection)
    env_ingest = dict(env, LAMOSTCANNON_RESAMPLE_AFTER="0")
    stages["ingest"] = _run_stage("ingest", env_ingest, args.workers)
    ingest_start = _run_stage("ingest", env_ingest, args.workers,
                              min(args.ingest_start, n // 4), label="ingest_start")
    stages["label"] = _run_stage("label", env, args.workers, args.chunk_size)
    label_start = _run_stage("label_start", env, args.workers, args.chunk_size,
                             2 * args.workers)
    bucket_rows = args.bucket_rows or _default_bucket_rows()
    stages.update(_run_stage("catalogue", env, bucket_rows))
    plain = _run_stage("plain", env, args.plain)

    n_obs = stages["ingest"]["n_in"]
    # the label stage's one-time cost (cluster start-up, each worker's imports, compiled kernels
    # and density grid: ~1.5 s of CPU per worker) from the stage run at two sizes
    fixed_wall, fixed_cpu_label, _, _ = _intercept(stages["label"], label_start)
    stages["label"].update(fixed_seconds=fixed_wall, fixed_cpu_seconds=fixed_cpu_label,
                           fixed_from={"short_run": label_start,
                                       "method": "intercept of cost against observations, "
                                                 "the stage run on its first chunks and on all"})
    # ingest's one-time cost (worker processes, their imports, numba's kernels), the same way
    fixed_wall, fixed_cpu_ingest, _, _ = _intercept(stages["ingest"], ingest_start)
    stages["ingest"].update(fixed_seconds=fixed_wall, fixed_cpu_seconds=fixed_cpu_ingest,
                            fixed_from={"short_run": ingest_start,
                                        "method": "intercept of cost against observations, "
                                                  "the stage run on its first files and on all"})
    seconds = {k: v["seconds"] for k, v in stages.items()}
    fixed = {k: float(v.get("fixed_seconds", 0.0)) for k, v in stages.items()}
    projected = {k: (seconds[k] - fixed[k]) / n_obs * N_SURVEY + fixed[k] for k in stages}
    for k, v in stages.items():
        v["rate_per_s"] = round(v["n_in"] / v["seconds"], 1)
        v["projected_hours_4p5M"] = round(projected[k] / 3600, 4)
        if "base_mb" in v:  # per-star stages (streaming): see _memory_projection
            v.update(_memory_projection(v, n_obs))
    total_hours = sum(projected.values()) / 3600
    # The same from CPU time: what the stages would take on otherwise idle cores, if each kept
    # its processes busy (ingest and labelling: the workers, so cpu / workers; the per-star
    # stages run in one process, kinematics on galpy's OpenMP threads). An estimate for a loaded
    # machine, never a measurement.
    cores = {k: (args.workers if k in ("ingest", "label")
                 else max(1, min(int(v.get("threads", 1)), os.cpu_count() or 1)))
             for k, v in stages.items()}
    # one-time CPU: the stage's own figure when it has one (galpy's set-up), else its wall
    fixed_cpu = {k: float(v.get("fixed_cpu_seconds", fixed[k] * cores[k]))
                 for k, v in stages.items()}
    idle = {k: (stages[k]["cpu_seconds"] - fixed_cpu[k]) / cores[k] / n_obs * N_SURVEY
            + fixed_cpu[k] / cores[k] for k in stages}
    idle_hours = sum(idle.values()) / 3600
    ingest_rate = stages["ingest"]["rate_per_s"]
    result = {
        "n_observations": n_obs,
        "n_stars": stages["combine"]["n_out"],
        "e2e_seconds": round(sum(seconds.values()), 1),
        "e2e_rate_obs_per_s": round(n_obs / sum(seconds.values()), 1),
        "e2e_projected_hours_4p5M": round(total_hours, 3),
        "target_hours_4p5M": 0.75,
        "meets_target": total_hours <= 0.75,
        "e2e_projected_hours_4p5M_from_cpu": round(idle_hours, 3),
        "stage_projected_hours_4p5M_from_cpu": {k: round(v / 3600, 4) for k, v in idle.items()},
        "stage_cpu_ms_per_obs": {k: round(v["cpu_seconds"] / n_obs * 1e3, 4)
                                 for k, v in stages.items()},
        "load_average_during_stages": [round(min(v["load"][0] for v in stages.values()), 2),
                                       round(max(v["load"][1] for v in stages.values()), 2)],
        "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "stage_rate_per_s": {k: v["rate_per_s"] for k, v in stages.items()},
        "stage_projected_hours_4p5M": {k: v["projected_hours_4p5M"] for k, v in stages.items()},
        "per_star_memory": _per_star_memory(stages, n_obs),
        "stages": stages,
        "ingest_vs_plain_astropy": round(ingest_rate / plain["spectra_per_s"], 1),
        "plain_astropy_spectra_per_s": round(plain["spectra_per_s"], 1),
        "plain_astropy": plain,
        "setup": {"mock": mock, "models": models},
        "workers": args.workers, "chunk_size": args.chunk_size, "bucket_rows": bucket_rows,
        "data_root": str(data_root),
        "notes": "Wall-clock seconds per stage, each stage in its own process; the machine may "
                 "be shared (load per stage: [before, after] 1-min load average). Projection: "
                 "per-observation seconds x 4.5e6, the label stage's start-up (intercept of two "
                 "sizes) and galpy's set-up once. Memory: "
                 "ingest and labelling hold one chunk per process; the per-star stages stream "
                 "buckets of bucket_rows observations (build_catalog(stream=True)): their peak "
                 "is base + the Gaia index and distances (reference_mb, ~linear in the Gaia "
                 "sources, projected linearly) + one bucket (flat in N once there is more than "
                 "one bucket); per_star_memory says which.",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg_end": os.getloadavg()},
        "benchmark_wall_s": round(time.perf_counter() - t_all, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    lines = [f"{'stage':12s} {'seconds':>9s} {'obs/s':>9s} {'4.5M h':>8s} {'peak MB':>9s} "
             f"{'disk MB':>9s}  load"]
    for k, v in stages.items():
        lines.append(f"{k:12s} {v['seconds']:9.2f} {v['rate_per_s']:9.0f} "
                     f"{v['projected_hours_4p5M']:8.3f} {v.get('peak_mb_total', 0):9.0f} "
                     f"{v.get('disk_bytes', 0) / 1e6:9.1f}  {v['load'][0]:.1f}-{v['load'][1]:.1f}")
    lines.append(f"e2e: {n_obs} observations in {result['e2e_seconds']} s; projected "
                 f"{total_hours:.3f} h for 4.5 million (target 0.75 h; {idle_hours:.3f} h "
                 f"from CPU time, i.e. on idle cores); ingest "
                 f"{result['ingest_vs_plain_astropy']}x the plain astropy loop "
                 f"({plain['spectra_per_s']:.1f}/s) in the same run")
    print("\n".join(lines))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=float) + "\n")
    log.info("wrote %s", args.output)
    if args.clean:
        shutil.rmtree(data_root, ignore_errors=True)
        log.info("removed %s", data_root)
    else:  # keep the mock and the models for the next run; the products are rebuilt each time
        for product in ("interim/survey_spectra.zarr", "interim/catalog_parts",
                        "interim/catalog_buckets",
                        "processed/labels_per_observation.parquet", "processed/catalog.fits",
                        "processed/catalog.parquet"):
            path = data_root / product
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True)
    return result


if __name__ == "__main__":
    main()
