"""Benchmark: LAMOST DR10 ``.fits.gz`` files -> continuum-normalised spectra in a SpectraStore.

End-to-end ingest throughput (read, mask, rest frame, resample, continuum-normalise, write to
Zarr + Parquet, commit) on 2 worker processes and on 1 core, against a straightforward loop
measured in the same run on a subset: ``astropy.io.fits.open`` per file, then per spectrum
numpy ``interp`` onto the grid and the Gaussian continuum as a dense 3909 x 3909 weight matrix
times the spectrum (the approach of TheCannon's LAMOST code), results kept in memory (no store
writes are charged to it).

The real files are repeated to reach the volume (obsid deduplication and resume skipping are
off, so every repeat is stored). Each configuration runs in a fresh subprocess so that its peak
memory (max RSS of the parent and of each worker) is its own.

Run: ``python benchmarks/bench_ingest.py [--files 20000] [--files-1core 6000] [--plain 200]``
(20,000 files so that starting the two workers, ~0.4 s, is a few per cent of the run), or
``--quick`` (3,000 / 1,500 / 50).

``--baseline DIR`` (a folder holding another version's ``lamostcannon/`` package, e.g. a
``git worktree`` of an earlier commit) also measures that version in the same run, alternating
with this one: the per-stage CPU on one core (best of 3, twice each) and the CPU per spectrum
of a 2-worker ingest of ``--files-baseline`` files (default 4,000; parent and workers, twice
each), and reports the ratios new / baseline (``baseline`` in the results). CPU time, not wall
time, so that a loaded machine changes the ratio little.
Writes ``benchmarks/results/ingest.json``. Needs the real spectra (``LAMOSTCANNON_LAMOST_DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "ingest.json"
log = logging.getLogger("bench_ingest")


def _dr10_files():
    from lamostcannon import paths

    folder = paths.real_lamost_dir() / "dr10"
    files = sorted(folder.glob("*.fits.gz"))
    if not files:
        raise SystemExit(f"no DR10 files in {folder}; set LAMOSTCANNON_LAMOST_DIR")
    return files


def _repeat(files, n):
    return [files[i % len(files)] for i in range(n)]


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _cpu_parent_s() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    return a.ru_utime + a.ru_stime


def _max_rss_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: kB


def _package() -> str:
    import lamostcannon

    return str(Path(lamostcannon.__file__).resolve().parent)


def child_ingest(n_files: int, n_workers: int) -> dict:
    """One ingest run (in its own process)."""
    from lamostcannon.store import SpectraStore, ingest

    files = _repeat(_dr10_files(), n_files)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        t0, c0, p0 = time.perf_counter(), _cpu_s(), _cpu_parent_s()
        report = ingest(files, tmp / "bench.zarr", n_workers=n_workers, progress=False,
                        deduplicate=False, skip_existing=False)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
        cpu_parent = _cpu_parent_s() - p0
        store = SpectraStore(tmp / "bench.zarr")
        stored = len(store)
        assert stored == n_files == int((report["status"] == "stored").sum()), stored
        disk = sum(f.stat().st_size for f in (tmp / "bench.zarr").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"n_files": n_files, "n_workers": n_workers, "wall_s": wall,
            "cpu_parent_s": cpu_parent, "cpu_children_s": cpu - cpu_parent,
            "spectra_per_s": stored / wall, "spectra_per_cpu_s": stored / cpu,
            "disk_bytes_per_spectrum": disk / stored,
            "max_rss_parent_mb": _max_rss_mb(resource.RUSAGE_SELF),
            "max_rss_worker_mb": _max_rss_mb(resource.RUSAGE_CHILDREN) if n_workers > 1 else 0.0,
            "package": _package()}


def child_plain(n_files: int) -> dict:
    """The straightforward loop on the DR10 files (repeated to ``n_files``)."""
    return plain_loop(_repeat(_dr10_files(), n_files))


def plain_loop(files) -> dict:
    """The straightforward loop: astropy read + per-spectrum numpy normalisation.

    Reads DR10 (COADD table) and DR4-9 (5 x N image) files; results are kept in memory.
    """
    from astropy.io import fits

    from lamostcannon.spectra import (CONTINUUM_SIGMA, CONTINUUM_TRUNCATE, LOG10_WAVE_START,
                                      LOG10_WAVE_STEP, N_PIXELS, common_wavelength)

    n_files = len(files)
    lam = common_wavelength()
    d = lam[:, None] - lam[None, :]
    dense = np.exp(-0.5 * (d / CONTINUUM_SIGMA) ** 2) * (np.abs(d) <= CONTINUUM_TRUNCATE)
    del d
    loglam = LOG10_WAVE_START + LOG10_WAVE_STEP * np.arange(N_PIXELS)
    out_f = np.empty((n_files, N_PIXELS), np.float32)
    out_i = np.empty((n_files, N_PIXELS), np.float32)
    t_read = 0.0
    t0, c0 = time.perf_counter(), _cpu_s()
    for k, path in enumerate(files):
        t1 = time.process_time()
        with fits.open(path) as hdul:
            z = hdul[0].header["Z"]
            if hdul[0].data is not None:  # DR4-9: flux, ivar, wavelength, andmask, ormask
                rows = np.asarray(hdul[0].data, dtype=float)
                flux, ivar, wave, andmask, ormask = rows[:5]
            else:
                row = hdul[1].data[0]
                wave = np.array(row["WAVELENGTH"], dtype=float)
                flux = np.array(row["FLUX"], dtype=float)
                ivar = np.array(row["IVAR"], dtype=float)
                andmask, ormask = row["ANDMASK"], row["ORMASK"]
            bad = (andmask != 0) | (ormask != 0) | (flux == 0)
        t_read += time.process_time() - t1
        ivar[bad] = 0
        rest = np.log10(wave / (1 + z))
        f = np.interp(loglam, rest, flux, left=0, right=0)
        iv = np.interp(loglam, rest, ivar, left=0, right=0)
        cont = (dense @ (f * iv)) / (dense @ iv)
        ok = (iv > 0) & (cont > 0)
        out_f[k] = np.where(ok, f / np.where(ok, cont, 1), 1)
        out_i[k] = np.where(ok, iv * np.where(ok, cont, 1) ** 2, 0)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    return {"n_files": n_files, "wall_s": wall, "spectra_per_s": n_files / wall,
            "spectra_per_cpu_s": n_files / cpu,
            "astropy_read_only_files_per_cpu_s": n_files / t_read,
            "max_rss_parent_mb": _max_rss_mb(resource.RUSAGE_SELF)}


def child_stages(n_files: int) -> dict:
    """Per-stage CPU cost of this package's path on one core (ms per spectrum; best of 3).

    The stages of ``spectra._process_files``: read the bytes, gunzip (with the library in use
    and, for comparison, the standard library's zlib), parse the FITS bytes, interpret the
    layout, resample (batches of 32, as ingest), normalise (batches of 32). As at survey scale:
    where the package has compiled kernels (:mod:`lamostcannon.kernels`), resampling uses them
    from the first spectrum (ingest switches after 10,000 per process), their one-off load
    excluded.
    """
    import zlib

    from lamostcannon import spectra as sp

    try:  # this session's package; an older baseline has no kernels
        from lamostcannon import kernels

        kernels.RESAMPLE_AFTER = -1
        kernels.ready()
    except ImportError:
        pass

    files = _repeat(_dr10_files(), n_files)

    def best(fn, reps=3):
        t_best, out = float("inf"), None
        for _ in range(reps):
            t0 = time.process_time()
            out = fn()
            t_best = min(t_best, time.process_time() - t0)
        return t_best / n_files * 1e3, out

    cap = sp.MAX_SPECTRUM_BYTES
    with sp._one_blas_thread():
        read, raws = best(lambda: [Path(p).read_bytes() for p in files])
        gunzip, bufs = best(lambda: [sp._gunzip(r, "x", cap) for r in raws])
        saved = sp._INFLATE, sp._INFLATE_ERRORS
        sp._INFLATE, sp._INFLATE_ERRORS = zlib, (zlib.error,)
        try:
            gunzip_zlib, _ = best(lambda: [sp._gunzip(r, "x", cap) for r in raws])
        finally:
            sp._INFLATE, sp._INFLATE_ERRORS = saved
        parse, raw = best(lambda: [sp._parse_fast(b, "x") for b in bufs])
        interpret, specs = best(lambda: [sp._interpret(r, Path(p)) for r, p in zip(raw, files)])
        batches = [specs[k:k + 32] for k in range(0, n_files, 32)]
        resample, grids = best(lambda: [sp._resample_many(b) for b in batches])
        stacked = [(np.stack([g[0] for g in b]), np.stack([g[1] for g in b])) for b in grids]
        normalise, normed = best(lambda: [sp.normalise(f, i) for f, i in stacked])
        total, _ = best(lambda: [sp._process_files([str(p) for p in files[k:k + 32]], True, 100)
                                 for k in range(0, n_files, 32)])
        append = _store_append(normed, best)
    return {"read_bytes_ms": read, "gunzip_ms": gunzip, "gunzip_ms_with_zlib": gunzip_zlib,
            "gunzip_library": sp.GZIP_LIBRARY, "parse_ms": parse, "interpret_ms": interpret,
            "resample_ms_batch32": resample, "normalise_ms_batch32": normalise,
            "worker_task_ms_batch32": total, "store_append_ms": append, "package": _package()}


def _store_append(normed, best) -> float:
    """CPU of the parent's store appends per spectrum (all threads: zarr encodes and writes its
    chunk files on its own): the normalised spectra appended to a fresh store in ingest's
    batches (``commit_rows`` 2048), with their compression, chunk files, metadata and commits."""
    from lamostcannon.store import SpectraStore

    flux = np.concatenate([f for f, _ in normed])
    ivar = np.concatenate([i for _, i in normed])
    meta = pd.DataFrame({"obsid": np.arange(len(flux), dtype=np.int64)})

    def run():
        tmp = Path(tempfile.mkdtemp(prefix="bench_append_"))
        try:
            with SpectraStore.open(tmp / "s.zarr", "a", create=True) as store:
                for k in range(0, len(flux), 2048):
                    store.append(flux[k:k + 2048], ivar[k:k + 2048], meta.iloc[k:k + 2048])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return best(run)[0]


def _run_child(kind: str, *args, package_root: str | None = None) -> dict:
    """Run one measurement in a fresh process; with ``package_root``, that folder's
    ``lamostcannon`` is imported (PYTHONPATH, inherited by the ingest workers)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *map(str, args)]
    env = None
    if package_root is not None:
        from lamostcannon import paths

        env = dict(os.environ)
        # the baseline finds the real spectra relative to its own folder otherwise
        env["LAMOSTCANNON_LAMOST_DIR"] = str(paths.real_lamost_dir())
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(package_root).resolve())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                   else []))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if package_root is not None:
        want = Path(package_root).resolve() / "lamostcannon"
        if Path(res["package"]) != want:
            raise SystemExit(f"bench_ingest: the baseline run imported {res['package']}, "
                             f"not {want}")
    return res


