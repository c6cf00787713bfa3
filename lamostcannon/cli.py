"""The ``label`` command: labels for a user's own LAMOST spectra with a trained Cannon model.

::

    python -m lamostcannon label --model MODEL.fits spectra/*.fits.gz -o labels.fits
    python -m lamostcannon label --model MODEL.fits spectra/ -o labels.parquet --workers 4
    python -m lamostcannon label --model model_dwarf.fits --giant-model model_giant.fits \\
        --pipeline-labels lasp.csv spectra/ -o labels.fits --model-spectra fits.fits

Inputs are files and/or folders (searched recursively for ``*.fits[.gz]``); every LAMOST
low-resolution layout is read (:func:`lamostcannon.spectra.read_lamost`). Each spectrum is
preprocessed exactly as the training spectra (rest frame, common grid, continuum normalisation)
and labelled by the labelling core (:meth:`lamostcannon.labelling.Labeller.label`), the same code
that labels the catalogue.

Models
    ``--model`` alone: every spectrum is labelled with it. With ``--giant-model`` too, ``--model``
    is the dwarf model and paper eq. 1 chooses per spectrum from the LAMOST pipeline's teff/logg
    given by ``--pipeline-labels`` (a table with ``obsid`` or ``filename``, ``teff``, ``logg``);
    spectra without them are fitted with both models and keep the lower reduced chi2 (the
    ``NO_PIPELINE`` bit). Calibrations beside each model file are used when present
    (:func:`lamostcannon.labelling.companion_path`): ``extrapolation_<name>.json`` (KDE
    boundaries), ``uncertainty_<name>.json`` (calibrated errors), ``ood_<name>.json`` (OOD score).

Outputs
-------
``OUTPUT`` (``.fits``, ``.parquet`` or ``.csv``, chosen by the extension)
    One row per labelled file, in input order: ``filename``, ``source``, header metadata
    (``obsid``, ``designation``, ``ra``, ``dec``, ``mjd``, ``z``, ``snru..snrz``, ``class``,
    ``subclass``, ``data_release``, ``layout``), ``model``, ``snr``, the labels, ``e_<label>``
    (calibrated total error), ``e_<label>_random``, ``e_<label>_formal``, ``chi2``,
    ``chi2_per_pixel``, ``n_pixels``, ``n_iter``, ``converged``, ``cannon_flag`` (the Cannon
    bitmask, :data:`lamostcannon.cannon.FLAG_BITS`), ``ood_score``, ``<label>_extrap``,
    ``kde_extrap``, ``outside_training`` and ``quality_flag``
    (:data:`lamostcannon.labelling.QUALITY_BITS`; 0 = recommended for science).
``OUTPUT`` stem + ``.errors.csv``
    One row per input file that was *not* labelled: ``source``, ``reason`` (unreadable,
    truncated, no valid pixels, duplicate obsid, ...). Written on every run (empty when all
    files were labelled).
``--model-spectra PATH`` (optional)
    One FITS file (:class:`lamostcannon.labelling.ModelSpectraWriter`): the normalised data, its
    inverse variance and the model flux at the fitted labels, rows in the order of ``OUTPUT``.

A bad file never stops the run. Outputs are written to a temporary name and renamed into place,
so an interrupted run leaves no partial output. A run claims its output with an OS lock
(``fcntl.flock`` on ``<OUTPUT>.lock``, released when the process ends however it ends): a second
run to the same output while the first is running is refused (the ``--model-spectra`` file is
claimed the same way). An output (or ``--model-spectra``) that is the model, a calibration, the
pipeline-label table or one of the input spectra is refused, even with ``--overwrite``. Exit
status: 0 when at least one file was labelled, 1 when none was, 2 for a usage error (missing
model, existing output without ``--overwrite``, output claimed by another run).
"""

from __future__ import annotations

import argparse
import contextlib
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
           "LabelRun", "errors_path_for", "lock_path_for", "OutputBusyError", "auto_workers",
           "main"]

