"""When do worker processes pay for themselves in ``python -m lamostcannon label``?

The command runs with ``--workers 1`` and ``--workers 2`` (explicit) and with the default
(``auto_workers``: extra processes only for at least ``cli.FILES_PER_WORKER`` files each), on
the first N real DR10 files for several N, each as a fresh process (as a user runs it: imports,
model load, reading and labelling, writing). A 3-label model is trained once on the first 300
DR10 files (in a temporary folder). The default must never be slower than one process on small
runs (issue 17: 500 files took 2.6-3.5 s with one process and 5.6-7.1 s with two).

Then, in this process on one core, what a file costs: CPU per file of ``label`` at
``--chunk-size`` 64 and 512 (the labelling core has a fixed cost per call), and of its read step
(read, resample, normalise) batched as the ingest does (``cli._read_chunk``) against the same
work one file at a time (the baseline, measured in the same run, alternating; the bytes are
checked equal).

Needs the real LAMOST files (``../shared/data/lamost`` or ``LAMOSTCANNON_LAMOST_DIR``).
Run ``python benchmarks/bench_label_workers.py`` (~3 minutes) or ``--quick``.
Results: ``benchmarks/results/label_workers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def _read_one_at_a_time(sources):
    """The read step as ``label`` did it before batching: each file resampled alone, then one
    continuum product for the task (the baseline of :func:`per_file_costs`)."""
    import numpy as np

    from lamostcannon.spectra import SpectrumReadError, normalise, read_lamost, resample

    keep, fl, iv = [], [], []
    for k, src in enumerate(sources):
        try:
            f, i = resample(read_lamost(src))
        except SpectrumReadError:
            continue
        keep.append(k)
        fl.append(f)
        iv.append(i)
    flux, ivar = normalise(np.stack(fl), np.stack(iv))
    return keep, flux, ivar


def per_file_costs(model_path, files, tmp, repeats=3) -> dict:
    """CPU ms per file (best of ``repeats``) of ``label`` by chunk size and of its read step."""
    import numpy as np

    from lamostcannon import cli
    from lamostcannon.cli import _blas_threads

    out = {"n_files": len(files)}
    with _blas_threads(1):
        cpu = {64: [], 512: []}
        for _ in range(repeats):
            for chunk in (64, 512):
                t = time.process_time()
                run = cli.label_files(model_path, files, tmp / f"chunk_{chunk}.parquet", workers=1,
                                      chunk_size=chunk, overwrite=True, progress=False)
                cpu[chunk].append((time.process_time() - t) / max(run.n_labelled, 1) * 1e3)
        out["label_cpu_ms_per_file_chunk_64"] = round(min(cpu[64]), 3)
        out["label_cpu_ms_per_file_chunk_512"] = round(min(cpu[512]), 3)
        out["chunk_512_over_64"] = round(min(cpu[512]) / min(cpu[64]), 3)
        read = {"batched": [], "one_at_a_time": []}
        for _ in range(repeats):
            t = time.process_time()
            base = _read_one_at_a_time(files)
            read["one_at_a_time"].append(time.process_time() - t)
            t = time.process_time()
            keep, _, flux, ivar, _ = cli._read_chunk(files)
            read["batched"].append(time.process_time() - t)
        same = (keep == base[0] and np.array_equal(flux.view(np.uint32), base[1].view(np.uint32))
                and np.array_equal(ivar.view(np.uint32), base[2].view(np.uint32)))
        for k, v in read.items():
            out[f"read_cpu_ms_per_file_{k}"] = round(min(v) / len(files) * 1e3, 3)
        out["read_batched_over_one_at_a_time"] = round(min(read["batched"])
                                                       / min(read["one_at_a_time"]), 3)
        out["read_same_bytes"] = bool(same)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "label_workers.json"))
    args = ap.parse_args(argv)
    from lamostcannon import paths, real
    from lamostcannon.cannon import CannonModel
    from lamostcannon.cli import FILES_PER_WORKER
    from lamostcannon.spectra import common_wavelength

    dr10 = paths.real_lamost_dir() / "dr10"
    if not dr10.is_dir():
        print(f"no real spectra at {dr10}; skipped")
        return 0
    files = sorted(str(p) for p in dr10.glob("spec-*.fits.gz"))
    sizes = [100, 500] if args.quick else [100, 500, 1000, len(files)]
    res = {"files_per_worker": FILES_PER_WORKER, "cpu_count": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = real.RealSources(dr10, dr10 / "catalog.csv")
        sample = real.build_sample(src, limit=300, n_workers=1, store_path=tmp / "t.zarr")
        lab, flux, ivar = sample.subset(sample.table["train"].to_numpy())
        model = CannonModel(list(sample.label_names), common_wavelength()).train(lab, flux, ivar)
        model_path = tmp / "model_bench.fits"
        model.write(model_path)
        for n in sizes:
            listing = tmp / f"files_{n}"
            listing.mkdir()
            for f in files[:n]:
                os.symlink(f, listing / Path(f).name)
            for workers in ("1", "2", "default"):
                cmd = [sys.executable, "-m", "lamostcannon", "label", "--model", str(model_path),
                       str(listing), "-o", str(tmp / f"out_{n}_{workers}.parquet"),
                       "--no-progress"] + ([] if workers == "default" else ["--workers", workers])
                env = dict(os.environ, LAMOSTCANNON_WORKERS="2")
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                dt = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(proc.stderr[-2000:])
                    return 1
                used = proc.stdout.split(" on ")[1].split(" process")[0] if " on " in \
                    proc.stdout else "?"
                res["runs"].append({"n_files": n, "workers": workers, "processes_used": used,
                                    "seconds": dt})
                print(f"  {n:5d} files, --workers {workers:7s}: {dt:5.1f} s "
                      f"({used} process(es))", flush=True)
        res["per_file"] = per_file_costs(model_path, files, tmp, repeats=1 if args.quick else 3)
        print(json.dumps(res["per_file"], indent=1), flush=True)
    res["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    if args.quick:
        out = out.with_name("label_workers_quick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
