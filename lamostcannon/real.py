"""Real LAMOST spectra: label transfer from the LAMOST pipeline, precision from repeats.

The mock universe proves the pipeline; real spectra prove the method. This module holds the
science logic of ``notebooks/09_real_lamost_spectra.ipynb``:

* where the real files are (:func:`real_sources`, environment variables below) and a clear
  :class:`RealDataMissing` error when they are absent;
* the label table (:func:`read_label_table`: the LAMOST DR10 ``catalog.csv`` with the LAMOST
  pipeline's (LASP) teff, logg, [Fe/H], or any table of a user's with those columns);
* the training sample (:func:`build_sample`): spectra ingested into a
  :class:`~lamostcannon.store.SpectraStore` and aligned row by row with the label table, with the
  S/N cut (``snrg > 30``) and the FGK cut (LASP ``teff < 7000 K``, :data:`TEFF_MAX`);
* extrapolation flags for any set of inferred labels (:func:`extrapolation_table`): the KDE
  boundaries of :mod:`lamostcannon.validation` and the model's training range;
* precision from repeat observations (:func:`read_repeat_groups`, :func:`repeat_pairs`,
  :func:`pair_differences`, :func:`pair_spreads`): for two visits ``1, 2`` of one star,
  ``z = (l_1 - l_2) / sqrt(sigma_1^2 + sigma_2^2)`` has unit spread when the formal errors are
  right.

Environment variables
---------------------
==============================  ==========================================================
``LAMOSTCANNON_REAL_SPECTRA``   folder of LAMOST ``spec-*.fits[.gz]`` files (any layout) to
                                train on; default ``<real_lamost_dir>/dr10``
``LAMOSTCANNON_REAL_LABELS``    label table (CSV, FITS or Parquet) with ``filename`` (or
                                ``obsid``), ``teff``, ``logg``, ``feh`` (or ``fe_h``) and
                                optionally ``snrg``; default ``<spectra>/catalog.csv``
``LAMOSTCANNON_REAL_REPEATS``   folder with repeat observations and a ``groups.csv``
                                (``GroupID`` shared by visits of one star); default
                                ``<real_lamost_dir>/dr8_repeats``; optional
``LAMOSTCANNON_LAMOST_DIR``     the folder holding ``dr10/``, ``dr8_repeats/`` (see
                                :func:`lamostcannon.paths.real_lamost_dir`)
``LAMOSTCANNON_REAL_FETCH``     ``0`` forbids the archive fallback below (default: allowed)
==============================  ==========================================================

Without that folder (and without ``LAMOSTCANNON_REAL_SPECTRA``), :func:`real_sources` falls
back to the archive: the package ships notebook 09's sample as small tables (no spectra):
``lamostcannon/data/real_dr10_sample.csv`` (obsid, filename, class, subclass, snrg and the LASP
teff, logg, feh, ra, dec, z of the 1726 DR10 files) and ``real_dr8_repeat_groups.csv`` (the
DR8 repeat visits and their ``GroupID``); :func:`fetch_real_spectra` downloads those spectra by
obsid with :mod:`lamostcannon.archives` (verified, resumable, idempotent) into
``data/raw/real_lamost/dr10/`` and ``.../dr8_repeats/``, laid out like the shared folder, so the
products keep their names (``real_dr10``). Offline, :class:`RealDataMissing` says what to set.

The LAMOST files are public data products of the Guoshoujing Telescope (LAMOST); any use must
carry the LAMOST acknowledgement (https://www.lamost.org/policies/).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import paths

log = logging.getLogger(__name__)

__all__ = [
    "ENV_SPECTRA", "ENV_LABELS", "ENV_REPEATS", "LABEL_NAMES", "TEFF_MAX", "SNR_MIN",
    "RealDataMissing", "RealSources", "real_sources", "fetch_real_spectra", "fetched_dir",
    "shipped_table", "run_name", "read_label_table",
    "store_path_for", "load_spectra", "training_selection", "RealSample", "build_sample",
    "extrapolation_table", "flag_fractions", "read_repeat_groups", "load_repeats",
    "repeat_pairs", "pair_differences", "pair_spreads", "robust_std", "pair_table",
    "flag_evaluation", "degrade", "CATASTROPHIC_TEFF",
]

ENV_SPECTRA = "LAMOSTCANNON_REAL_SPECTRA"
ENV_LABELS = "LAMOSTCANNON_REAL_LABELS"
ENV_REPEATS = "LAMOSTCANNON_REAL_REPEATS"
ENV_FETCH = "LAMOSTCANNON_REAL_FETCH"
#: Package tables of notebook 09's sample (see the module docstring).
SAMPLE_TABLE = "real_dr10_sample.csv"
REPEATS_TABLE = "real_dr8_repeat_groups.csv"

#: The labels transferred from the LAMOST pipeline (LASP): teff (K), logg, [Fe/H] (dex).
LABEL_NAMES = ("teff", "logg", "fe_h")

#: FGK training sample: LASP teff below this (K). The 160 hotter DR10 stars are the test of the
#: extrapolation flags.
TEFF_MAX = 7000.0

#: S/N cut of the training sample: ``snrg`` (S/N per pixel in the g band) above this.
SNR_MIN = 30.0

_COLUMN_ALIASES = {"feh": "fe_h", "[fe/h]": "fe_h", "fe/h": "fe_h", "snr_g": "snrg",
                   "file": "filename", "teff_lasp": "teff", "logg_lasp": "logg"}


class RealDataMissing(FileNotFoundError):
    """The real LAMOST files (or the label table) are not where the settings say.

    The message names the path that was looked for and the environment variables to set.
    """


@dataclass(frozen=True)
class RealSources:
    """Where the real-spectra analysis reads from.

    Attributes
    ----------
    spectra_dir : Path
        Folder of LAMOST spectrum files to train on.
    labels_path : Path
        Label table of those files.
    repeats_dir : Path or None
        Folder of repeat observations (with ``groups.csv``), or None when there is none.
    """

    spectra_dir: Path
    labels_path: Path
    repeats_dir: Path | None = None

    @property
    def groups_path(self) -> Path | None:
        return None if self.repeats_dir is None else self.repeats_dir / "groups.csv"


_HOW_TO = (f"Set {ENV_SPECTRA} to a folder of LAMOST spec-*.fits[.gz] files and {ENV_LABELS} to "
           "their label table (columns filename or obsid, teff, logg, feh; optional snrg), or "
           "LAMOSTCANNON_LAMOST_DIR to the folder that holds dr10/ (with catalog.csv) and "
           "dr8_repeats/ (with groups.csv). Without real spectra skip notebook 09.")


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser().resolve() if value else None


def real_sources(*, require_repeats: bool = False) -> RealSources:
    """Locate the real spectra, their labels and the repeat observations.

    Without the default folder (``<real_lamost_dir>/dr10``) and without
    ``LAMOSTCANNON_REAL_SPECTRA``, the spectra of notebook 09's shipped sample are fetched from
    the LAMOST archive by obsid (:func:`fetch_real_spectra`; a second call fetches nothing),
    unless ``LAMOSTCANNON_REAL_FETCH=0``.

    Parameters
    ----------
    require_repeats : bool
        Raise when no repeat folder with a ``groups.csv`` is found (default: return None for it).

    Returns
    -------
    RealSources

    Raises
    ------
    RealDataMissing
        A folder or table is missing and cannot be fetched; the message says what to set.
    """
    chosen = _env_path(ENV_SPECTRA)
    spectra = chosen or paths.real_lamost_dir() / "dr10"
    fetched = None
    if not spectra.is_dir():
        if chosen is not None:
            raise RealDataMissing(f"no folder of real LAMOST spectra at {spectra}. {_HOW_TO}")
        fetched = _fetch_fallback(spectra)
        spectra = fetched / "dr10"
    labels = _env_path(ENV_LABELS) or spectra / "catalog.csv"
    if not labels.is_file():
        raise RealDataMissing(f"no label table at {labels}. {_HOW_TO}")
    repeats = _env_path(ENV_REPEATS) or paths.real_lamost_dir() / "dr8_repeats"
    if not (repeats / "groups.csv").is_file() and fetched is not None \
            and _env_path(ENV_REPEATS) is None:
        repeats = fetched / "dr8_repeats"
    if not (repeats / "groups.csv").is_file():
        if require_repeats:
            raise RealDataMissing(f"no repeat observations (groups.csv) in {repeats}. Set "
                                  f"{ENV_REPEATS} to a folder of repeat LAMOST files with a "
                                  "groups.csv (columns GroupID and combined_file or filename).")
        repeats = None
    return RealSources(spectra, labels, repeats)


def fetched_dir() -> Path:
    """Where :func:`fetch_real_spectra` writes: ``<data>/raw/real_lamost`` (``dr10/``,
    ``dr8_repeats/``, ``manifest.json``)."""
    return paths.data_dir() / "raw" / "real_lamost"


def shipped_table(name: str = SAMPLE_TABLE) -> Path:
    """Path of a table shipped with the package (:data:`SAMPLE_TABLE`, :data:`REPEATS_TABLE`)."""
    from importlib.resources import files

    return Path(str(files("lamostcannon") / "data" / name))


def fetch_real_spectra(out_dir=None, *, repeats: bool = True, downloader=None,
                       dr10_url: str | None = None, dr8_url: str | None = None) -> dict:
    """Download notebook 09's sample by obsid: the DR10 spectra of :data:`SAMPLE_TABLE` and
    (with ``repeats``) the DR8 repeat visits of :data:`REPEATS_TABLE`.

    Parameters
    ----------
    out_dir : path, optional
        Default :func:`fetched_dir`. Written: ``dr10/<filename>`` + ``dr10/catalog.csv``,
        ``dr8_repeats/<file>`` + ``dr8_repeats/groups.csv``, ``manifest.json``.
    repeats : bool
        Also fetch the DR8 repeat visits.
    downloader : lamostcannon.archives.Downloader, optional
        Retry, timeout and concurrency settings.
    dr10_url, dr8_url : str, optional
        ``{obsid}`` URL templates; default the archive addresses
        (``LAMOSTCANNON_LAMOST_URL`` with the DR10 release, ``LAMOSTCANNON_LAMOST_DR8_URL``).

    Returns
    -------
    dict
        ``{"dr10": FetchReport, "dr8_repeats": FetchReport}``: files fetched, already there,
        failed (with reasons).

    Raises
    ------
    lamostcannon.archives.ArchiveUnavailable
        The archive cannot be reached.
    """
    from .archives import Downloader, Endpoints, FileTask, Manifest, validate_lamost
    from .archives.sources import lamost_dr8_spectra
    from .spectra import MAX_SPECTRUM_BYTES

    out = Path(out_dir) if out_dir is not None else fetched_dir()
    dl = downloader or Downloader(progress=True, timeout=(5.0, 60.0))
    manifest = Manifest(out, source="lamost")
    sample = pd.read_csv(shipped_table(SAMPLE_TABLE))
    jobs = {"dr10": (dr10_url or Endpoints(lamost_release="dr10").lamost_spectra,
                     list(zip(sample["obsid"], sample["filename"])), SAMPLE_TABLE, "catalog.csv",
                     "LAMOST DR10 spectra of notebook 09's sample")}
    if repeats:
        groups = read_repeat_groups(shipped_table(REPEATS_TABLE))
        jobs["dr8_repeats"] = (dr8_url or lamost_dr8_spectra(),
                               list(zip(groups["obsid"], groups["filename"])), REPEATS_TABLE,
                               "groups.csv", "LAMOST DR8 repeat visits of notebook 09")
    reports = {}
    for folder, (template, items, table, name, what) in jobs.items():
        tasks = [FileTask(template.format(obsid=int(o)), f"{folder}/{f}", key=str(int(o)),
                          max_bytes=MAX_SPECTRUM_BYTES) for o, f in items if int(o) >= 0]
        reports[folder] = dl.fetch_many(tasks, out, manifest, what=what,
                                        validate=validate_lamost)
        dest = out / folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_bytes(shipped_table(table).read_bytes())
        os.replace(tmp, dest)
        rep = reports[folder]
        log.log(logging.WARNING if rep.failures else logging.INFO,
                "%s: %d fetched, %d already there, %d failed%s", what, len(rep.fetched),
                len(rep.skipped), len(rep.failures),
                f" (e.g. obsid {rep.failures[0].key}: {rep.failures[0].reason})"
                if rep.failures else "")
    return reports


def _fetch_fallback(missing: Path) -> Path:
    """Fetch the shipped sample (see :func:`real_sources`); its folder, or RealDataMissing."""
    from .archives import ArchiveUnavailable

    if os.environ.get(ENV_FETCH, "").strip().lower() in ("0", "no", "false", "off"):
        raise RealDataMissing(f"no folder of real LAMOST spectra at {missing} (and "
                              f"{ENV_FETCH}=0 forbids fetching the sample). {_HOW_TO}")
    out = fetched_dir()
    log.warning("no real LAMOST spectra at %s: fetching notebook 09's sample (%s) by obsid from "
                "the LAMOST archive into %s", missing, SAMPLE_TABLE, out)
    try:
        reports = fetch_real_spectra(out)
    except ArchiveUnavailable as exc:
        raise RealDataMissing(f"no folder of real LAMOST spectra at {missing}, and the LAMOST "
                              f"archive is not reachable to fetch notebook 09's sample "
                              f"({exc.reason}; tried {exc.url}). {_HOW_TO}") from None
    if not reports["dr10"].fetched and not reports["dr10"].skipped:
        first = reports["dr10"].failures[0] if reports["dr10"].failures else None
        raise RealDataMissing(f"no folder of real LAMOST spectra at {missing}, and no spectrum "
                              f"of notebook 09's sample could be fetched"
                              f"{f' (e.g. obsid {first.key}: {first.reason})' if first else ''}."
                              f" {_HOW_TO}")
    return out


def run_name(sources: RealSources) -> str:
    """Name of the products of a real-spectra run: ``real_dr10`` for the default folder, else
    ``real_<folder name>`` (``model_<name>.fits``, ``extrapolation_<name>.json``, ...)."""
    default = (paths.real_lamost_dir() / "dr10").resolve()
    if Path(sources.spectra_dir).resolve() == default:
        return "real_dr10"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(sources.spectra_dir).name)
    return f"real_{safe or 'spectra'}"


def _read_any_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".txt")):
        return pd.read_csv(path)
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if name.endswith((".fits", ".fit", ".fits.gz")):
        from astropy.table import Table

        t = Table.read(path)
        return t.to_pandas()
    raise ValueError(f"{path}: label table must be .csv, .parquet or .fits, got {path.suffix!r}")


def read_label_table(path, label_names=LABEL_NAMES) -> pd.DataFrame:
    """Read a label table and give its columns the package's names.

    Column names are matched case-insensitively; ``feh`` / ``[Fe/H]`` become ``fe_h``.

    Parameters
    ----------
    path : path
        CSV, Parquet or FITS; one row per spectrum file.
    label_names : sequence of str
        Labels that must be present (default teff, logg, fe_h).

    Returns
    -------
    pandas.DataFrame
        The table with lower-case columns, at least ``filename`` or ``obsid`` and the labels
        (float); ``snrg`` when the table has it.

    Raises
    ------
    ValueError
        A required column is missing (the message lists the columns found).
    """
    path = Path(path)
    df = _read_any_table(path)
    rename = {}
    for col in df.columns:
        low = str(col).strip().lower()
        rename[col] = _COLUMN_ALIASES.get(low, low)
    df = df.rename(columns=rename)
    df = df.loc[:, ~df.columns.duplicated()]
    missing = [n for n in label_names if n not in df.columns]
    if missing or not ({"filename", "obsid"} & set(df.columns)):
        need = list(missing) + ([] if {"filename", "obsid"} & set(df.columns)
                                else ["filename or obsid"])
        raise ValueError(f"{path}: label table lacks {need}; it has columns {list(df.columns)}")
    from .labels import pipeline_value

    for n in label_names:
        # LAMOST's -9999 (and any other non-physical pipeline value) is missing
        df[n] = pipeline_value(pd.to_numeric(df[n], errors="coerce").astype(float), n)
    if "snrg" in df.columns:
        df["snrg"] = pd.to_numeric(df["snrg"], errors="coerce").astype(float)
    if "obsid" in df.columns:
        df["obsid"] = pd.to_numeric(df["obsid"], errors="coerce").fillna(-1).astype(np.int64)
    if "filename" in df.columns:
        df["filename"] = df["filename"].astype(str).str.strip()
    return df.reset_index(drop=True)


def store_path_for(folder, name: str = "real") -> Path:
    """Spectra store for a folder of real files: ``<interim>/<name>_<hash>.zarr``.

    The short hash of the folder's absolute path keeps stores of different folders apart.
    """
    digest = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:8]
    return paths.interim_dir() / f"{name}_{digest}.zarr"


def load_spectra(files, store_path, *, n_workers=None, progress: bool = False):
    """Ingest files into a spectra store and read them back aligned with ``files``.

    Parameters
    ----------
    files : sequence of paths (N,)
    store_path : path
        The :class:`~lamostcannon.store.SpectraStore` (created or resumed).
    n_workers : int, optional
        Ingest processes (default the ``LAMOSTCANNON_WORKERS`` setting).
    progress : bool
        Show the ingest progress bar.

    Returns
    -------
    flux, ivar : ndarray (N, 3909) float32
        Continuum-normalised spectra on the common grid; ``flux = 1, ivar = 0`` for unreadable
        files.
    meta : pandas.DataFrame (N rows)
        The store metadata of each file (header S/N, obsid, ...) plus ``status``, ``reason``
        from the ingest report and ``ok`` (the file gave a spectrum).
    """
    from .spectra import N_PIXELS
    from .store import SpectraStore, ingest

    files = [os.path.abspath(f) for f in files]
    report = ingest(files, store_path, n_workers=n_workers, progress=progress)
    with SpectraStore(store_path) as store:
        rows = report["row"].to_numpy().copy()
        dup = (report["status"] == "duplicate").to_numpy()
        if dup.any():  # an obsid stored from another file: use that row
            rows[dup] = store.rows_for(report.loc[dup, "obsid"].to_numpy())
        ok = rows >= 0
        flux = np.ones((len(files), N_PIXELS), np.float32)
        ivar = np.zeros((len(files), N_PIXELS), np.float32)
        if ok.any():
            flux[ok], ivar[ok] = store.read(rows[ok])
        stored = store.meta
    meta = stored.reindex(np.where(ok, rows, -1)).reset_index(drop=True)
    meta["source"] = files
    meta["status"] = report["status"].to_numpy()
    meta["reason"] = report["reason"].fillna("").to_numpy()
    meta["ok"] = ok
    n_bad = int((~ok).sum())
    if n_bad:
        log.warning("%d of %d files gave no spectrum (see the 'reason' column)", n_bad, len(files))
    return flux, ivar, meta


def training_selection(table: pd.DataFrame, *, snr_min: float = SNR_MIN,
                       teff_max: float = TEFF_MAX, label_names=LABEL_NAMES) -> np.ndarray:
    """The training cut: finite labels, ``teff < teff_max`` and ``snrg > snr_min``.

    Parameters
    ----------
    table : DataFrame
        Label table (:func:`read_label_table`); the S/N column ``snrg`` is used when present.

    Returns
    -------
    ndarray (N,) bool
    """
    lab = np.column_stack([table[n].to_numpy(float) for n in label_names])
    sel = np.all(np.isfinite(lab), axis=1)
    with np.errstate(invalid="ignore"):
        sel &= table["teff"].to_numpy(float) < teff_max
        if "snrg" in table.columns:
            sel &= table["snrg"].to_numpy(float) > snr_min
    return sel


@dataclass
class RealSample:
    """Real spectra aligned with their label table.

    Attributes
    ----------
    table : DataFrame (N rows)
        The label table plus ``source`` (file path), ``ok`` (a spectrum was read),
        ``snrg_header`` (S/N g of the file header), ``reason`` (why a file failed), ``train``
        (the training cut and ``ok``) and ``hot`` (finite labels, ``teff >= teff_max``, ``ok``).
    flux, ivar : ndarray (N, 3909) float32
        Continuum-normalised spectra on :func:`lamostcannon.spectra.common_wavelength`.
    label_names : tuple of str
    snr_min, teff_max : float
        The cuts used.
    """

    table: pd.DataFrame
    flux: np.ndarray
    ivar: np.ndarray
    label_names: tuple = LABEL_NAMES
    snr_min: float = SNR_MIN
    teff_max: float = TEFF_MAX

    def labels(self, rows=None) -> np.ndarray:
        """Labels (S, L) of the selected rows (bool mask or indices; all when None)."""
        t = self.table if rows is None else self.table[rows] if np.asarray(rows).dtype == bool \
            else self.table.iloc[rows]
        return np.column_stack([t[n].to_numpy(float) for n in self.label_names])

    def subset(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(labels, flux, ivar)`` of the selected rows."""
        return self.labels(rows), self.flux[rows], self.ivar[rows]