#: Header metadata copied into the output, in this order.
META_COLUMNS = ("obsid", "designation", "ra", "dec", "mjd", "z", "snru", "snrg", "snrr", "snri",
                "snrz", "class", "subclass", "data_release", "layout")

_OUTPUT_SUFFIXES = (".fits", ".fit", ".parquet", ".csv")

#: Files per worker process before it pays for its start-up (spawn, imports, model and
#: calibration load: seconds, against ~3 ms a file): below it the files are labelled in this
#: process. Measured in ``benchmarks/bench_label_workers.py``: on the 2-core development machine
#: two processes were slower than one for every run up to the 1,726 DR10 files.
FILES_PER_WORKER = 4000


class OutputBusyError(RuntimeError):
    """Another ``label`` run holds the lock on the same output."""


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------

def boundaries_path_for(model_path) -> Path | None:
    """The KDE extrapolation boundaries stored beside a model, or None.

    Looked for, in order: ``<stem>.extrapolation.json`` and, for a model named
    ``model_<name>.<ext>``, ``extrapolation_<name>.json`` (the names notebooks 04 and 09 write,
    :func:`lamostcannon.validation.write_boundaries`).
    """
    from .labelling import companion_path

    return companion_path(model_path, "extrapolation")


def errors_path_for(output) -> Path:
    """The per-file error report beside ``output``: ``<output stem>.errors.csv``."""
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}.errors.csv")


def lock_path_for(output) -> Path:
    """The lock file of a run writing ``output``: ``<output>.lock``."""
    output = Path(output)
    return output.with_name(f"{output.name}.lock")


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