def compare_baseline(root: str, n_files: int) -> dict:
    """CPU per spectrum of this package and of the one in ``root``, alternating (module
    docstring); the best of two runs each."""
    runs = {"new": {"stages": [], "ingest": []}, "baseline": {"stages": [], "ingest": []}}
    for rep in range(2):
        order = (("new", None), ("baseline", root)) if rep == 0 else (("baseline", root),
                                                                      ("new", None))
        for tag, pkg in order:
            runs[tag]["stages"].append(_run_child("stages", 500, package_root=pkg))
            runs[tag]["ingest"].append(_run_child("ingest", n_files, 2, package_root=pkg))

    def best(tag):
        st = runs[tag]["stages"]
        out = {k: min(r[k] for r in st) for k, v in st[0].items() if isinstance(v, float)}
        ing = [(r["cpu_parent_s"] + r["cpu_children_s"]) / r["n_files"] * 1e3
               for r in runs[tag]["ingest"]]
        parent = [r["cpu_parent_s"] / r["n_files"] * 1e3 for r in runs[tag]["ingest"]]
        out.update(cpu_ms_per_spectrum_2workers=min(ing), cpu_ms_per_spectrum_parent=min(parent))
        return out

    new, base = best("new"), best("baseline")
    return {"root": str(Path(root).resolve()), "n_files_2workers": n_files,
            "new": {k: round(v, 4) for k, v in new.items()},
            "baseline": {k: round(v, 4) for k, v in base.items()},
            "ratio_new_over_baseline": {k: round(new[k] / base[k], 3) for k in new
                                        if base.get(k)}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20000, help="files for the 2-worker run")
    parser.add_argument("--files-1core", type=int, default=6000, help="files for the 1-core run")
    parser.add_argument("--plain", type=int, default=200, help="files for the astropy loop")
    parser.add_argument("--quick", action="store_true", help="3,000 / 1,500 / 50 files")
    parser.add_argument("--baseline", help="folder with another version's lamostcannon/ to "
                        "compare against in the same run (CPU per spectrum)")
    parser.add_argument("--files-baseline", type=int, default=4000,
                        help="files per 2-worker run of the baseline comparison")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.files_1core, args.plain = 3000, 1500, 50
    if args.child:
        kind, *rest = args.child
        fn = {"ingest": child_ingest, "plain": child_plain, "stages": child_stages}[kind]
        print(json.dumps(fn(*map(int, rest))))
        return {}

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lamostcannon import paths
    from lamostcannon.config import settings

    folder = paths.real_lamost_dir() / "dr10"
    if not any(folder.glob("*.fits.gz")):
        reason = f"no real DR10 spectra in {folder} (set LAMOSTCANNON_LAMOST_DIR)"
        if settings().require_real:
            raise SystemExit(f"bench_ingest: {reason}")
        log.warning("bench_ingest skipped: %s", reason)
        return {"skipped": reason}
    load_before = os.getloadavg()
    log.info("bench_ingest: 2 workers on %d files ...", args.files)
    two = _run_child("ingest", args.files, 2)
    log.info("  %.0f spectra/s", two["spectra_per_s"])
    log.info("bench_ingest: 1 core on %d files ...", args.files_1core)
    one = _run_child("ingest", args.files_1core, 1)
    log.info("  %.0f spectra/s", one["spectra_per_s"])
    log.info("bench_ingest: plain astropy + numpy loop on %d files ...", args.plain)
    plain = _run_child("plain", args.plain)
    log.info("  %.1f spectra/s", plain["spectra_per_s"])
    stages = _run_child("stages", 500)
    log.info("  per spectrum on one core (ms): %s",
             ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in stages.items()))
    baseline = None
    if args.baseline:
        log.info("bench_ingest: against the baseline %s (CPU per spectrum, alternating) ...",
                 args.baseline)
        baseline = compare_baseline(args.baseline, args.files_baseline)
        log.info("  new / baseline: %s", baseline["ratio_new_over_baseline"])
    peak = two["max_rss_parent_mb"] + 2 * two["max_rss_worker_mb"]
    result = {
        "ingest_spectra_per_s_2cores": round(two["spectra_per_s"], 1),
        "ingest_spectra_per_s_1core": round(one["spectra_per_s"], 1),
        "plain_astropy_spectra_per_s": round(plain["spectra_per_s"], 1),
        "ingest_spectra_per_cpu_s_2cores": round(two["spectra_per_cpu_s"], 1),
        "ingest_spectra_per_cpu_s_1core": round(one["spectra_per_cpu_s"], 1),
        "plain_astropy_spectra_per_cpu_s": round(plain["spectra_per_cpu_s"], 1),
        "plain_astropy_read_only_files_per_cpu_s": round(
            plain["astropy_read_only_files_per_cpu_s"], 1),
        "speedup_vs_plain_astropy": round(two["spectra_per_s"] / plain["spectra_per_s"], 1),
        "speedup_vs_plain_astropy_1core": round(one["spectra_per_s"] / plain["spectra_per_s"], 1),
        "speedup_per_cpu_s_vs_plain_astropy": round(
            one["spectra_per_cpu_s"] / plain["spectra_per_cpu_s"], 1),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_mb_parent": round(two["max_rss_parent_mb"], 1),
        "peak_memory_mb_per_worker": round(two["max_rss_worker_mb"], 1),
        "peak_memory_mb_1core": round(one["max_rss_parent_mb"], 1),
        "disk_bytes_per_spectrum": round(two["disk_bytes_per_spectrum"]),
        "stage_ms_per_spectrum_1core": {k: round(v, 3) if isinstance(v, float) else v
                                        for k, v in stages.items()},
        "target_spectra_per_s_2cores": 2000,
        "meets_target": two["spectra_per_s"] >= 2000,
        "cpu_ms_per_spectrum_2cores_parent": round(two["cpu_parent_s"] / args.files * 1e3, 3),
        "cpu_ms_per_spectrum_2cores_workers": round(two["cpu_children_s"] / args.files * 1e3,
                                                    3),
        "baseline": baseline,
        "n_files_2cores": args.files, "n_files_1core": args.files_1core,
        "n_files_plain": args.plain,
        "wall_s_2cores": round(two["wall_s"], 2), "wall_s_1core": round(one["wall_s"], 2),
        "load_avg_after": os.getloadavg(),
        "notes": "*_per_s: wall clock, sensitive to other processes on the machine (see "
                 "load_avg_*); *_per_cpu_s: spectra per CPU second of all our processes, "
                 "insensitive to them (2 idle cores give at most 2x that). End to end: spawn of the workers, read .fits.gz, preprocess, Zarr + Parquet "
                 "writes, commits, report; the real 1726 DR10 files repeated, dedup off. The "
                 "plain loop keeps its results in memory (no writes charged).",
        "machine": {"cpu_count": os.cpu_count(), "load_avg_before": load_before,
                    "python": platform.python_version(), "numpy": np.__version__,
                    "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s:\n%s", RESULT, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