def build_sample(sources: RealSources | None = None, *, snr_min: float = SNR_MIN,
                 teff_max: float = TEFF_MAX, label_names=LABEL_NAMES, store_path=None,
                 n_workers=None, progress: bool = False, limit: int | None = None) -> RealSample:
    """Read the label table and the spectra it names; mark the training and the hot stars.

    Files are found as ``<spectra_dir>/<filename>``; a table without ``filename`` is matched by
    ``obsid`` against every file in the folder. Unreadable or missing files are kept as rows
    with ``ok = False`` and their reason.

    Parameters
    ----------
    sources : RealSources, optional
        Default :func:`real_sources`.
    snr_min, teff_max : float
        The cuts of :func:`training_selection`. Without an ``snrg`` column in the table the
        header S/N g is used.
    store_path : path, optional
        Default :func:`store_path_for` the spectra folder.
    limit : int, optional
        Use only the first ``limit`` rows of the table (quick tests).

    Returns
    -------
    RealSample
    """
    sources = sources or real_sources()
    table = read_label_table(sources.labels_path, label_names)
    if limit is not None:
        table = table.iloc[: int(limit)].reset_index(drop=True)
    folder = sources.spectra_dir
    if "filename" in table.columns:
        files = [str(folder / f) for f in table["filename"]]
        flux, ivar, meta = load_spectra(files, store_path or store_path_for(folder, "real"),
                                        n_workers=n_workers, progress=progress)
    else:  # match by obsid over the folder's files
        from .spectra import find_spectra

        all_files = [str(p) for p in find_spectra(folder)]
        f_all, i_all, m_all = load_spectra(all_files, store_path or store_path_for(folder, "real"),
                                           n_workers=n_workers, progress=progress)
        good = m_all[m_all["ok"]].reset_index()
        first = good.drop_duplicates("obsid").set_index("obsid")["index"]
        idx = first.reindex(table["obsid"].to_numpy()).to_numpy()
        found = np.isfinite(idx)
        take = np.where(found, idx, 0).astype(np.int64)
        flux, ivar = f_all[take], i_all[take]
        flux[~found], ivar[~found] = 1.0, 0.0
        meta = m_all.iloc[take].reset_index(drop=True)
        meta.loc[~found, "ok"] = False
        meta.loc[~found, "reason"] = "obsid not found among the folder's files"
        files = meta["source"].to_numpy()
    table = table.copy()
    table["source"] = [str(f) for f in files]
    table["ok"] = meta["ok"].to_numpy(bool)
    table["reason"] = meta["reason"].to_numpy()
    table["snrg_header"] = meta["snrg"].to_numpy(float)
    # a table that lists a file (or an observation) twice gives its spectrum once: a star in
    # the training set twice, and on both sides of a CV split, would flatter the CV silently
    ok = table["ok"].to_numpy(bool)
    obsid = meta["obsid"].fillna(-1).to_numpy(np.int64)
    first_source, first_obsid, dup = {}, {}, {}
    for k in np.flatnonzero(ok):
        source = str(files[k])
        j = first_source.get(source, first_obsid.get(obsid[k]) if obsid[k] >= 0 else None)
        if j is None:
            first_source[source] = k
            if obsid[k] >= 0:
                first_obsid[obsid[k]] = k
        else:
            dup[k] = j
    if dup:
        for k, j in dup.items():
            table.loc[k, "reason"] = (f"duplicate of row {j} (the same file or obsid); its "
                                      "spectrum is used once")
        table.loc[list(dup), "ok"] = False
        log.warning("the label table lists %d files or observations a second time: each is "
                    "used once (see the 'reason' column)", len(dup))
    if "snrg" not in table.columns:
        table["snrg"] = table["snrg_header"]
    if "obsid" not in table.columns:
        table["obsid"] = meta["obsid"].fillna(-1).to_numpy(np.int64)
    finite = np.all(np.isfinite(np.column_stack([table[n].to_numpy(float)
                                                  for n in label_names])), axis=1)
    table["train"] = training_selection(table, snr_min=snr_min, teff_max=teff_max,
                                        label_names=label_names) & table["ok"].to_numpy()
    with np.errstate(invalid="ignore"):
        table["hot"] = finite & (table["teff"].to_numpy(float) >= teff_max) & table["ok"]
    log.info("real sample: %d rows, %d read, %d in the training cut (snrg > %g, teff < %g K), "
             "%d hot", len(table), int(table["ok"].sum()), int(table["train"].sum()), snr_min,
             teff_max, int(table["hot"].sum()))
    return RealSample(table, flux, ivar, tuple(label_names), float(snr_min), float(teff_max))


