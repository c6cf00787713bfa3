"""Benchmark: the reliability figures of issue 14, measured by attacking the package for real.

* the store's write lock: double holds in 200 simultaneous openings (100 pairs of forked
  processes released together by a barrier), against the previous O_EXCL + pid scheme
  re-created here as the baseline, measured in the same run;
* ``kill -9`` of ``python -m lamostcannon label`` and of an ingest script (2 workers each), 20
  times each: worker processes still alive afterwards, callers whose read of the pipes to EOF
  hung (30 s limit);
* one worker killed by pid during ``label`` and during ingest: files labelled / stored, and the
  files listed as failed when the same chunk's worker is killed twice;
* peak RSS of a process that meets a 2 GiB gzip bomb (made on the fly in a temporary folder)
  against one that reads a real spectrum;
* seconds until a download from a server that drips one byte every 0.3 s is abandoned, against
  the per-file deadline.

Inputs: real DR10 files from ``../shared/data/lamost`` (``LAMOSTCANNON_LAMOST_DIR``). The
attacks live in ``tests/reliability_harness.py`` (the tests run the same code, fewer times).
Run: ``python benchmarks/bench_reliability.py [--kills 20] [--bomb-gib 2]``. Writes
``benchmarks/results/reliability.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = HERE / "results" / "reliability.json"
sys.path.insert(0, str(ROOT / "tests"))
log = logging.getLogger("bench_reliability")


# -- the baseline of the lock: the O_EXCL + pid scheme this package used before issue 14 -------

def _old_lock_open_and_hold(path, barrier, queue, hold_s):
    lock = Path(path) / ".oldlock"
    barrier.wait(timeout=30)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            alive = False
            if pid and pid != os.getpid():
                try:
                    os.kill(pid, 0)
                    alive = True
                except ProcessLookupError:
                    pass
            if alive:
                queue.put(("busy", "", 0.0, 0.0))
                return
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        t0 = time.monotonic()
        time.sleep(hold_s)
        t1 = time.monotonic()
        lock.unlink(missing_ok=True)
        queue.put(("held", "", t0, t1))
        return
    queue.put(("busy", "", 0.0, 0.0))


def old_lock_openings(path, n_pairs: int, hold_s: float = 0.02) -> dict:
    import reliability_harness as rh

    out = rh.simultaneous_openings(path, n_pairs, hold_s, opener=_old_lock_open_and_hold)
    return {"pairs": n_pairs, "openings": 2 * n_pairs, "double": out["double"]}


# -- the measurements --------------------------------------------------------------------------

def measure_locks(tmp: Path, n_pairs: int) -> dict:
    import reliability_harness as rh
    from lamostcannon.store import SpectraStore

    path = tmp / "lock.zarr"
    SpectraStore.create(path).close()
    t0 = time.perf_counter()
    now = rh.simultaneous_openings(path, n_pairs)
    now["seconds"] = time.perf_counter() - t0
    base = old_lock_openings(path, n_pairs)
    now.pop("first_error", None)
    return {"flock": now, "baseline_o_excl_pid": base}


def measure_kills(tmp: Path, dr10: Path, model: Path, n_kills: int) -> dict:
    import reliability_harness as rh

    out = {}
    for name, cmd in (("label", rh.label_command(model, [dr10], tmp / "kill_labels.fits")),
                      ("ingest", rh.ingest_command(dr10, tmp / "kill.zarr", tmp))):
        t0 = time.perf_counter()
        out[name] = rh.kill_parent_count_orphans(cmd, n_kills=n_kills)
        out[name]["seconds"] = time.perf_counter() - t0
        log.info("kill -9 of %s x %d: %s", name, n_kills, out[name])
    return out


def measure_dead_worker(tmp: Path, dr10: Path, model: Path, n_files: int) -> dict:
    import pandas as pd
    from astropy.table import Table

    import reliability_harness as rh
    from lamostcannon.store import SpectraStore

    files = sorted(dr10.glob("*.fits.gz"))[:n_files]
    folder = tmp / "dead_in"
    folder.mkdir(exist_ok=True)
    for f in files:
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    out = {"files": len(files)}
    for times in (1, 2):
        labels = tmp / f"dead_{times}.fits"
        run = rh.kill_workers_during_run(rh.label_command(model, files, labels), times=times)
        errors = pd.read_csv(tmp / f"dead_{times}.errors.csv")
        out[f"label_workers_killed_{times}"] = {
            "returncode": run["returncode"], "killed": len(run["killed"]),
            "labelled": len(Table.read(labels)) if labels.exists() else 0,
            "listed_as_failed": len(errors),
            "reason": errors["reason"].iloc[0] if len(errors) else ""}
        store = tmp / f"dead_{times}.zarr"
        run = rh.kill_workers_during_run(rh.ingest_command(folder, store, tmp), times=times)
        report = pd.read_csv(store / "ingest_report.csv")
        failed = report[report["status"] == "failed"]
        out[f"ingest_workers_killed_{times}"] = {
            "returncode": run["returncode"], "killed": len(run["killed"]),
            "stored": len(SpectraStore(store)), "listed_as_failed": len(failed),
            "reason": failed["reason"].iloc[0] if len(failed) else ""}
    return out


def measure_bomb(tmp: Path, dr10: Path, gib: float) -> dict:
    import reliability_harness as rh

    bomb = tmp / "spec-bomb.fits.gz"
    t0 = time.perf_counter()
    rh.write_gzip_bomb(bomb, int(gib * 2 ** 30))
    made = time.perf_counter() - t0
    got = rh.bomb_peak_rss(sorted(dr10.glob("*.fits.gz"))[0], bomb)
    got.update(inflated_bytes=int(gib * 2 ** 30), seconds_to_make=made)
    bomb.unlink()
    return got


def measure_drip(tmp: Path, dr10: Path, deadline: float) -> dict:
    from archive_server import SPECTRUM_ROUTE, ArchiveServer, path_of
    from lamostcannon.archives import Downloader, FileTask, Manifest, validate_lamost

    f = sorted(dr10.glob("*.fits.gz"))[0]
    srv = ArchiveServer(drip_seconds=0.3).start()
    try:
        srv.spectra[1] = f.read_bytes()
        srv.always[path_of(SPECTRUM_ROUTE, 1)] = "drip"
        dl = Downloader(deadline=deadline, timeout=(2.0, 2.0), retries=2, backoff=0.1,
                        progress=False)
        t0 = time.monotonic()
        rep = dl.fetch_many([FileTask(srv.url + path_of(SPECTRUM_ROUTE, 1), "x.fits.gz",
                                      key="drip")], tmp / "drip", Manifest(tmp / "drip"),
                            what="drip", validate=validate_lamost)
        elapsed = time.monotonic() - t0
    finally:
        srv.stop()
    return {"deadline_s": deadline, "seconds_to_abandon": elapsed,
            "file_bytes": f.stat().st_size, "failed": [x.reason for x in rep.failures],
            "drip_seconds_per_byte": 0.3,
            "hours_the_drip_would_take": f.stat().st_size * 0.3 / 3600}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill -9s of label and of ingest")
    ap.add_argument("--pairs", type=int, default=100, help="pairs of simultaneous openers")
    ap.add_argument("--bomb-gib", type=float, default=2.0, help="inflated size of the bomb")
    ap.add_argument("--deadline", type=float, default=5.0, help="per-file download deadline")
    ap.add_argument("--files", type=int, default=600, help="files of the dead-worker runs")
    ap.add_argument("--quick", action="store_true", help="3 kills, 20 pairs, 0.5 GiB bomb")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.quick:
        args.kills, args.pairs, args.bomb_gib = 3, 20, 0.5
    import reliability_harness as rh
    from lamostcannon import paths

    lamost = paths.real_lamost_dir()
    dr10 = lamost / "dr10"
    if not dr10.is_dir():
        raise SystemExit(f"no DR10 files in {dr10}; set LAMOSTCANNON_LAMOST_DIR")
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench_reliability_") as tmp:
        tmp = Path(tmp)
        model = rh.train_small_model(lamost, tmp)
        result["lock"] = measure_locks(tmp, args.pairs)
        log.info("lock: %s", result["lock"])
        result["drip"] = measure_drip(tmp, dr10, args.deadline)
        log.info("drip: %s", result["drip"])
        result["bomb"] = measure_bomb(tmp, dr10, args.bomb_gib)
        log.info("bomb: %s", result["bomb"])
        result["dead_worker"] = measure_dead_worker(tmp, dr10, model, args.files)
        log.info("dead worker: %s", result["dead_worker"])
        result["kill_9"] = measure_kills(tmp, dr10, model, args.kills)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "platform": platform.platform(), "load_avg_before": load_before,
                         "load_avg_after": os.getloadavg(),
                         "seconds": time.perf_counter() - t_all}
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2, default=str) + "\n")

    lock, k, d, b, dr = (result["lock"], result["kill_9"], result["dead_worker"],
                         result["bomb"], result["drip"])
    print(f"write lock, {lock['flock']['openings']} simultaneous openings: "
          f"{lock['flock']['double']} double holds (baseline O_EXCL+pid: "
          f"{lock['baseline_o_excl_pid']['double']} of {lock['baseline_o_excl_pid']['pairs']} "
          "pairs)")
    for name in ("label", "ingest"):
        print(f"kill -9 of {name} x {k[name]['kills']}: {k[name]['surviving_workers']} surviving "
              f"of {k[name]['workers_seen']} workers, {k[name]['hung_pipes']} hung pipes, EOF "
              f"after <= {k[name]['max_seconds_to_eof']:.2f} s")
    for tool, count in (("label", "labelled"), ("ingest", "stored")):
        one, two = d[f"{tool}_workers_killed_1"], d[f"{tool}_workers_killed_2"]
        print(f"{tool}, 1 worker killed: {one[count]} of {d['files']} {count} "
              f"(exit {one['returncode']}); same chunk's worker killed twice: {two[count]} "
              f"{count}, {two['listed_as_failed']} listed as failed")
    print(f"gzip bomb of {b['inflated_bytes'] / 2**30:.1f} GiB ({b['bomb_bytes']} bytes): peak "
          f"RSS {b['bomb_rss_mb']:.0f} MB against {b['normal_rss_mb']:.0f} MB reading a real "
          f"spectrum (ratio {b['ratio']:.2f}); refused: {b['reason'][:60]}...")
    print(f"dripping server: abandoned after {dr['seconds_to_abandon']:.2f} s (deadline "
          f"{dr['deadline_s']:.1f} s; the drip would take {dr['hours_the_drip_would_take']:.1f} h)")
    print(f"wrote {RESULT} (load average before {load_before[0]:.1f}, after "
          f"{result['machine']['load_avg_after'][0]:.1f})")
    return result


if __name__ == "__main__":
    main()