def auto_workers(n_files: int, requested: int, files_per_worker: int = FILES_PER_WORKER,
                 idle_cpus: float | None = None) -> int:
    """Worker processes for ``n_files``: 1 (this process) unless every worker gets at least
    ``files_per_worker`` files, and no more than ``requested`` or the idle CPUs (CPU count minus
    the 1-minute load average; ``idle_cpus`` overrides it). Start-up costs seconds per worker
    (spawn, numpy/astropy imports, the model), which small runs never earn back, and a busy
    machine gives extra processes no core to run on. The labels do not depend on the choice."""
    if idle_cpus is None:
        try:
            idle_cpus = (os.cpu_count() or 1) - os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - no load average on this OS
            idle_cpus = os.cpu_count() or 1
    cap = max(1, int(round(idle_cpus)))
    return int(max(1, min(int(requested), n_files // max(int(files_per_worker), 1), cap)))


@contextlib.contextmanager
def claim_output(output):
    """Hold an exclusive OS lock (``fcntl.flock``) on ``<output>.lock`` for the duration.

    The kernel arbitrates: two runs can never both hold it, and a killed run releases it with its
    process, so a leftover file is never mistaken for a live claim. The file is removed on exit
    (a run that opened the old file re-checks the inode after locking and retries).

    Raises
    ------
    OutputBusyError
        Another process holds the lock.
    """
    import fcntl

    lock = lock_path_for(output)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise OutputBusyError(f"{output} is being written by another label run (pid "
                                  f"{holder}, lock {lock}); wait for it or choose another "
                                  "output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by a finishing run between open and lock: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def _claim_outputs(*outputs):
    """:func:`claim_output` of every path given (None skipped): a run's ``--model-spectra`` file
    is claimed as its output is, so no other run can write either meanwhile."""
    with contextlib.ExitStack() as stack:
        for output in outputs:
            if output is not None:
                stack.enter_context(claim_output(output))
        yield


# --------------------------------------------------------------------------------------------
# Labelling one chunk of files (runs in a worker process or in this one)
# --------------------------------------------------------------------------------------------

_STATE: dict = {}


def _load_state(model_path, boundaries_path, test_chunk, giant_model_path=None,
                pipeline=None, with_spectra=False):
    from .labelling import Labeller, ModelBundle

    if giant_model_path is None:
        models = {"model": ModelBundle.load(model_path, boundaries_path=boundaries_path)}
        models = {models["model"].name: models["model"]}
    else:
        models = {"dwarf": ModelBundle.load(model_path, "dwarf", boundaries_path=boundaries_path),
                  "giant": ModelBundle.load(giant_model_path, "giant")}
    labeller = Labeller(models, test_kwargs={"chunk_size": int(test_chunk)})
    return {"labeller": labeller, "pipeline": pipeline, "with_spectra": bool(with_spectra)}


def _init_worker(*args):
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover
        pass
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lamostcannon.labelling").setLevel(logging.ERROR)  # said by the parent
    _STATE.update(_load_state(*args))


#: Files per batch of the read step: the ingest's batches (``spectra._process_files``), whose
#: continuum products stay in cache; a task of ``chunk_size`` files is read in such batches.
READ_BATCH = 32


def _read_chunk(sources):
    """Read, resample and normalise files exactly as the ingest does (batched, the same bytes
    as the spectra store holds); returns (kept indices, metas, flux, ivar, failures)."""
    from .spectra import MIN_GOOD_PIXELS, _process_files

    keep, metas, fl, iv, failed = [], [], [], [], []
    for a in range(0, len(sources), READ_BATCH):
        part = _process_files(list(sources[a:a + READ_BATCH]), True, MIN_GOOD_PIXELS)
        keep += [a + k for k in part["ok"]]
        metas += part["meta"]
        failed += [(a + k, why) for k, why in part["failed"]]
        fl.append(part["flux"])
        iv.append(part["ivar"])
    if keep:
        flux, ivar = np.concatenate(fl), np.concatenate(iv)
    else:
        flux = ivar = None
    return keep, metas, flux, ivar, failed


def _pipeline_for(meta: pd.DataFrame, pipeline) -> tuple[np.ndarray, np.ndarray]:
    """Pipeline teff, logg per row from ``{"obsid": {id: (t, g)}, "filename": {name: (t, g)}}``."""
    n = len(meta)
    teff, logg = np.full(n, np.nan), np.full(n, np.nan)
    if not pipeline:
        return teff, logg
    by_obsid, by_name = pipeline.get("obsid", {}), pipeline.get("filename", {})
    obsid = meta["obsid"].to_numpy() if "obsid" in meta else np.full(n, -1)
    names = meta["filename"].to_numpy() if "filename" in meta else np.full(n, "")
    for k in range(n):
        hit = by_obsid.get(int(obsid[k])) if obsid[k] is not None and obsid[k] >= 0 else None
        hit = hit or by_name.get(str(names[k]))
        if hit:
            teff[k], logg[k] = hit
    return teff, logg


def _label_chunk_of_files(labeller, flux, ivar, teff, logg, cls=None, z=None):
    """The labelling core on one chunk; if it fails for the batch, spectrum by spectrum."""
    try:
        return labeller.label(flux, ivar, teff, logg, cls, z), {}
    except Exception as exc:  # pragma: no cover - defensive: find the spectrum responsible
        log.warning("labelling failed on a batch (%s); one spectrum at a time", exc)
    parts, bad = [], {}
    for k in range(flux.shape[0]):
        try:
            parts.append(labeller.label(flux[k:k + 1], ivar[k:k + 1], teff[k:k + 1],
                                        logg[k:k + 1], None if cls is None else cls[k:k + 1],
                                        None if z is None else z[k:k + 1]))
        except Exception as exc:  # pragma: no cover
            bad[k] = f"labelling failed: {type(exc).__name__}: {exc}"
    return (pd.concat(parts, ignore_index=True) if parts else labeller.empty(0)), bad


def _label_sources(sources, state) -> tuple[pd.DataFrame, list, tuple | None]:
    """Label a list of files.

    Returns (rows with an ``_index`` column into sources, failures ``[(k, reason)]``, and
    ``(flux, ivar, model_flux)`` of the rows when model spectra were asked for, else None).
    """
    labeller = state["labeller"]
    keep, metas, flux, ivar, failed = _read_chunk(sources)
    if not keep:
        return pd.DataFrame(), failed, None
    meta = pd.DataFrame(metas)
    meta["filename"] = [Path(sources[k]).name for k in keep]
    teff, logg = _pipeline_for(meta, state.get("pipeline"))
    core, bad = _label_chunk_of_files(labeller, flux, ivar, teff, logg,
                                      meta["class"].to_numpy() if "class" in meta else None,
                                      meta["z"].to_numpy(float) if "z" in meta else None)
    if bad:  # pragma: no cover - only after a failed batch
        good = np.array([k for k in range(len(keep)) if k not in bad], dtype=np.int64)
        failed += [(keep[k], why) for k, why in bad.items()]
        keep = [keep[k] for k in good]
        meta = meta.iloc[good].reset_index(drop=True)
        flux, ivar = flux[good], ivar[good]
    out = pd.DataFrame({"_index": np.asarray(keep, np.int64),
                        "filename": [Path(sources[k]).name for k in keep],
                        "source": [str(sources[k]) for k in keep]})
    for col in META_COLUMNS:
        if col in meta.columns:
            out[col] = meta[col].to_numpy()
    out = pd.concat([out, core.reset_index(drop=True)], axis=1)
    spectra = None
    if state.get("with_spectra"):
        spectra = (flux, ivar, labeller.predict(core))
    return out, failed, spectra


def _blas_threads(n: int):
    """Limit BLAS threads for the duration (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(n)
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()


def _worker_task(sources):
    return _label_sources(sources, _STATE)


def _read_pipeline_labels(path) -> dict:
    """``--pipeline-labels``: ``{"obsid": {id: (teff, logg)}, "filename": {name: (teff, logg)}}``
    (non-physical values, LAMOST's -9999, are dropped)."""
    from .labels import pipeline_value
    from .real import read_label_table

    t = read_label_table(path, label_names=("teff", "logg"))
    teff = pipeline_value(t["teff"], "teff")
    logg = pipeline_value(t["logg"], "logg")
    ok = np.isfinite(teff) & np.isfinite(logg)
    out = {"obsid": {}, "filename": {}}
    if "obsid" in t:
        ob = t["obsid"].to_numpy(np.int64)
        out["obsid"] = {int(o): (float(a), float(b)) for o, a, b, k in zip(ob, teff, logg, ok)
                        if k and o >= 0}
    if "filename" in t:
        out["filename"] = {str(n).split("/")[-1]: (float(a), float(b)) for n, a, b, k in
                           zip(t["filename"], teff, logg, ok) if k}
    return out


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
    workers: int = 1
    model_spectra: Path | None = None

    def summary(self) -> str:
        extra = f"; model spectra in {self.model_spectra}" if self.model_spectra else ""
        return (f"labelled {self.n_labelled} of {self.n_input} files in {self.seconds:.1f} s "
                f"on {self.workers} process{'es' if self.workers > 1 else ''} "
                f"({self.n_failed} not labelled, listed in {self.errors}; {self.n_flagged} with "
                f"quality_flag != 0) -> {self.output}{extra}")


def _describe(columns, label_names):
    from .cannon import FLAG_BITS
    from .labelling import quality_flag_description
    from .labels import unit

    desc = {
        "filename": ("", "base name of the spectrum file"),
        "source": ("", "path of the spectrum file as given"),
        "obsid": ("", "LAMOST observation id (-1 when the file has none)"),
        "designation": ("", "LAMOST designation"),
        "ra": ("deg", "right ascension (file header)"), "dec": ("deg", "declination"),
        "mjd": ("d", "modified Julian date (file header)"),
        "z": ("", "LAMOST pipeline redshift used for the rest frame"),
        "class": ("", "LAMOST pipeline class (file header)"),
        "subclass": ("", "LAMOST pipeline subclass (file header)"),
        "data_release": ("", "LAMOST data release (file header)"),
        "layout": ("", "file layout: dr1-3, dr4-9 or dr10+"),
        "model": ("", "name of the model that labelled the spectrum"),
        "snr": ("", "median flux*sqrt(ivar) over usable pixels of the normalised spectrum"),
        "chi2": ("", "chi2 of the best-fit model over the pixels used"),
        "chi2_per_pixel": ("", "chi2 / n_pixels"),
        "n_pixels": ("", "pixels used in the fit"),
        "n_iter": ("", "Newton iterations"), "converged": ("", "the fit converged"),
        "cannon_flag": ("", "Cannon bitmask: " + ", ".join(f"{b}={n}" for b, (n, _) in
                                                           FLAG_BITS.items())),
        "ood_score": ("", "how unlike the training set the spectrum is (lamostcannon.ood)"),
        "kde_extrap": ("", "teff, logg or [Fe/H] beyond its KDE extrapolation boundary"),
        "outside_training": ("", "teff, logg or [Fe/H] outside the training-set range"),
        "quality_flag": ("", quality_flag_description()),
    }
    for band in "ugriz":
        desc[f"snr{band}"] = ("", f"S/N per pixel in the {band} band (file header)")
    for n in label_names:
        desc[n] = (unit(n), f"{n} from the Cannon test step")
        desc[f"e_{n}"] = (unit(n), f"calibrated total 1-sigma error of {n} (random + floor)")
        desc[f"e_{n}_random"] = (unit(n), f"visit-to-visit (random) 1-sigma error of {n}")
        desc[f"e_{n}_formal"] = (unit(n), f"formal 1-sigma error of {n} (inverse Hessian)")
        desc[f"{n}_extrap"] = ("", f"{n} beyond its KDE extrapolation boundary")
        desc[f"chi2_{n}"] = ("", f"chi2 in the GALAH line windows of {n}")
    return {c: desc[c] for c in columns if c in desc}


def _write_output(df: pd.DataFrame, path: Path, label_names, labeller) -> None:
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
            from .labelling import QUALITY_BITS

            t = Table.from_pandas(df)
            for col, (u, d) in _describe(df.columns, label_names).items():
                if u:
                    t[col].unit = u
                t[col].description = d
            for name, bundle in labeller.models.items():
                key = "" if len(labeller.models) == 1 else name[:1].upper()
                t.meta[f"MODEL{key}"] = Path(bundle.sources.get("model", name)).name
                if bundle.ood is not None:
                    t.meta[f"OODTHR{key}"] = round(float(bundle.ood.threshold), 4)
                noskill = bundle.unskilled_labels()
                if noskill:
                    t.meta[f"NOSKILL{key}"] = ",".join(noskill)
            for b, (n, _) in QUALITY_BITS.items():
                t.meta[f"QF{b}"] = n
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


def label_files(model_path, inputs, output, *, workers: int | None = 1, chunk_size: int = 512,
                test_chunk: int = 256, boundaries_path=None, overwrite: bool = False,
                progress: bool = True, giant_model_path=None, pipeline_labels=None,
                model_spectra=None) -> LabelRun:
    """Label LAMOST files with a trained model; see the module docstring for the outputs.

    Parameters
    ----------
    model_path : path
        A model written by :meth:`lamostcannon.cannon.CannonModel.write` (the dwarf model when
        ``giant_model_path`` is given).
    inputs : sequence of paths
        Files and/or folders (:func:`collect_inputs`).
    output : path
        ``.fits``, ``.parquet`` or ``.csv``.
    workers : int or None
        Processes (at most one per task). ``None`` (the command's default): up to the
        ``LAMOSTCANNON_WORKERS`` setting, as many as pay for their start-up
        (:func:`auto_workers`): small runs stay in this process.
    chunk_size : int
        Files per task (memory ~ ``chunk_size`` x 3909 x 16 bytes per worker). The labelling
        core has a fixed cost per call (~45 ms on the mock's two models), so small tasks are
        slow: 1.9 ms of CPU per file at 64 files against 1.2-1.3 at 1024.
    test_chunk : int
        Spectra per batch of the test step.
    boundaries_path : path, optional
        KDE boundaries JSON of ``model_path``; default: found beside the model.
    overwrite : bool
        Replace an existing output.
    progress : bool
        Show a progress bar (tqdm, on stderr).
    giant_model_path : path, optional
        The giant model: eq. 1 chooses between the two (see the module docstring).
    pipeline_labels : path, optional
        LAMOST pipeline teff/logg per ``obsid`` or ``filename`` for eq. 1.
    model_spectra : path, optional
        Also write the data and best-fit model spectra of every labelled file (FITS).

    Returns
    -------
    LabelRun

    Raises
    ------
    FileNotFoundError
        The model file does not exist.
    FileExistsError
        The output exists and ``overwrite`` is False.
    OutputBusyError
        Another run is writing the same output.
    ValueError
        Bad arguments, or a model file that cannot be read.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    model_path = Path(model_path)
    output = Path(output)
    if output.suffix.lower() not in _OUTPUT_SUFFIXES:
        raise ValueError(f"output must end in one of {_OUTPUT_SUFFIXES}, got {output.name!r}")
    if model_spectra is not None and not str(model_spectra).lower().endswith((".fits", ".fit")):
        raise ValueError(f"--model-spectra must end in .fits, got {model_spectra!r}")
    if model_spectra is not None and Path(model_spectra).resolve() == output.resolve():
        raise ValueError("--model-spectra must differ from the output")
    auto = workers is None
    if auto:
        from .config import settings

        workers = settings().n_workers
    if chunk_size < 1 or workers < 1 or test_chunk < 1:
        raise ValueError(f"chunk_size, workers and test_chunk must be >= 1, got {chunk_size}, "
                         f"{workers}, {test_chunk}")
    for p in (model_path, giant_model_path):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"no model file at {p}")
    # an output must never replace a file the run reads (with --overwrite it would)
    given = {os.path.realpath(p): opt for p, opt in (
        (model_path, "--model"), (giant_model_path, "--giant-model"),
        (pipeline_labels, "--pipeline-labels"), (boundaries_path, "--boundaries")) if p is not None}
    for p, opt in ((output, "--output"), (errors_path_for(output), "the error report"),
                   (model_spectra, "--model-spectra")):
        if p is not None and os.path.realpath(p) in given:
            raise ValueError(f"{opt} {p} is the {given[os.path.realpath(p)]} file; choose "
                             "another path")
    with _claim_outputs(output, model_spectra):
        if output.exists() and not overwrite:
            raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
        if model_spectra is not None and Path(model_spectra).exists() and not overwrite:
            raise FileExistsError(f"{model_spectra} exists; pass --overwrite to replace it")
        pipeline = _read_pipeline_labels(pipeline_labels) if pipeline_labels else None
        args = (str(model_path), boundaries_path and str(boundaries_path), test_chunk,
                giant_model_path and str(giant_model_path), pipeline, model_spectra is not None)
        try:
            state = _load_state(*args)  # fails early on a bad model
        except (KeyError, TypeError, ValueError) as exc:  # a damaged model or calibration file
            raise ValueError(f"cannot load the model {model_path}"
                             f"{'' if giant_model_path is None else f' or {giant_model_path}'}"
                             f" with its calibrations: {type(exc).__name__}: {exc}") from exc
        labeller = state["labeller"]
        for bundle in labeller.models.values():
            _check_grid(bundle)
        names = labeller.label_names
        files = collect_inputs(inputs)
        sources = [str(f) for f in files]
        outputs = {os.path.abspath(p): opt for p, opt in ((output, "--output"),
                                                           (model_spectra, "--model-spectra"))
                   if p is not None}
        clash = [(s_, outputs[s_]) for s_ in sources if s_ in outputs]
        if clash:
            raise ValueError(f"{clash[0][1]} {clash[0][0]} is also one of the input spectra; "
                             "choose another path")
        from .spectra import printable_path, unencodable_name

        errors = {i: why for i, why in enumerate(map(unencodable_name, sources)) if why}
        usable = [i for i in range(len(sources)) if i not in errors] if errors else \
            range(len(sources))
        tasks = [list(usable[a:a + chunk_size]) for a in range(0, len(usable), chunk_size)]
        n_proc = min(auto_workers(len(sources), workers) if auto else workers, max(len(tasks), 1))
        parts, seen = [], {}
        writer = None
        if model_spectra is not None:
            from .labelling import ModelSpectraWriter

            first = next(iter(labeller.models.values()))
            writer = ModelSpectraWriter(model_spectra, first.wavelength)

        def take(task, result):
            rows, failed, spectra = result
            for k, why in failed:
                errors[task[k]] = why
            if not len(rows):
                return
            rows = rows.copy()
            rows["_index"] = np.asarray(task)[rows["_index"].to_numpy()]
            # one row per observation: later copies (in input order) are reported
            keep = np.ones(len(rows), bool)
            if "obsid" in rows:
                for j, (idx, ob, src) in enumerate(zip(rows["_index"], rows["obsid"],
                                                       rows["source"])):
                    ob = -1 if pd.isna(ob) else int(ob)
                    if ob < 0:
                        continue
                    if ob in seen:
                        errors[int(idx)] = f"duplicate obsid {ob}: already labelled from {seen[ob]}"
                        keep[j] = False
                    else:
                        seen[ob] = src
            rows = rows.loc[keep].reset_index(drop=True)
            parts.append(rows)
            if writer is not None and len(rows):
                flux, ivar, model_flux = (a[keep] for a in spectra)
                cols = [c for c in ("filename", "obsid", "designation", "model", *names,
                                    "snr", "quality_flag", "ood_score", "chi2_per_pixel")
                        if c in rows]
                writer.add(rows[cols], flux, ivar, model_flux)

        bar = tqdm(total=len(usable), desc="label", unit="file", disable=not progress,
                   file=sys.stderr)
        try:
            if n_proc <= 1:
                with _blas_threads(1):
                    for task in tasks:
                        take(task, _label_sources([sources[i] for i in task], state))
                        bar.update(len(task))
            else:
                _run_pool(tasks, sources, n_proc, args, take, bar)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            bar.close()

        df = pd.concat(parts, ignore_index=True) if parts else None
        if df is not None:
            df = df.drop(columns="_index")
        else:
            df = _empty_frame(labeller)
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_output(df, output, names, labeller)
            err_path = errors_path_for(output)
            _write_errors([(printable_path(sources[i]), errors[i]) for i in sorted(errors)],
                          err_path)
            spectra_path = writer.close({"output": output.name}) if writer is not None else None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    flagged = int((df["quality_flag"] != 0).sum()) if len(df) else 0
    run = LabelRun(output, err_path, len(sources), len(df), len(errors), flagged,
                   time.perf_counter() - t0, n_proc, spectra_path)
    log.info(run.summary())
    return run


def _check_grid(bundle) -> None:
    """The files are resampled onto the common grid: a model of another grid would give labels
    from misaligned pixels (no error, wrong labels), or fail on every file."""
    from .spectra import N_PIXELS, common_wavelength

    model = bundle.model
    wl = getattr(model, "wavelength", None)
    n = int(np.asarray(model.theta).shape[0])
    same = n == N_PIXELS and (wl is None or np.allclose(np.asarray(wl, float),
                                                          common_wavelength(), rtol=1e-7,
                                                          atol=0.0))
    if not same:
        where = "" if wl is None else (f" from {float(np.min(wl)):.2f} to {float(np.max(wl)):.2f}"
                                        " A")
        source = bundle.sources.get("model", bundle.name)
        raise ValueError(f"the model {source} is on a grid of {n} pixels{where}; the label "
                         f"command puts spectra on the common grid ({N_PIXELS} pixels, "
                         f"{common_wavelength()[0]:.2f} to {common_wavelength()[-1]:.2f} A): "
                         "train the model on that grid")


def _empty_frame(labeller) -> pd.DataFrame:
    head = pd.DataFrame({"filename": pd.Series(dtype=str), "source": pd.Series(dtype=str)})
    for c in META_COLUMNS:
        head[c] = pd.Series(dtype=np.int64 if c in ("obsid", "mjd") else
                            str if c in ("designation", "class", "subclass", "data_release",
                                         "layout") else float)
    return pd.concat([head, labeller.empty(0)], axis=1)


def _run_pool(tasks, sources, workers, initargs, take, bar) -> None:
    """Tasks on ``workers`` spawned processes (one BLAS thread each), taken in task order."""
    from .parallel import ordered_map

    def failed(index, exc):  # a crashed worker: report its files, go on
        return (pd.DataFrame(), [(k, f"worker failed: {type(exc).__name__}: {exc}")
                                 for k in range(len(tasks[index]))], None)

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
  OUTPUT                one row per labelled file: model, snr, labels, e_<label> (calibrated
                        total error), e_<label>_random, e_<label>_formal, chi2, chi2_per_pixel,
                        n_pixels, cannon_flag, ood_score, <label>_extrap, kde_extrap,
                        outside_training and quality_flag (0 = recommended for science; bits:
                        1 KDE_EXTRAP, 2 OUTSIDE_TRAINING, 4 AT_BOUND, 8 NOT_CONVERGED,
                        16 MULTIPLE_MINIMA, 32 POOR_FIT, 64 UNLIKE_TRAINING, 128 NO_PIPELINE,
                        256 LOW_SNR, 512 FIT_FAILED, 1024 NOT_STELLAR)
  <OUTPUT stem>.errors.csv
                        one row per file that was not labelled, with the reason
  --model-spectra PATH  data and best-fit model spectra of every labelled file (FITS)

calibrations are read from beside each model (model_<name>.fits): extrapolation_<name>.json
(KDE boundaries), uncertainty_<name>.json (calibrated errors), ood_<name>.json (OOD score);
--boundaries overrides the first.

examples:
  python -m lamostcannon label --model data/processed/model_real_dr10.fits \\
      spectra/*.fits.gz -o labels.fits
  python -m lamostcannon label --model data/processed/model_dwarf.fits \\
      --giant-model data/processed/model_giant.fits --pipeline-labels lasp.csv \\
      spectra/ -o labels.parquet --model-spectra fits.fits
"""


def _label_command(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        run = label_files(args.model, args.inputs, args.output, workers=args.workers,
                          chunk_size=args.chunk_size, boundaries_path=args.boundaries,
                          overwrite=args.overwrite, progress=not args.no_progress,
                          giant_model_path=args.giant_model,
                          pipeline_labels=args.pipeline_labels,
                          model_spectra=args.model_spectra)
    except (FileNotFoundError, FileExistsError, ValueError, OutputBusyError) as exc:
        print(f"label: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("label: interrupted; no output written (outputs are renamed into place only "
              "when complete)", file=sys.stderr)
        return 130
    except OSError as exc:  # e.g. an output folder that cannot be written
        print(f"label: error: {exc.strerror or exc}: "
              f"{exc.filename if exc.filename else args.output}", file=sys.stderr)
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
    p.add_argument("--model", "-m", required=True,
                   help="model file (CannonModel.write); the dwarf model with --giant-model")
    p.add_argument("--giant-model", default=None,
                   help="giant model file: choose per spectrum with eq. 1 (see --pipeline-labels)")
    p.add_argument("--pipeline-labels", default=None,
                   help="table (csv/fits/parquet) of obsid or filename, teff, logg from the LAMOST "
                        "pipeline, for eq. 1")
    p.add_argument("--output", "-o", required=True,
                   help="output table: .fits, .parquet or .csv (by extension)")
    p.add_argument("--model-spectra", default=None, metavar="PATH",
                   help="also write the data and best-fit model spectra (one .fits file)")
    p.add_argument("--workers", "-j", type=int, default=None,
                   help="processes (default: up to LAMOSTCANNON_WORKERS or the CPU count, "
                        f"one per {FILES_PER_WORKER} files and idle CPU: small runs stay in "
                        "one process)")
    p.add_argument("--chunk-size", type=int, default=512, help="files per task (default 512)")
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