# --------------------------------------------------------------------------------------------
# Extrapolation flags
# --------------------------------------------------------------------------------------------

def extrapolation_table(values, label_names, *, boundaries=None, label_range=None) -> pd.DataFrame:
    """Extrapolation flags of inferred labels.

    Parameters
    ----------
    values : (S, L) array, or a table / DataFrame with the label columns
        Inferred labels, physical units.
    label_names : sequence of str (L,)
    boundaries : dict label -> (low, high), optional
        KDE extrapolation boundaries (:func:`lamostcannon.validation.extrapolation_boundaries`):
        gives ``<label>_extrap`` (beyond a boundary) and ``kde_extrap`` (any label).
    label_range : array (2, L), optional
        Training minimum and maximum of each label (``CannonModel.label_range``): gives
        ``outside_training`` (any label outside it).

    Returns
    -------
    DataFrame (S rows) of bool: the columns above and ``extrap`` (any of them). Non-finite
    labels are never flagged here (their fit failed; see the Cannon flag).
    """
    from . import validation

    names = list(label_names)
    if hasattr(values, "colnames") or hasattr(values, "columns"):
        arr = np.column_stack([np.asarray(values[n], dtype=float) for n in names])
    else:
        arr = np.atleast_2d(np.asarray(values, dtype=float))
    if arr.shape[1] != len(names):
        raise ValueError(f"values have {arr.shape[1]} columns, expected {len(names)} ({names})")
    frame = pd.DataFrame(arr, columns=names)
    out = pd.DataFrame(index=frame.index)
    any_flag = np.zeros(len(frame), bool)
    if boundaries is not None:
        flags = validation.extrapolation_flags(frame, boundaries)
        kde = np.zeros(len(frame), bool)
        for n in names:
            col = flags[n].to_numpy(bool) if n in flags.columns else np.zeros(len(frame), bool)
            out[f"{n}_extrap"] = col
            kde |= col
        out["kde_extrap"] = kde
        any_flag |= kde
    if label_range is not None:
        lr = np.asarray(label_range, dtype=float)
        if lr.shape != (2, len(names)):
            raise ValueError(f"label_range must have shape (2, {len(names)}), got {lr.shape}")
        with np.errstate(invalid="ignore"):
            outside = np.any((arr < lr[0]) | (arr > lr[1]), axis=1)
        out["outside_training"] = outside
        any_flag |= outside
    out["extrap"] = any_flag
    return out


