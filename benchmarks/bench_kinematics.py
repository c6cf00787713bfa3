"""Kinematics (positions, velocities, Staeckel actions): galpy's OpenMP threads against processes.

:func:`lamostcannon.kinematics.kinematics` for the stars of the end-to-end benchmark's catalogue
size (90,000; ``--quick``: 20,000): random sky positions, distances 0.1-3 kpc, Gaia-like proper
motions and LAMOST-like radial velocities (mostly bound orbits, some unbound and some without a
radial velocity, as in the catalogue). Timed, in the same run and back to back:

* ``serial``: one process (``n_workers=1``, one 100,000-star chunk), the catalogue's default:
  galpy's C action loops run on its OpenMP threads (``OMP_NUM_THREADS``, default every core);
  galpy's set-up done before the clock starts (as ``bench_e2e.py`` counts it apart);
* ``serial_1thread``: the same with galpy's OpenMP limited to one thread (threadpoolctl), i.e.
  a galpy without OpenMP or a job with ``OMP_NUM_THREADS=1``;
* ``parallel``: ``--workers`` spawned worker processes (:func:`lamostcannon.parallel.ordered_map`,
  one OpenMP thread each, default chunking), *including* starting them (each imports galpy),
  which is what a catalogue run pays.

The best of ``--repeats`` runs counts for each. Prints the speed-ups of the worker processes
over both one-process paths (wall) and checks that all give the same columns (largest relative
difference). Results: ``benchmarks/results/kinematics.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from lamostcannon import kinematics  # noqa: E402


def make_stars(n: int, seed: int = 2020):
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-0.5, 1, n)))      # LAMOST: mostly north
    dist = rng.uniform(0.1, 3.0, n)
    pmra, pmdec = rng.normal(-2, 8, n), rng.normal(-3, 8, n)
    rv = rng.normal(0, 40, n)
    rv[rng.random(n) < 0.01] = np.nan                          # no radial velocity
    return ra, dec, dist, pmra, pmdec, rv


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20,000 stars, one repeat")
    ap.add_argument("--n-stars", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "kinematics.json"))
    args = ap.parse_args(argv)
    n = args.n_stars or (20_000 if args.quick else 90_000)
    repeats = args.repeats or (1 if args.quick else 2)
    stars = make_stars(n)
    load_start = list(os.getloadavg())
    t = time.perf_counter()
    kinematics.action_angle()                                  # galpy set-up, counted apart
    kinematics.kinematics(*(a[:100] for a in stars), n_workers=1)
    setup_s = time.perf_counter() - t
    from threadpoolctl import threadpool_limits

    omp_threads = kinematics.openmp_threads()
    names = ("serial", "serial_1thread", "parallel")
    times = {k: [] for k in names}
    cpu = {k: [] for k in names}
    results = {}
    for _ in range(repeats):
        for name in names:
            t, c, cc = time.perf_counter(), time.process_time(), children_cpu()
            if name == "serial_1thread":
                with threadpool_limits(1, user_api="openmp"):
                    results[name] = kinematics.kinematics(*stars, n_workers=1)
            else:
                results[name] = kinematics.kinematics(
                    *stars, n_workers=1 if name == "serial" else args.workers)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c + children_cpu() - cc)
    one = results["serial"]
    max_rel = 0.0
    for other in ("serial_1thread", "parallel"):
        par = results[other]
        assert (one["kin_flag"].to_numpy() == par["kin_flag"].to_numpy()).all()
        a, b = one.drop(columns="kin_flag").to_numpy(), par.drop(columns="kin_flag").to_numpy()
        assert (np.isnan(a) == np.isnan(b)).all()
        ok = np.isfinite(a)
        max_rel = max(max_rel, float(np.max(np.abs(a[ok] - b[ok])
                                            / np.maximum(np.abs(a[ok]), 1e-12))))
    serial_s, par_s = min(times["serial"]), min(times["parallel"])
    one_thread_s = min(times["serial_1thread"])
    res = {
        "quick": args.quick, "n_stars": n, "n_workers": args.workers, "repeats": repeats,
        "galpy_setup_s": setup_s,
        "galpy_openmp_threads": omp_threads,
        "serial_s": serial_s, "serial_1thread_s": one_thread_s, "parallel_s": par_s,
        "speedup": serial_s / par_s, "speedup_over_1thread": one_thread_s / par_s,
        "openmp_speedup": one_thread_s / serial_s,
        "serial_ms_per_star": 1e3 * serial_s / n, "parallel_ms_per_star": 1e3 * par_s / n,
        "cpu_serial_s": min(cpu["serial"]), "cpu_serial_1thread_s": min(cpu["serial_1thread"]),
        "cpu_parallel_s": min(cpu["parallel"]),
        "max_relative_difference": max_rel,
        "n_with_actions": int(np.isfinite(one["Jz"]).sum()),
        "projected_hours_4p5M_serial": serial_s / n * 4.5e6 / 3600,
        "projected_hours_4p5M_parallel": par_s / n * 4.5e6 / 3600,
        "all_runs_s": times, "all_runs_cpu_s": cpu,
        "python": platform.python_version(), "numpy": np.__version__,
        "load_average_at_start": load_start, "load_average_at_end": list(os.getloadavg()),
    }
    print(f"kinematics of {n} stars: one process {serial_s:.2f} s with galpy's {omp_threads} "
          f"OpenMP threads ({res['serial_ms_per_star']:.4f} ms/star), {one_thread_s:.2f} s on "
          f"one thread; {args.workers} worker processes {par_s:.2f} s including their start "
          f"({res['parallel_ms_per_star']:.4f} ms/star): speed-up {res['speedup']:.2f}x over "
          f"the default, {res['speedup_over_1thread']:.2f}x over one thread; largest relative "
          f"difference {max_rel:.1e}; load {load_start[0]:.1f} -> "
          f"{res['load_average_at_end'][0]:.1f}", flush=True)
    out_path = Path(args.out)
    if args.quick:
        out_path = out_path.with_name("kinematics_quick.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
