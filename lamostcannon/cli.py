"""The ``label`` command: labels for a user's own LAMOST spectra with a trained Cannon model.

::

    python -m lamostcannon label --model MODEL.fits spectra/*.fits.gz -o labels.fits
    python -m lamostcannon label --model MODEL.fits spectra/ -o labels.parquet --workers 4

Inputs are files and/or folders (searched recursively for ``*.fits[.gz]``); every LAMOST
low-resolution layout is read (:func:`lamostcannon.spectra.read_lamost`). Each spectrum is
preprocessed exactly as the training spectra (rest frame, common grid, continuum normalisation)
and fitted with the model's test step.

Outputs
-------
``OUTPUT`` (``.fits``, ``.parquet`` or ``.csv``, chosen by the extension)
    One row per labelled file, in input order: ``filename``, ``source``, header metadata
    (``obsid``, ``designation``, ``ra``, ``dec``, ``mjd``, ``z``, ``snru..snrz``,
    ``data_release``, ``layout``), the labels and their formal errors ``e_<label>``, ``chi2``,
    ``chi2_per_pixel``, ``n_pixels`` (pixels used), ``n_iter``, ``converged``, ``flag`` (the
    Cannon bitmask, :data:`lamostcannon.cannon.FLAG_BITS`), and the extrapolation flags
    (:func:`lamostcannon.real.extrapolation_table`): ``outside_training`` (a label outside the
    training range, always), ``<label>_extrap`` and ``kde_extrap`` (beyond the KDE boundaries,
    when a boundaries file is found beside the model, see :func:`boundaries_path_for`), and
    ``extrap`` (any of them).
``OUTPUT`` stem + ``.errors.csv``
    One row per input file that was *not* labelled: ``source``, ``reason`` (unreadable,
    truncated, no valid pixels, duplicate obsid, ...). Written on every run (empty when all
    files were labelled).

A bad file never stops the run. Both files are written to a temporary name and renamed into
place, so an interrupted run leaves no partial output. Exit status: 0 when at least one file was
labelled, 1 when none was, 2 for a usage error (missing model, existing output without
``--overwrite``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["add_label_command", "boundaries_path_for", "collect_inputs", "label_files",
           "LabelRun", "errors_path_for", "main"]

#: Header metadata copied into the output, in this order.
META_COLUMNS = ("obsid", "designation", "ra", "dec", "mjd", "z", "snru", "snrg", "snrr", "snri",
                "snrz", "data_release", "layout")

_OUTPUT_SUFFIXES = (".fits", ".fit", ".parquet", ".csv")


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------

def boundaries_path_for(model_path) -> Path | None:
    """The KDE extrapolation boundaries stored beside a model, or None.

    Looked for, in order: ``<stem>.extrapolation.json`` and, for a model named
    ``model_<name>.<ext>``, ``extrapolation_<name>.json`` (the names notebooks 04 and 09 write,
    :func:`lamostcannon.validation.write_boundaries`).
    """
    model_path = Path(model_path)
    stem = model_path.name.split(".")[0]
    candidates = [model_path.with_name(f"{stem}.extrapolation.json")]
    if stem.startswith("model_"):
        candidates.append(model_path.with_name(f"extrapolation_{stem[len('model_'):]}.json"))
    for c in candidates:
        if c.is_file():
            return c
    return None


def errors_path_for(output) -> Path:
    """The per-file error report beside ``output``: ``<output stem>.errors.csv``."""
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}.errors.csv")


def collect_inputs(inputs) -> list[Path]:
    """Files from a list of files and folders, in the given order, each path once.

    Folders are searched recursively for LAMOST files
    (:func:`lamostcannon.spectra.find_spectra`, sorted). Paths that do not exist are kept (they
    are reported as not found). Duplicates (the same resolved path) are dropped.
    """
    from .spectra import find_spectra

    seen, out = set(), []
    for item in inputs:
        p = Path(item).expanduser()
        found = find_spectra(p) if p.is_dir() else [p]
        for f in found:
            key = os.path.abspath(f)
            if key in seen:
                continue
            seen.add(key)
            out.append(Path(key))
    return out


# --------------------------------------------------------------------------------------------
# Labelling one chunk of files (runs in a worker process or in this one)
# --------------------------------------------------------------------------------------------

_STATE: dict = {}


def _load_state(model_path, boundaries_path, test_chunk):
    from . import validation
    from .cannon import CannonModel

    model = CannonModel.read(model_path)
    boundaries = validation.read_boundaries(boundaries_path) if boundaries_path else None
    return {"model": model, "boundaries": boundaries, "test_chunk": int(test_chunk)}


def _init_worker(model_path, boundaries_path, test_chunk):
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover
        pass
    logging.basicConfig(level=logging.WARNING)
    _STATE.update(_load_state(model_path, boundaries_path, test_chunk))


def _read_chunk(sources):
    """Read and resample files; returns (kept indices, metas, flux, ivar, failures)."""
    from .spectra import SpectrumReadError, normalise, read_lamost, resample

    keep, metas, fl, iv, failed = [], [], [], [], []
    for k, src in enumerate(sources):
        try:
            spectrum = read_lamost(src)
            f, i = resample(spectrum)
        except SpectrumReadError as exc:
            failed.append((k, exc.reason))
            continue
        except Exception as exc:  # an exotic file must never stop the run
            failed.append((k, f"unexpected {type(exc).__name__}: {exc}"))
            continue
        keep.append(k)
        metas.append(spectrum.meta)
        fl.append(f)
        iv.append(i)
    if keep:
        flux, ivar = normalise(np.stack(fl), np.stack(iv))
    else:
        flux = ivar = None
    return keep, metas, flux, ivar, failed


def _fit(model, flux, ivar, test_chunk):
    """The test step; if it fails for the batch, spectrum by spectrum (the bad one fails)."""
    try:
        return [model.test(flux, ivar, chunk_size=test_chunk)], None
    except Exception as exc:  # pragma: no cover - defensive: find the spectrum responsible
        log.warning("test step failed on a batch (%s); fitting one spectrum at a time", exc)
    results, bad = [], {}
    for k in range(flux.shape[0]):
        try:
            results.append(model.test(flux[k:k + 1], ivar[k:k + 1]))
        except Exception as exc:  # pragma: no cover
            results.append(None)
            bad[k] = f"test step failed: {type(exc).__name__}: {exc}"
    return results, bad


def _label_sources(sources, state) -> tuple[pd.DataFrame, list]:
    """Label a list of files. Returns (rows with an ``_index`` column into sources, failures)."""
    from .real import extrapolation_table

    model = state["model"]
    names = list(model.label_names)
    keep, metas, flux, ivar, failed = _read_chunk(sources)
    if not keep:
        return pd.DataFrame(), failed
    results, bad = _fit(model, flux, ivar, state["test_chunk"])
    if bad is None:
        table = results[0].to_table().to_pandas()
    else:  # pragma: no cover - only after a failed batch
        good = [k for k in range(len(keep)) if k not in bad]
        failed += [(keep[k], why) for k, why in bad.items()]
        table = pd.concat([results[k].to_table().to_pandas() for k in good], ignore_index=True)
        keep = [keep[k] for k in good]
        metas = [metas[k] for k in good]
    meta = pd.DataFrame(metas)
    out = pd.DataFrame({"_index": np.asarray(keep, np.int64),
                        "filename": [Path(sources[k]).name for k in keep],
                        "source": [str(sources[k]) for k in keep]})
    for col in META_COLUMNS:
        if col in meta.columns:
            out[col] = meta[col].to_numpy()
    for col in names + [f"e_{n}" for n in names]:
        out[col] = table[col].to_numpy(float)
    out["chi2"] = table["chi2"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["chi2_per_pixel"] = out["chi2"] / table["n_pixels"].to_numpy(float)
    for col in ("n_pixels", "n_iter"):
        out[col] = table[col].to_numpy(np.int64)
    out["converged"] = table["converged"].to_numpy(bool)
    out["flag"] = table["flag"].to_numpy(np.int64)
    flags = extrapolation_table(table[names], names, boundaries=state["boundaries"],
                                label_range=getattr(model, "label_range", None))
    for col in flags.columns:
        out[col] = flags[col].to_numpy(bool)
    return out, failed


def _blas_threads(n: int):
    """Limit BLAS threads for the duration (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(n)
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()


def _worker_task(sources):
    return _label_sources(sources, _STATE)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

@dataclass
class LabelRun:
    """What a :func:`label_files` run did."""

    output: Path
    errors: Path
    n_input: int
    n_labelled: int
    n_failed: int
    n_flagged: int
    seconds: float

    def summary(self) -> str:
        return (f"labelled {self.n_labelled} of {self.n_input} files in {self.seconds:.1f} s "
                f"({self.n_failed} not labelled, listed in {self.errors}; {self.n_flagged} with "
                f"a nonzero flag or an extrapolation flag) -> {self.output}")


def _describe(columns, label_names):
    from .cannon import FLAG_BITS
    from .labels import unit

    desc = {
        "filename": ("", "base name of the spectrum file"),
        "source": ("", "path of the spectrum file as given"),
        "obsid": ("", "LAMOST observation id (-1 when the file has none)"),
        "designation": ("", "LAMOST designation"),
        "ra": ("deg", "right ascension (file header)"), "dec": ("deg", "declination"),
        "mjd": ("d", "modified Julian date (file header)"),
        "z": ("", "LAMOST pipeline redshift used for the rest frame"),
        "data_release": ("", "LAMOST data release (file header)"),
        "layout": ("", "file layout: dr1-3, dr4-9 or dr10+"),
        "chi2": ("", "chi2 of the best-fit model over the pixels used"),
        "chi2_per_pixel": ("", "chi2 / n_pixels"),
        "n_pixels": ("", "pixels used in the fit"),
        "n_iter": ("", "Newton iterations"), "converged": ("", "the fit converged"),
        "flag": ("", "Cannon bitmask: " + ", ".join(f"{b}={n}" for b, (n, _) in FLAG_BITS.items())),
        "kde_extrap": ("", "a label lies beyond its KDE extrapolation boundary"),
        "outside_training": ("", "a label lies outside the training-set range"),
        "extrap": ("", "any extrapolation flag"),
    }
    for band in "ugriz":
        desc[f"snr{band}"] = ("", f"S/N per pixel in the {band} band (file header)")
    for n in label_names:
        desc[n] = (unit(n), f"{n} from the Cannon test step")
        desc[f"e_{n}"] = (unit(n), f"formal 1-sigma error of {n}")
        desc[f"{n}_extrap"] = ("", f"{n} beyond its KDE extrapolation boundary")
    return {c: desc[c] for c in columns if c in desc}


def _write_output(df: pd.DataFrame, path: Path, label_names, model_path) -> None:
    """Write the labels table atomically; the format follows the extension."""
    suffix = path.suffix.lower()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            from astropy.table import Table

            from . import __version__

            t = Table.from_pandas(df)
            for col, (u, d) in _describe(df.columns, label_names).items():
                if u:
                    t[col].unit = u
                t[col].description = d
            t.meta["MODEL"] = Path(model_path).name
            t.meta["LCVERS"] = __version__
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FITS drops the unit 'dex' with a warning
                t.write(tmp, format="fits", overwrite=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_errors(errors: list, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pd.DataFrame(errors, columns=["source", "reason"]).to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def label_files(model_path, inputs, output, *, workers: int = 1, chunk_size: int = 64,
                test_chunk: int = 256, boundaries_path=None, overwrite: bool = False,
                progress: bool = True) -> LabelRun:
    """Label LAMOST files with a trained model; see the module docstring for the outputs.

    Parameters
    ----------
    model_path : path
        A model written by :meth:`lamostcannon.cannon.CannonModel.write`.
    inputs : sequence of paths
        Files and/or folders (:func:`collect_inputs`).
    output : path
        ``.fits``, ``.parquet`` or ``.csv``.
    workers : int
        Processes; 1 labels in this process.
    chunk_size : int
        Files per task (memory ~ ``chunk_size`` x 3909 x 16 bytes per worker).
    test_chunk : int
        Spectra per batch of the test step.
    boundaries_path : path, optional
        KDE boundaries JSON; default :func:`boundaries_path_for` the model (None: no KDE flags).
    overwrite : bool
        Replace an existing output.
    progress : bool
        Show a progress bar (tqdm, on stderr).

    Returns
    -------
    LabelRun

    Raises
    ------
    FileNotFoundError
        The model file does not exist.
    FileExistsError
        The output exists and ``overwrite`` is False.
    ValueError
        Bad arguments, or a model file that cannot be read.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    model_path = Path(model_path)
    output = Path(output)
    if output.suffix.lower() not in _OUTPUT_SUFFIXES:
        raise ValueError(f"output must end in one of {_OUTPUT_SUFFIXES}, got {output.name!r}")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    if chunk_size < 1 or workers < 1 or test_chunk < 1:
        raise ValueError(f"chunk_size, workers and test_chunk must be >= 1, got {chunk_size}, "
                         f"{workers}, {test_chunk}")
    if not model_path.is_file():
        raise FileNotFoundError(f"no model file at {model_path}")
    if boundaries_path is None:
        boundaries_path = boundaries_path_for(model_path)
    if boundaries_path is None:
        log.info("no extrapolation boundaries beside %s: only outside_training flags", model_path)
    state = _load_state(model_path, boundaries_path, test_chunk)  # fails early on a bad model
    names = list(state["model"].label_names)
    files = collect_inputs(inputs)
    sources = [str(f) for f in files]
    tasks = [list(range(a, min(a + chunk_size, len(sources))))
             for a in range(0, len(sources), chunk_size)]
    parts, errors = [], {}

    def take(task, result):
        rows, failed = result
        for k, why in failed:
            errors[task[k]] = why
        if len(rows):
            rows = rows.copy()
            rows["_index"] = np.asarray(task)[rows["_index"].to_numpy()]
            parts.append(rows)

    bar = tqdm(total=len(sources), desc="label", unit="file", disable=not progress,
               file=sys.stderr)
    try:
        if workers <= 1 or len(tasks) <= 1:
            with _blas_threads(1):
                for task in tasks:
                    take(task, _label_sources([sources[i] for i in task], state))
                    bar.update(len(task))
        else:
            _run_pool(tasks, sources, workers, (str(model_path), boundaries_path and
                                                str(boundaries_path), test_chunk), take, bar)
    finally:
        bar.close()

    df = pd.concat(parts, ignore_index=True) if parts else None
    if df is not None:
        df = df.sort_values("_index", kind="stable").reset_index(drop=True)
        if "obsid" in df.columns:  # one row per observation: later copies are reported
            obsid = df["obsid"].fillna(-1).astype(np.int64)
            dup = (obsid >= 0) & obsid.duplicated(keep="first")
            if dup.any():
                first = df.loc[~dup & (obsid >= 0)].set_index("obsid")["source"]
                for idx, ob in zip(df.loc[dup, "_index"], obsid[dup]):
                    errors[int(idx)] = f"duplicate obsid {ob}: already labelled from {first[ob]}"
                df = df.loc[~dup].reset_index(drop=True)
        df = df.drop(columns="_index")
    else:
        df = _empty_frame(state, names)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_output(df, output, names, model_path)
    err_path = errors_path_for(output)
    _write_errors([(sources[i], errors[i]) for i in sorted(errors)], err_path)
    flagged = int(((df["flag"] != 0) | df["extrap"]).sum()) if len(df) else 0
    run = LabelRun(output, err_path, len(sources), len(df), len(errors), flagged,
                   time.perf_counter() - t0)
    log.info(run.summary())
    return run


def _empty_frame(state, names) -> pd.DataFrame:
    cols = ["filename", "source", *META_COLUMNS, *names, *[f"e_{n}" for n in names], "chi2",
            "chi2_per_pixel", "n_pixels", "n_iter", "converged", "flag"]
    if state["boundaries"] is not None:
        cols += [f"{n}_extrap" for n in names] + ["kde_extrap"]
    cols += ["outside_training", "extrap"]
    df = pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    for c in ("filename", "source", "designation", "data_release", "layout"):
        df[c] = df[c].astype(str)
    for c in ("obsid", "mjd", "n_pixels", "n_iter", "flag"):
        df[c] = df[c].astype(np.int64)
    for c in cols:
        if c == "converged" or c.endswith("extrap") or c == "outside_training":
            df[c] = df[c].astype(bool)
    return df


def _run_pool(tasks, sources, workers, initargs, take, bar) -> None:
    """Tasks on ``workers`` spawned processes (one BLAS thread each), taken in task order."""
    from .parallel import ordered_map

    def failed(index, exc):  # a crashed worker: report its files, go on
        return (pd.DataFrame(), [(k, f"worker failed: {type(exc).__name__}: {exc}")
                                 for k in range(len(tasks[index]))])

    payloads = [[sources[i] for i in task] for task in tasks]
    for index, result in ordered_map(_worker_task, payloads, workers, initializer=_init_worker,
                                     initargs=initargs, on_error=failed):
        take(tasks[index], result)
        bar.update(len(tasks[index]))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

_EPILOG = """\
outputs:
  OUTPUT                one row per labelled file: labels, e_<label>, chi2, chi2_per_pixel,
                        n_pixels, flag (Cannon bitmask), outside_training, <label>_extrap and
                        kde_extrap (when boundaries are found beside the model), extrap (any)
  <OUTPUT stem>.errors.csv
                        one row per file that was not labelled, with the reason

extrapolation boundaries are read from <model stem>.extrapolation.json or, for a model named
model_<name>.fits, extrapolation_<name>.json in the model's folder (or give --boundaries).

example:
  python -m lamostcannon label --model data/processed/model_real_dr10.fits \\
      spectra/*.fits.gz -o labels.fits --workers 4
"""


def _label_command(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    workers = args.workers
    if workers is None:
        from .config import settings

        workers = settings().n_workers
    try:
        run = label_files(args.model, args.inputs, args.output, workers=workers,
                          chunk_size=args.chunk_size, boundaries_path=args.boundaries,
                          overwrite=args.overwrite, progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"label: error: {exc}", file=sys.stderr)
        return 2
    print(run.summary())
    return 0 if run.n_labelled > 0 else 1


def add_label_command(subparsers) -> argparse.ArgumentParser:
    """Register ``label`` on an ``argparse`` sub-parser collection (``python -m lamostcannon``)."""
    p = subparsers.add_parser(
        "label", help="label LAMOST spectra with a trained Cannon model",
        description="Label LAMOST low-resolution spectra (any layout) with a trained model.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="SPECTRA",
                   help="LAMOST spectrum files and/or folders (searched recursively)")
    p.add_argument("--model", "-m", required=True, help="model file (CannonModel.write)")
    p.add_argument("--output", "-o", required=True,
                   help="output table: .fits, .parquet or .csv (by extension)")
    p.add_argument("--workers", "-j", type=int, default=None,
                   help="processes (default: LAMOSTCANNON_WORKERS or the CPU count)")
    p.add_argument("--chunk-size", type=int, default=64, help="files per task (default 64)")
    p.add_argument("--boundaries", default=None,
                   help="KDE extrapolation boundaries JSON (default: found beside the model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="log what happens")
    p.set_defaults(func=_label_command)
    return p


def main(argv=None) -> int:
    """``python -m lamostcannon.cli label ...`` (the same as ``python -m lamostcannon label``)."""
    parser = argparse.ArgumentParser(prog="python -m lamostcannon")
    sub = parser.add_subparsers(dest="command", required=True)
    add_label_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