def flag_fractions(teff, flags: pd.DataFrame, bins=(7000, 7500, 8000, np.inf)) -> pd.DataFrame:
    """Fraction of stars carrying each flag, in bins of (LASP) teff.

    Parameters
    ----------
    teff : array (S,)
        Reference teff (K) that defines the bins.
    flags : DataFrame (S rows) of bool, e.g. from :func:`extrapolation_table`
    bins : sequence of bin edges (K)

    Returns
    -------
    DataFrame indexed by bin (``"7000-7500"``, ..., ``"all"``): ``n`` and one column per flag
    (fraction of stars in the bin with that flag).
    """
    teff = np.asarray(teff, float)
    edges = list(bins)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (teff >= lo) & (teff < hi)
        name = f"{lo:.0f}-{hi:.0f}" if np.isfinite(hi) else f">={lo:.0f}"
        rows.append({"teff_bin": name, "n": int(sel.sum()),
                     **{c: float(flags[c].to_numpy(bool)[sel].mean()) if sel.any() else np.nan
                        for c in flags.columns}})
    rows.append({"teff_bin": "all", "n": len(teff),
                 **{c: float(flags[c].to_numpy(bool).mean()) if len(teff) else np.nan
                    for c in flags.columns}})
    return pd.DataFrame(rows).set_index("teff_bin")


# --------------------------------------------------------------------------------------------
# Repeat observations
# --------------------------------------------------------------------------------------------

def read_repeat_groups(path, folder=None) -> pd.DataFrame:
    """Read a repeat-group table (``groups.csv``): visits of one star share a ``GroupID``.

    Parameters
    ----------
    path : path
        CSV with ``GroupID`` and the file of each visit (``combined_file``, ``filename`` or
        ``file``; a leading directory is dropped). ``GroupID`` may be written ``"1.0"`` or ``"1"``.
    folder : path, optional
        Where the files are; default the table's folder.

    Returns
    -------
    DataFrame with ``group`` (int), ``filename``, ``source`` (path), ``exists`` (bool) and
    ``obsid`` when the table has ``combined_obsid`` or ``obsid``; rows without a GroupID are
    dropped.
    """
    path = Path(path)
    folder = Path(folder) if folder is not None else path.parent
    df = pd.read_csv(path, dtype=str)
    cols = {c.lower(): c for c in df.columns}
    gcol = cols.get("groupid")
    fcol = next((cols[c] for c in ("combined_file", "filename", "file") if c in cols), None)
    if gcol is None or fcol is None:
        raise ValueError(f"{path}: need a GroupID column and a file column (combined_file, "
                         f"filename or file); it has {list(df.columns)}")
    group = pd.to_numeric(df[gcol], errors="coerce")
    out = pd.DataFrame({"group": group})
    out["filename"] = df[fcol].astype(str).str.strip().str.split("/").str[-1]
    ocol = next((cols[c] for c in ("combined_obsid", "obsid") if c in cols), None)
    if ocol is not None:
        out["obsid"] = pd.to_numeric(df[ocol], errors="coerce").fillna(-1).astype(np.int64)
    out = out[np.isfinite(out["group"].to_numpy(float))].copy()
    out["group"] = out["group"].astype(np.int64)
    out["source"] = [str(folder / f) for f in out["filename"]]
    out["exists"] = [Path(p).is_file() for p in out["source"]]
    return out.reset_index(drop=True)


def load_repeats(sources: RealSources | None = None, *, store_path=None, n_workers=None,
                 progress: bool = False):
    """The repeat observations: their group table and spectra, row-aligned.

    Parameters
    ----------
    sources : RealSources, optional
        Default :func:`real_sources` (with ``require_repeats=True``).
    store_path : path, optional
        Default :func:`store_path_for` the repeat folder.

    Returns
    -------
    groups : DataFrame
        :func:`read_repeat_groups` plus ``ok`` (a spectrum was read), ``reason``, ``snrg``
        (header S/N g) and ``obsid_header``.
    flux, ivar : ndarray (N, 3909) float32
    """
    sources = sources or real_sources(require_repeats=True)
    if sources.repeats_dir is None:
        raise RealDataMissing(f"no repeat observations configured; set {ENV_REPEATS}")
    groups = read_repeat_groups(sources.groups_path, sources.repeats_dir)
    flux, ivar, meta = load_spectra(groups["source"].tolist(),
                                    store_path or store_path_for(sources.repeats_dir, "repeats"),
                                    n_workers=n_workers, progress=progress)
    groups = groups.copy()
    groups["ok"] = meta["ok"].to_numpy(bool)
    groups["reason"] = meta["reason"].to_numpy()
    groups["snrg"] = meta["snrg"].to_numpy(float)
    groups["obsid_header"] = meta["obsid"].fillna(-1).to_numpy(np.int64)
    return groups, flux, ivar


def repeat_pairs(groups, usable=None) -> pd.DataFrame:
    """Every pair of visits within each group.

    Parameters
    ----------
    groups : DataFrame with a ``group`` column (or an array of group ids) (N,)
    usable : bool array (N,), optional
        Only rows marked True take part.

    Returns
    -------
    DataFrame with ``group``, ``i``, ``j`` (row indices into ``groups``, ``i < j``).
    """
    gid = np.asarray(groups["group"] if hasattr(groups, "columns") else groups)
    use = np.ones(gid.size, bool) if usable is None else np.asarray(usable, bool)
    rows = []
    for g in pd.unique(gid[use]):
        members = np.flatnonzero((gid == g) & use)
        rows += [(g, i, j) for i, j in itertools.combinations(members, 2)]
    return pd.DataFrame(rows, columns=["group", "i", "j"]).astype(
        {"group": gid.dtype, "i": np.int64, "j": np.int64})


def pair_differences(labels, errors, pairs, label_names, cv_scatter=None) -> pd.DataFrame:
    """Label differences of repeat pairs, normalised by the formal and by the CV uncertainty.

    For pair ``(i, j)`` and label ``l``: ``delta_l = l_i - l_j``,
    ``sigma_l = sqrt(e_i^2 + e_j^2)`` (formal errors), ``z_l = delta_l / sigma_l`` and, when
    the CV scatter ``s_l`` is given, ``zcv_l = delta_l / (sqrt(2) s_l)``. Both ``z`` have unit
    standard deviation if the uncertainty describes the visit-to-visit scatter.

    Parameters
    ----------
    labels, errors : arrays (N, L)
        Inferred labels and formal 1-sigma errors of every visit.
    pairs : DataFrame from :func:`repeat_pairs`
    label_names : sequence of str (L,)
    cv_scatter : dict or Series label -> CV scatter, optional

    Returns
    -------
    DataFrame, one row per pair: ``group``, ``i``, ``j``, and per label ``delta_<l>``,
    ``sigma_<l>``, ``z_<l>`` (and ``zcv_<l>``).
    """
    labels = np.asarray(labels, float)
    errors = np.asarray(errors, float)
    if labels.shape != errors.shape or labels.ndim != 2 or labels.shape[1] != len(label_names):
        raise ValueError(f"labels {labels.shape} and errors {errors.shape} must both be "
                         f"(N, {len(label_names)})")
    i = pairs["i"].to_numpy()
    j = pairs["j"].to_numpy()
    out = pairs[["group", "i", "j"]].reset_index(drop=True).copy()
    for k, n in enumerate(label_names):
        d = labels[i, k] - labels[j, k]
        s = np.sqrt(errors[i, k] ** 2 + errors[j, k] ** 2)
        out[f"delta_{n}"] = d
        out[f"sigma_{n}"] = s
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"z_{n}"] = d / s
        if cv_scatter is not None:
            out[f"zcv_{n}"] = d / (np.sqrt(2.0) * float(cv_scatter[n]))
    return out


def robust_std(x) -> float:
    """1.4826 x the median absolute deviation from the median (NaN ignored); the same as
    :func:`lamostcannon.uncertainty.robust_spread`."""
    from .uncertainty import robust_spread

    return robust_spread(x)


def pair_spreads(diffs: pd.DataFrame, label_names) -> pd.DataFrame:
    """Spreads of :func:`pair_differences` per label.

    Returns
    -------
    DataFrame indexed by label: ``n`` pairs, ``delta_std`` and ``delta_robust`` (spread of the
    differences), ``single_visit`` (``delta_robust / sqrt(2)``: the precision of one visit),
    ``sigma_median`` (median combined formal error), ``z_std``, ``z_robust`` (spread of the
    formal-error-normalised differences; 1 when the formal errors are right) and, when present,
    ``zcv_std``, ``zcv_robust``.
    """
    rows = []
    for n in label_names:
        d = diffs[f"delta_{n}"].to_numpy(float)
        z = diffs[f"z_{n}"].to_numpy(float)
        ok = np.isfinite(d) & np.isfinite(z)
        row = {"label": n, "n": int(ok.sum()),
               "delta_std": float(np.std(d[ok])) if ok.any() else np.nan,
               "delta_robust": robust_std(d[ok]),
               "single_visit": robust_std(d[ok]) / np.sqrt(2.0),
               "sigma_median": float(np.median(diffs[f"sigma_{n}"].to_numpy(float)[ok]))
               if ok.any() else np.nan,
               "z_std": float(np.std(z[ok])) if ok.any() else np.nan,
               "z_robust": robust_std(z[ok])}
        if f"zcv_{n}" in diffs.columns:
            zc = diffs[f"zcv_{n}"].to_numpy(float)[ok]
            row["zcv_std"] = float(np.std(zc)) if zc.size else np.nan
            row["zcv_robust"] = robust_std(zc)
        rows.append(row)
    return pd.DataFrame(rows).set_index("label")


# --------------------------------------------------------------------------------------------
# Trust: repeat pairs for the error model, flag evaluation, degraded spectra
# --------------------------------------------------------------------------------------------

#: |teff - LASP teff| above which a result is catastrophic (K).
CATASTROPHIC_TEFF = 500.0


def pair_table(groups, labelled: pd.DataFrame, label_names, usable=None) -> pd.DataFrame:
    """Repeat pairs with what :func:`lamostcannon.uncertainty.fit_error_model` needs.

    Parameters
    ----------
    groups : DataFrame (N rows) with ``group`` (:func:`read_repeat_groups`)
    labelled : DataFrame (N rows, row-aligned)
        Output of the labelling core (:meth:`lamostcannon.labelling.Labeller.label`): labels,
        ``e_<label>_formal``, ``e_<label>_random``, ``snr``.
    label_names : sequence of str
    usable : bool array (N,), optional
        Visits that may form pairs (e.g. read, ``quality_flag == 0``).

    Returns
    -------
    DataFrame, one row per pair: ``group``, ``i``, ``j``, ``snr1``, ``snr2`` and per label
    ``delta_<l>`` (visit i - visit j), ``e1_<l>``, ``e2_<l>`` (formal errors) and ``r1_<l>``,
    ``r2_<l>`` (calibrated random errors).
    """
    pairs = repeat_pairs(groups, usable)
    i, j = pairs["i"].to_numpy(), pairs["j"].to_numpy()
    out = pairs.copy()
    snr = labelled["snr"].to_numpy(float)
    out["snr1"], out["snr2"] = snr[i], snr[j]
    for n in label_names:
        v = labelled[n].to_numpy(float)
        ef = labelled[f"e_{n}_formal"].to_numpy(float)
        er = labelled[f"e_{n}_random"].to_numpy(float)
        out[f"delta_{n}"] = v[i] - v[j]
        out[f"e1_{n}"], out[f"e2_{n}"] = ef[i], ef[j]
        out[f"r1_{n}"], out[f"r2_{n}"] = er[i], er[j]
    return out


def flag_evaluation(reference, labelled: pd.DataFrame, label_names=LABEL_NAMES, *,
                    outside_kind=None, quality_flag=None) -> dict:
    """How well ``quality_flag`` separates catastrophic results from good ones.

    A result is *catastrophic* when ``|teff - teff_ref| > CATASTROPHIC_TEFF`` or the star is
    outside the training set's kind (``outside_kind``, e.g. LASP teff >= 7000 K, M dwarfs,
    non-stars); every other star is *good*.

    Parameters
    ----------
    reference : DataFrame (S rows) with the reference labels (``teff``, ...; NaN where none)
    labelled : DataFrame (S rows) from the labelling core (labels and ``quality_flag``)
    outside_kind : bool array (S,), optional
    quality_flag : int array (S,), optional
        Use these flags instead of ``labelled["quality_flag"]`` (e.g. without one bit).

    Returns
    -------
    dict: ``n_catastrophic``, ``catch_rate`` (fraction of them flagged), ``n_good``,
    ``false_flag_rate`` (fraction of good stars flagged), ``n_unflagged`` and per label
    ``tail_<label>`` = std / robust sigma (1.4826 MAD) of ``label - reference`` among unflagged
    stars with a reference value.
    """
    qf = np.asarray(labelled["quality_flag"] if quality_flag is None else quality_flag)
    qf = qf.astype(np.int64)
    ref_teff = np.asarray(reference["teff"], float)
    with np.errstate(invalid="ignore"):
        cat = np.abs(labelled["teff"].to_numpy(float) - ref_teff) > CATASTROPHIC_TEFF
    if outside_kind is not None:
        cat |= np.asarray(outside_kind, bool)
    flagged = qf != 0
    out = {"n_catastrophic": int(cat.sum()),
           "catch_rate": float(flagged[cat].mean()) if cat.any() else np.nan,
           "n_good": int((~cat).sum()),
           "false_flag_rate": float(flagged[~cat].mean()) if (~cat).any() else np.nan,
           "n_unflagged": int((~flagged).sum())}
    for n in label_names:
        if n not in reference or n not in labelled:
            continue
        d = labelled[n].to_numpy(float) - np.asarray(reference[n], float)
        d = d[~flagged & np.isfinite(d)]
        rs = robust_std(d)
        out[f"tail_{n}"] = float(np.std(d) / rs) if d.size > 2 and rs > 0 else np.nan
    return out


def degrade(flux, ivar, kind: str, *, seed=0, wavelength=None):
    """Spectra spoiled on purpose, to see whether the out-of-distribution score notices.

    Parameters
    ----------
    flux, ivar : arrays (S, P), continuum-normalised on the common grid
    kind : str
        ``"noise"``: S/N divided by 4 (Gaussian noise added, ivar lowered to match);
        ``"tilt"``: a continuum error, flux multiplied by a line rising from 0.85 to 1.15 across
        the spectrum (a failed flux calibration); ``"emission"``: Balmer and forbidden emission
        lines of 40% of the continuum (a nebular or active spectrum); ``"gap"``: a 300 Angstrom
        stretch of flux replaced by 1 (a failed normalisation or a dead amplifier).
    seed : int or Generator

    Returns
    -------
    flux, ivar : float32 arrays (S, P)
    """
    from .ood import WINDOWS
    from .spectra import common_wavelength

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    f = np.array(flux, dtype=np.float64)
    iv = np.array(ivar, dtype=np.float64)
    wave = np.asarray(wavelength if wavelength is not None else common_wavelength(), float)
    good = iv > 0
    if kind == "noise":
        sigma = np.where(good, 1 / np.sqrt(np.where(good, iv, 1.0)), 0.0)
        f = f + np.sqrt(15.0) * sigma * rng.standard_normal(f.shape)
        iv = np.where(good, iv / 16.0, 0.0)
    elif kind == "tilt":
        f = f * np.linspace(0.85, 1.15, f.shape[1])[None, :]
    elif kind == "emission":
        from .cleaning import air_to_vacuum

        lines = [6562.8, 4861.3, 4340.5] + [0.5 * (a + b) for a, b in WINDOWS["emission_lines"]]
        prof = np.zeros(wave.size)
        for c in lines:
            prof += 0.4 * np.exp(-0.5 * ((wave - air_to_vacuum(c)) / 2.5) ** 2)
        f = f + prof[None, :]
    elif kind == "gap":
        lo = wave[0] + rng.uniform(500, 4500)
        sel = (wave >= lo) & (wave < lo + 300)
        f[:, sel] = 1.0
    else:
        raise ValueError(f"kind must be noise, tilt, emission or gap, got {kind!r}")
    return f.astype(np.float32), iv.astype(np.float32)


def plate_sources(folder=None) -> Path:
    """The folder of the DR7 plate (``<real_lamost_dir>/dr7_plate``: one spectrograph of one
    plate as observed, with M dwarfs, galaxies and Unknown spectra beside FGK stars, and the
    pipeline's ``class``/``subclass`` in its ``catalog.csv``)."""
    folder = Path(folder) if folder is not None else paths.real_lamost_dir() / "dr7_plate"
    if not (folder / "catalog.csv").is_file():
        raise RealDataMissing(f"no catalog.csv in {folder}; it holds the DR7 plate of the "
                              "out-of-distribution checks (LAMOSTCANNON_LAMOST_DIR)")
    return folder


def load_catalogued(folder, *, table=None, n_workers=None, name: str = "plate"):
    """Spectra of a folder with a ``catalog.csv`` (``filename`` column), aligned with its rows.

    Returns ``(table, flux, ivar)``: the catalogue plus ``source``, ``ok``, ``reason`` and the
    file headers' ``class_header``, ``z_header`` (files that cannot be read keep their row with
    ``ok = False`` and the reason; their flux is 1 and ivar 0).
    """
    folder = Path(folder)
    t = pd.read_csv(folder / "catalog.csv") if table is None else table.copy()
    t.columns = [str(c).strip().lower() for c in t.columns]
    files = [str(folder / str(f).strip()) for f in t["filename"]]
    flux, ivar, meta = load_spectra(files, store_path_for(folder, name), n_workers=n_workers)
    t["source"] = files
    t["ok"] = meta["ok"].to_numpy(bool)
    t["reason"] = meta["reason"].to_numpy()
    t["class_header"] = meta["class"].to_numpy() if "class" in meta else ""
    t["z_header"] = pd.to_numeric(meta["z"], errors="coerce").to_numpy(float) if "z" in meta \
        else np.nan
    return t.reset_index(drop=True), flux, ivar


def outside_kind(table) -> np.ndarray:
    """Stars outside an FGK training set's kind: pipeline ``class`` other than STAR; and LASP
    ``teff >= TEFF_MAX`` where the table has teff, else (no stellar parameters, as for the DR7
    plate) a ``subclass`` of an M star (``dM``/``gM``/``M``), an O, B or A star, a white dwarf or
    a carbon star. (Subclasses are not used when teff exists: the pipeline calls some 6900 K
    training stars A-type.)"""
    n = len(table)
    out = np.zeros(n, bool)
    if "teff" in table:
        with np.errstate(invalid="ignore"):
            out |= np.asarray(table["teff"], float) >= TEFF_MAX
    if "class" in table:
        c = table["class"].astype(str).str.strip().str.upper().to_numpy()
        out |= (c != "STAR") & (c != "") & (c != "NAN")
    if "subclass" in table and "teff" not in table:
        s = table["subclass"].astype(str).str.strip().to_numpy()
        kind = np.array([x.lstrip("dgsd")[:1].upper() if x.startswith(("dM", "gM", "sdM"))
                         else x[:1].upper() for x in s])
        out |= np.isin(kind, ["M", "O", "B", "A", "W", "C"]) & (np.char.upper(s.astype(str)) !=
                                                                 "NON")
    return out
