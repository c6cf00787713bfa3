"""Catalogue inference at survey scale: labels for millions of LAMOST observations (paper section 5.1).

The driver streams the spectra store in chunks of observations, labels each chunk with the
labelling core (:meth:`lamostcannon.labelling.Labeller.label`: the dwarf or the giant model by
paper eq. 1 on the LAMOST pipeline's teff/logg, calibrated errors, the out-of-distribution score
and ``quality_flag``), and writes one Parquet part file per chunk. Parts are written to a
temporary name and renamed, so *a chunk is done iff its part file exists*: a run killed at any
moment (even ``kill -9``) and started again labels only the missing chunks, and the assembled table
is identical to that of an uninterrupted run.

Execution
    ``n_workers=1`` (and no Dask client): the chunks run in this process, one after another, with
    one BLAS thread (no Dask overhead). ``n_workers>1``: a Dask ``LocalCluster`` of that many
    single-threaded worker processes. ``client=`` or ``scheduler_address=``: any Dask cluster; the
    workers must be able to read the store path and the driver writes the parts. Either way a task
    is one chunk, so the memory of a worker is bounded by the chunk size (about
    ``chunk_size * 3909 * 4 * 2`` bytes of float32 spectra plus the test step's workspace).

Model choice per observation
    Observations with physical LAMOST ``teff`` and ``logg`` use the model chosen by eq. 1
    (:func:`lamostcannon.labels.is_giant`). Observations without them (NaN, or LAMOST's ``-9999``
    sentinel: :func:`lamostcannon.labels.pipeline_value`, as for many hot or low-S/N spectra) are
    labelled with *both* models and keep the fit with the lower reduced chi2 (chi2 / n_pixels);
    they carry :data:`FLAG_NO_LASP` and the ``NO_PIPELINE`` bit of ``quality_flag``.

Flags
    ``quality_flag`` (:data:`lamostcannon.labelling.QUALITY_BITS`; 0 = recommended for science)
    is the one to select on. ``flag`` keeps the catalogue's processing bits:
    :data:`FLAG_NO_PIXELS` fewer than ``min_pixels`` usable pixels (not fitted, labels NaN);
    :data:`FLAG_NOT_CONVERGED` the test step did not converge; :data:`FLAG_NO_LASP` model chosen by
    chi2; :data:`FLAG_NONFINITE` the fit returned non-finite labels. The Cannon's own bitmask is
    ``cannon_flag``. Extrapolation flags (``kiel_extrap`` on teff/logg and ``<label>_extrap``) come
    from the KDE boundaries of :mod:`lamostcannon.validation` beside each model.

Uncertainties
    ``e_<label>`` is the calibrated total error, ``e_<label>_random`` its visit-to-visit part and
    ``e_<label>_formal`` the test step's inverse-Hessian error (:mod:`lamostcannon.uncertainty`).

Repeats (:func:`combine_repeats`)
    Observations are grouped by LAMOST ``designation``. A star combines its observations with
    ``quality_flag == 0`` when it has any; otherwise those without :data:`BAD_FLAGS`; otherwise all.
    Its model is the one whose combined observations carry the larger total S/N(z); its labels are
    the S/N(z)-weighted means over the observations made with that model. The random part of the
    error averages down, the systematic floor does not (see :func:`combine_repeats`). Flags
    (``quality_flag``, ``cannon_flag``, ``flag``, the ``_extrap`` columns) are OR-ed over the
    combined observations ("for any observation", Table 1).

Products (``processed/``): ``labels_per_observation.parquet``, ``catalog.parquet`` and
``catalog.fits`` (paper Table 1 with units and descriptions; the header lists the labels without
CV skill). Part files live in ``interim/catalog_parts/``.

Survey scale (memory bounded by the bucket, not the survey)
    The per-star stages run in memory for a DataFrame or Table (notebooks; ~5 kB per
    observation at the peak), or streaming (``build_catalog(path, ...)`` on the per-observation
    Parquet file or the parts folder, or ``stream=True``): :func:`partition_observations` puts
    every visit of a star into one bucket (an Arrow IPC stream file) of ~:data:`BUCKET_ROWS`
    observations (``interim/catalog_buckets/``; bucket boundaries are designations, so the buckets in order
    are in designation order), then each bucket is combined, matched to Gaia
    (:class:`GaiaIndex`), given kinematics (:class:`KinematicsInputs`) and appended to
    ``catalog.parquet`` (a row group per bucket) and ``catalog.fits`` (header written for the
    known number of stars). Same rows, same order, same values as in memory (tested). Memory: one
    bucket plus the Gaia index and distances (~200 bytes per Gaia source).
    ``assemble_observations(..., stream=True)`` writes the per-observation file part by part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import calibration as _calibration
from . import labels as labelsets
from . import paths
from .labelling import (QUALITY_BITS, Labeller, ModelBundle, _hash_arrays, empty_arrays,
                        quality_flag_description, typed_frame)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Label sets and flags
# --------------------------------------------------------------------------------------------

#: Union of the two models' labels, in catalogue order (stellar parameters first).
ALL_LABELS = tuple(dict.fromkeys(labelsets.DWARF_LABELS + labelsets.GIANT_LABELS))
#: The abundance-ratio labels of the union (``<x>_fe``), each with a ``chi2_<x>_fe`` window chi2.
ABUNDANCE_LABELS = tuple(name for name in ALL_LABELS if name.endswith("_fe"))

FLAG_NO_PIXELS = 1
FLAG_NOT_CONVERGED = 2
FLAG_NO_LASP = 4
FLAG_NONFINITE = 8
#: Every flag bit, with its meaning (written into the table metadata).
FLAG_BITS = {
    FLAG_NO_PIXELS: "fewer than min_pixels usable pixels; not fitted",
    FLAG_NOT_CONVERGED: "test step did not converge",
    FLAG_NO_LASP: "no LAMOST teff/logg; model chosen by the lower reduced chi2",
    FLAG_NONFINITE: "test step returned non-finite labels",
}
#: Flags that make an observation unusable for the combination when the star has better ones.
BAD_FLAGS = FLAG_NO_PIXELS | FLAG_NOT_CONVERGED | FLAG_NONFINITE

#: Sentinel ``source_id`` of stars without a Gaia match within the radius.
NO_SOURCE_ID = -1

PART_PATTERN = "part-{:06d}.parquet"
RUN_FILE = "run.json"


def extrap_columns() -> list[str]:
    """Boolean extrapolation columns: ``kiel_extrap``, then ``<label>_extrap`` for fe_h and abundances."""
    return ["kiel_extrap"] + [f"{name}_extrap" for name in ("fe_h",) + ABUNDANCE_LABELS]


def error_columns() -> list[str]:
    """``e_<label>``, ``e_<label>_random``, ``e_<label>_formal`` for every label."""
    return [f"e_{n}{s}" for s in ("", "_random", "_formal") for n in ALL_LABELS]


def observation_columns() -> dict[str, str]:
    """Columns of the per-observation table and their numpy dtypes (the same for every part)."""
    cols = {"obsid": "int64", "designation": "str", "row": "int64", "giantmodel": "bool"}
    cols.update({name: "float64" for name in ALL_LABELS})
    cols.update({name: "float64" for name in error_columns()})
    cols["chi2"] = "float64"
    cols["chi2_per_pixel"] = "float64"
    cols.update({f"chi2_{name}": "float64" for name in ABUNDANCE_LABELS})
    cols.update({"n_pixels": "int32", "n_iter": "int32", "converged": "bool", "cannon_flag": "int64",
                 "flag": "int32", "quality_flag": "int32", "ood_score": "float64"})
    cols.update({name: "bool" for name in extrap_columns()})
    cols["outside_training"] = "bool"
    cols.update({name: "float64" for name in ("snr", "snr_z", "ra", "dec", "rv", "teff_lasp",
                                              "logg_lasp")})
    return cols


# --------------------------------------------------------------------------------------------
# Inputs: models, windows, boundaries, the store and the LAMOST catalogue
# --------------------------------------------------------------------------------------------

def element_windows(wavelength, label_names) -> dict[str, np.ndarray]:
    """Boolean pixel masks of the GALAH line windows (paper Table 2) for a model's abundance labels.

    A thin wrapper of :func:`lamostcannon.cleaning.label_windows` (derived labels get the union of
    their elements' windows: alpha = Mg, Si, Ca, Ti; s = Ba, Y).

    Parameters
    ----------
    wavelength : array (P,)
        Vacuum rest-frame wavelengths of the common grid, Angstrom.
    label_names : sequence of str
        A model's labels.

    Returns
    -------
    dict
        ``{"<x>_fe": bool (P,)}`` in label order, the ``windows`` argument of ``CannonModel.test``.
    """
    from .labelling import element_windows as _windows

    return _windows(wavelength, label_names)


class LabelContext(Labeller):
    """The dwarf and the giant model with everything beside them: the labelling core of the
    catalogue (:class:`lamostcannon.labelling.Labeller` with ``dwarf`` and ``giant`` models).

    Small (a few MB); shipped once to each Dask worker.
    """

    @property
    def dwarf(self):
        return self.models["dwarf"].model

    @property
    def giant(self):
        return self.models["giant"].model

    def model(self, giant: bool):
        return self.giant if giant else self.dwarf

    def bundle(self, giant: bool) -> ModelBundle:
        return self.models["giant" if giant else "dwarf"]

    @property
    def windows(self) -> dict:
        return {g: b.windows for g, b in self.models.items()}

    @property
    def boundaries(self) -> dict:
        return {g: b.boundaries for g, b in self.models.items()}

    def unskilled(self) -> dict:
        """``{"dwarf": [...], "giant": [...]}``: labels without CV skill per model."""
        return {g: b.unskilled_labels() for g, b in self.models.items()}

    @classmethod
    def from_models(cls, dwarf, giant, boundaries=None, min_pixels: int = 100, *, errors=None,
                    ood=None) -> "LabelContext":
        """Build the context from two in-memory models (windows from each model's labels and
        grid); ``boundaries``, ``errors``, ``ood``: optional dicts ``{"dwarf"|"giant": ...}``."""
        boundaries, errors, ood = dict(boundaries or {}), dict(errors or {}), dict(ood or {})
        models = {g: ModelBundle.from_model(m, g, boundaries=boundaries.get(g),
                                            errors=errors.get(g), ood=ood.get(g))
                  for g, m in (("dwarf", dwarf), ("giant", giant))}
        return cls(models=models, min_pixels=min_pixels)


def _model_path(group: str, directory: Path) -> Path:
    candidates = sorted(directory.glob(f"model_{group}.*"))
    if not candidates:
        raise FileNotFoundError(f"no model_{group}.* in {directory}; run notebook 03 (training) first")
    return candidates[0]


def load_context(directory: Path | None = None, min_pixels: int = 100) -> LabelContext:
    """Read ``model_dwarf.*``, ``model_giant.*`` and what notebook 04 wrote beside them.

    ``directory`` defaults to :func:`lamostcannon.paths.processed_dir`. Companions
    (``extrapolation_<group>.json``, ``uncertainty_<group>.json``, ``ood_<group>.json``) may be
    missing: the ``_extrap`` columns are then False, ``e_<label>`` the formal errors and
    ``ood_score`` NaN, and a warning says so.
    """
    directory = Path(directory or paths.processed_dir())
    models = {g: ModelBundle.load(_model_path(g, directory), g) for g in ("dwarf", "giant")}
    return LabelContext(models=models, min_pixels=min_pixels)


class StoreReader:
    """Row slices of a :class:`lamostcannon.spectra.SpectraStore`, opened lazily (read-only).

    Picklable: only the path travels to Dask workers, which open the store themselves.
    """

    def __init__(self, path):
        self.path = str(path)
        self._store = None

    def __getstate__(self):
        return {"path": self.path, "_store": None}

    @property
    def store(self):
        if self._store is None:
            from .spectra import SpectraStore

            self._store = SpectraStore(self.path, mode="r")
        return self._store

    def __len__(self) -> int:
        return len(self.store)

    def metadata(self) -> pd.DataFrame:
        """The store's metadata table (``obsid, designation, ra, dec, snrz, ...``), in row order."""
        return self.store.meta

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """flux, ivar (stop-start, P) float32 of rows [start, stop)."""
        return self.store.read(slice(start, stop))


_READERS: dict[str, StoreReader] = {}


def _reader(path: str, min_rows: int = 0) -> StoreReader:
    """One open reader per store path and process (workers reuse it across chunks); reopened when
    the store has grown since (``min_rows``: rows the caller needs)."""
    reader = _READERS.get(path)
    if reader is None or len(reader) < min_rows:
        reader = _READERS[path] = StoreReader(path)
    return reader


LAMOST_COLUMNS = ("obsid", "designation", "ra", "dec", "snrz", "rv", "teff", "logg", "class", "z")


def observation_metadata(store: StoreReader, lamost_catalog=None) -> pd.DataFrame:
    """Per-row metadata of the store joined with the LAMOST catalogue on ``obsid``.

    Returns a DataFrame in store row order with ``obsid, designation, ra, dec, snr_z, rv,
    teff_lasp, logg_lasp, class, z`` (``class`` and ``z``: the pipeline's classification and
    redshift, for the ``NOT_STELLAR`` bit). Catalogue values win; store values fill observations
    missing from the catalogue; an observation in neither gets ``designation = "obsid<obsid>"``
    and NaN. Non-physical pipeline values (LAMOST's -9999) are NaN.
    """
    meta = store.metadata()
    out = pd.DataFrame({"obsid": meta["obsid"].to_numpy(np.int64)})
    known = out["obsid"] >= 0  # -1: a file without an OBSID card (kept, but never joined)
    if out["obsid"][known].duplicated().any():
        raise ValueError(f"spectra store {store.path} has duplicated obsids; ingest with "
                         "deduplicate=True")
    renames = {"snrz": "snr_z", "teff": "teff_lasp", "logg": "logg_lasp"}
    if lamost_catalog is not None:
        cat = _as_frame(lamost_catalog, [c for c in LAMOST_COLUMNS])
        cat = cat[cat["obsid"] >= 0].drop_duplicates("obsid").rename(columns=renames)
        out = out.merge(cat, on="obsid", how="left", validate="many_to_one")
    for name in ("designation", "ra", "dec", "snrz", "rv", "teff", "logg", "class", "z"):
        target = renames.get(name, name)
        if target not in out:
            out[target] = meta[name].to_numpy() if name in meta else (
                None if name in ("designation", "class") else np.nan)
        elif name in meta:
            out[target] = out[target].where(out[target].notna(), meta[name].to_numpy())
    # no designation: "obsid<obsid>", or "store-row<row>" for a file without an OBSID card
    # (each such file its own star, never several merged under one name)
    fallback = np.where(out["obsid"].to_numpy() >= 0, "obsid" + out["obsid"].astype(str),
                        "store-row" + pd.Series(np.arange(len(out)), index=out.index).astype(str))
    out["designation"] = out["designation"].astype(object).where(
        out["designation"].notna() & (out["designation"].astype(str).str.strip() != ""),
        fallback).astype(str).str.strip()
    for name in ("ra", "dec", "snr_z", "rv", "teff_lasp", "logg_lasp", "z"):
        out[name] = pd.to_numeric(out[name], errors="coerce").astype("float64")
    out["class"] = out["class"].astype(object).where(out["class"].notna(), "").astype(str)
    # LAMOST's -9999 (and any other non-physical pipeline value) is missing
    out["teff_lasp"] = labelsets.pipeline_value(out["teff_lasp"], "teff")
    out["logg_lasp"] = labelsets.pipeline_value(out["logg_lasp"], "logg")
    out["rv"] = labelsets.pipeline_value(out["rv"], "rv")
    return out


def _as_frame(table, columns=None) -> pd.DataFrame:
    """A DataFrame of ``columns`` (those present) from an astropy Table, a DataFrame or a path."""
    if isinstance(table, (str, Path)):
        from astropy.table import Table

        table = Table.read(table)
    if isinstance(table, pd.DataFrame):
        df = table
    else:
        names = [c for c in (columns or table.colnames) if c in table.colnames]
        df = pd.DataFrame({c: _plain(table[c]) for c in names})
    if columns is not None:
        df = df[[c for c in columns if c in df.columns]].copy()
    for c in df.columns:
        if df[c].dtype.kind in "SO":
            df[c] = df[c].map(lambda v: v.decode() if isinstance(v, bytes) else v).astype(str).str.strip()
    return df


def _plain(column) -> np.ndarray:
    """A column as a plain numpy array (masked values -> NaN, or '' for strings)."""
    data = np.ma.asarray(column)
    if data.dtype.kind in "fc":
        return np.ma.filled(data.astype(float), np.nan)
    if data.dtype.kind in "SU":
        return np.ma.filled(data, "")
    data = np.ma.getdata(data)
    return data.astype(data.dtype.newbyteorder("="), copy=False)  # FITS columns are big-endian


# --------------------------------------------------------------------------------------------
# One chunk: choose the model, run the test step, flags
# --------------------------------------------------------------------------------------------

def choose_model(teff, logg) -> tuple[np.ndarray, np.ndarray]:
    """Model choice from LAMOST pipeline labels (paper eq. 1).

    Returns
    -------
    giant : bool array
        True where eq. 1 says giant.
    known : bool array
        True where both teff and logg are physical (NaN and LAMOST's ``-9999`` are missing,
        :func:`lamostcannon.labels.pipeline_value`); elsewhere both models are tried.
    """
    known = labelsets.pipeline_known(teff, logg)
    return np.asarray(labelsets.is_giant(teff, logg), dtype=bool) & known, known


def _empty_columns(n: int) -> dict[str, np.ndarray]:
    """Per-observation columns of ``n`` rows: NaN, False, 0 or ""."""
    return empty_arrays(observation_columns(), n)


def _empty_frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(_empty_columns(n)).astype(observation_columns())


def label_chunk(flux, ivar, meta: pd.DataFrame, ctx: LabelContext, rows=None) -> pd.DataFrame:
    """Labels for one chunk of observations (no I/O; deterministic): the labelling core
    (:meth:`lamostcannon.labelling.Labeller.label`) mapped onto the catalogue's columns.

    Parameters
    ----------
    flux, ivar : array (S, P)
        Continuum-normalised flux and inverse variance on the common grid.
    meta : DataFrame (S rows)
        ``obsid, designation, ra, dec, snr_z, rv, teff_lasp, logg_lasp`` (see
        :func:`observation_metadata`).
    ctx : LabelContext
    rows : array (S,), optional
        Store row numbers (kept in the ``row`` column).

    Returns
    -------
    DataFrame
        One row per observation with the columns of :func:`observation_columns`; labels a model
        does not estimate are NaN.
    """
    flux = np.asarray(flux, dtype=np.float32)
    ivar = np.asarray(ivar, dtype=np.float32)
    n = flux.shape[0]
    if flux.shape != ivar.shape or flux.ndim != 2:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must both be (S, P)")
    if len(meta) != n:
        raise ValueError(f"meta has {len(meta)} rows for {n} spectra")
    meta = meta.reset_index(drop=True)
    core = ctx.label(flux, ivar, meta["teff_lasp"].to_numpy(float),
                     meta["logg_lasp"].to_numpy(float),
                     meta["class"].to_numpy() if "class" in meta else None,
                     meta["z"].to_numpy(float) if "z" in meta else None)
    from .labelling import QF_NO_PIPELINE, QF_NOT_CONVERGED

    out = _empty_columns(n)
    for name in ("obsid", "designation", "snr_z", "ra", "dec", "rv", "teff_lasp", "logg_lasp"):
        out[name] = meta[name].to_numpy()
    out["row"] = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    out["giantmodel"] = core["model"].to_numpy() == "giant"
    for name in (*ALL_LABELS, *error_columns(), "chi2", "chi2_per_pixel", "n_pixels", "n_iter",
                 "converged", "cannon_flag", "quality_flag", "ood_score", "outside_training",
                 "snr", *[f"chi2_{x}" for x in ABUNDANCE_LABELS]):
        if name in core:
            out[name] = core[name].to_numpy()
    for name in ("fe_h", *ABUNDANCE_LABELS):
        if f"{name}_extrap" in core:
            out[f"{name}_extrap"] = core[f"{name}_extrap"].to_numpy(bool)
    out["kiel_extrap"] = np.zeros(n, bool)
    for name in ("teff", "logg"):
        if f"{name}_extrap" in core:
            out["kiel_extrap"] |= core[f"{name}_extrap"].to_numpy(bool)
    qf = core["quality_flag"].to_numpy(np.int64)
    fitted = core["n_pixels"].to_numpy() > 0
    stellar = core[["teff", "logg", "fe_h"]].to_numpy(float)
    flag = np.zeros(n, np.int32)
    flag |= np.where(fitted, 0, FLAG_NO_PIXELS).astype(np.int32)
    flag |= np.where((qf & QF_NOT_CONVERGED) != 0, FLAG_NOT_CONVERGED, 0).astype(np.int32)
    flag |= np.where((qf & QF_NO_PIPELINE) != 0, FLAG_NO_LASP, 0).astype(np.int32)
    flag |= np.where(fitted & ~np.all(np.isfinite(stellar), axis=1), FLAG_NONFINITE,
                     0).astype(np.int32)
    out["flag"] = flag
    return typed_frame(out, observation_columns())


# --------------------------------------------------------------------------------------------
# Part files and resumption
# --------------------------------------------------------------------------------------------

def plan_chunks(n_obs: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """``[(chunk_index, start, stop), ...]`` covering rows ``0..n_obs-1`` in order."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(i, start, min(start + chunk_size, n_obs))
            for i, start in enumerate(range(0, n_obs, chunk_size))]


def part_path(parts_dir: Path, chunk: int) -> Path:
    """The part file of chunk ``chunk``."""
    return Path(parts_dir) / PART_PATTERN.format(chunk)


def done_chunks(parts_dir: Path) -> set[int]:
    """Chunks whose part file exists (the definition of *done*)."""
    parts_dir = Path(parts_dir)
    if not parts_dir.is_dir():
        return set()
    return {int(p.name[5:11]) for p in parts_dir.glob("part-[0-9][0-9][0-9][0-9][0-9][0-9].parquet")}


def write_part(df: pd.DataFrame, parts_dir: Path, chunk: int) -> Path:
    """Write one chunk's rows to a temporary file and rename it into place (atomic)."""
    target = part_path(parts_dir, chunk)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False, engine="pyarrow")
    os.replace(tmp, target)
    return target


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prepare_parts_dir(parts_dir: Path, run_info: dict, overwrite: bool) -> None:
    """Create the parts folder, check that a resumed run is the same run, clear stale temp files."""
    parts_dir = paths.ensure(Path(parts_dir))
    run_file = parts_dir / RUN_FILE
    start_again = bool(overwrite) and overwrite != "changed"
    if overwrite == "changed" and run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != run_info:
            changed = sorted(k for k in set(previous) | set(run_info)
                             if previous.get(k) != run_info.get(k))
            log.info("%s holds parts of a different run (changed: %s): starting again",
                     parts_dir, changed)
            start_again = True
    if start_again:
        for p in parts_dir.glob("part-*.parquet"):
            p.unlink()
        run_file.unlink(missing_ok=True)
    for p in parts_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)  # a temp file left by a killed run; its chunk is not done
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != run_info:
            changed = sorted(k for k in set(previous) | set(run_info)
                             if previous.get(k) != run_info.get(k))
            raise ValueError(
                f"{parts_dir} holds parts of a different run (changed: {changed}); pass "
                "overwrite=True to start again, or another parts_dir")
    else:
        if any(parts_dir.glob("part-*.parquet")):
            raise ValueError(f"{parts_dir} holds part files but no {RUN_FILE}; pass overwrite=True")
        _atomic_write_text(run_file, json.dumps(run_info, indent=1, sort_keys=True))


def read_parts(parts_dir: Path, n_chunks: int | None = None) -> pd.DataFrame:
    """Concatenate the part files in chunk order. With ``n_chunks``, every chunk must be done."""
    parts_dir = Path(parts_dir)
    done = sorted(done_chunks(parts_dir))
    if n_chunks is not None:
        missing = sorted(set(range(n_chunks)) - set(done))
        if missing:
            raise RuntimeError(f"{len(missing)} of {n_chunks} chunks are not done (first: {missing[:5]})")
        done = list(range(n_chunks))
    if not done:
        return _empty_frame(0)
    return pd.concat([pd.read_parquet(part_path(parts_dir, i)) for i in done], ignore_index=True)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

def _label_store_chunk(store_path: str, start: int, stop: int, meta: pd.DataFrame,
                       ctx: LabelContext) -> pd.DataFrame:
    """Task body: read rows [start, stop) of the store and label them (runs on a worker)."""
    flux, ivar = _reader(store_path, stop).read(start, stop)
    return label_chunk(flux, ivar, meta, ctx, rows=np.arange(start, stop))


def _reset_peak_rss() -> None:
    """Reset this process's peak-RSS counter (Linux ``/proc/self/clear_refs``; else a no-op).

    Worker processes inherit the parent's ``ru_maxrss`` across fork and exec, so without a reset
    a worker's peak would include the driver's.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """Peak resident memory of this process since the last :func:`_reset_peak_rss`, MB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


@dataclass
class InferenceReport:
    """What :func:`run_inference` did."""

    n_obs: int
    n_chunks: int
    chunks_done_before: int
    chunks_run: int
    seconds: float
    n_workers: int
    executor: str
    parts_dir: Path
    peak_memory_mb_per_worker: float = float("nan")
    #: Seconds spent starting a Dask LocalCluster (0 when none was started here).
    cluster_start_seconds: float = 0.0

    @property
    def obs_per_s(self) -> float:
        """Throughput of this call (observations labelled per second of wall time)."""
        n = self.n_obs * self.chunks_run / max(self.n_chunks, 1)
        return n / self.seconds if self.seconds > 0 else float("nan")


def default_parts_dir() -> Path:
    """``interim/catalog_parts``: one Parquet part file per chunk."""
    return paths.interim_dir() / "catalog_parts"


#: Dask settings of the LocalCluster that :func:`run_inference` starts (a cluster passed in keeps
#: its own). Its diagnostics, sampled less often: the workers' statistical profiler (a stack
#: sample every 10 ms), every process's event-loop health check (every 20 ms) and system monitor
#: (every 0.5 s) cost the parent, the two nannies and the two workers 0.086 s of CPU per second
#: of wall time at rest, 0.026 with these (measured by hand, 10 s idle); the dashboard is off
#: anyway. Scheduling, memory limits and the workers' memory monitor are untouched.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
}


def run_inference(store_path, ctx: LabelContext | None = None, *, lamost_catalog=None,
                  parts_dir=None, chunk_size: int = 2048, n_workers: int | None = None,
                  client=None, scheduler_address: str | None = None, overwrite: bool = False,
                  max_chunks: int | None = None, progress: bool = True,
                  threads_per_worker: int = 1) -> InferenceReport:
    """Label every observation of a spectra store, one Parquet part file per chunk; resumable.

    Parameters
    ----------
    store_path : path
        The :class:`lamostcannon.spectra.SpectraStore` (flux/ivar (N, 3909) float32 and a
        metadata row with ``obsid`` per observation); Dask workers must see the same path.
    ctx : LabelContext, optional
        Models, windows and extrapolation boundaries; default :func:`load_context`.
    lamost_catalog : Table, DataFrame or path, optional
        LAMOST catalogue (obsid, designation, ra, dec, snrz, rv, teff, logg); default
        ``raw_dir()/lamost/catalog.fits`` when it exists.
    parts_dir : path, optional
        Where the part files go (default :func:`default_parts_dir`).
    chunk_size : int
        Observations per task; bounds the memory of a worker.
    n_workers : int, optional
        1: in this process; >1: a Dask LocalCluster of single-threaded workers. Default
        :func:`lamostcannon.config.settings` ``n_workers``. Ignored when a cluster is given.
    client : distributed.Client, optional
        Run on this Dask cluster. Or ``scheduler_address`` (``"tcp://host:8786"``).
    overwrite : bool or ``"changed"``
        Discard existing parts and start again. Otherwise an existing run is resumed (and refused
        if its models, labelling code, store or chunking differ); ``"changed"``: resumed if it
        is the same run, started again if not (what a notebook rerun after retraining wants).
    max_chunks : int, optional
        Run at most this many of the pending chunks (for tests and benchmarks).
    progress : bool
        Show a progress bar (tqdm).
    threads_per_worker : int
        BLAS threads of the in-process path and threads of LocalCluster workers.

    Returns
    -------
    InferenceReport
    """
    from .config import settings

    t0 = time.perf_counter()
    store_path = str(Path(store_path).resolve())
    ctx = ctx if ctx is not None else load_context()
    parts_dir = Path(parts_dir or default_parts_dir())
    if lamost_catalog is None:
        default = paths.raw_dir() / "lamost" / "catalog.fits"
        lamost_catalog = default if default.exists() else None
    reader = StoreReader(store_path)
    meta = observation_metadata(reader, lamost_catalog)
    n_obs = len(meta)
    chunks = plan_chunks(n_obs, chunk_size)
    run_info = {
        "n_obs": n_obs, "chunk_size": int(chunk_size),
        "obsid_hash": _hash_arrays(meta["obsid"].to_numpy()),
        "context": ctx.fingerprint(),
    }
    if reader.store.revision:  # rows replaced in place (their files changed): parts made
        run_info["store_revision"] = reader.store.revision  # before are not of these rows
    _prepare_parts_dir(parts_dir, run_info, overwrite)
    done = done_chunks(parts_dir)
    pending = [c for c in chunks if c[0] not in done]
    if max_chunks is not None:
        pending = pending[:max_chunks]
    n_workers = int(n_workers or settings().n_workers)
    log.info("%d observations in %d chunks of %d: %d done, %d to run", n_obs, len(chunks),
             chunk_size, len(done), len(pending))

    bar = None
    if progress and pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks), initial=len(done), unit="chunk", desc="labelling")
    own_client = None
    cluster_start = 0.0
    if client is None and scheduler_address is not None:
        from distributed import Client

        client = own_client = Client(scheduler_address)
    elif client is None and n_workers > 1 and pending:
        from distributed import Client, LocalCluster

        t_start = time.perf_counter()
        import dask

        with dask.config.set(LOCAL_CLUSTER_CONFIG):  # read when the cluster starts
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                   processes=True, dashboard_address=None)
            client = own_client = Client(cluster)
        cluster_start = time.perf_counter() - t_start
    executor = "serial" if client is None else ("dask-local" if own_client and scheduler_address is None
                                                else "dask")
    peak = float("nan")
    try:
        if client is None:
            from threadpoolctl import threadpool_limits

            _reset_peak_rss()
            with threadpool_limits(limits=threads_per_worker):
                for i, start, stop in pending:
                    df = _label_store_chunk(store_path, start, stop,
                                            meta.iloc[start:stop].reset_index(drop=True), ctx)
                    write_part(df, parts_dir, i)
                    if bar is not None:
                        bar.update(1)
            peak = _peak_rss_mb()
        else:
            _run_dask(client, store_path, pending, meta, ctx, parts_dir, bar)
            peaks = client.run(_peak_rss_mb)
            peak = max(peaks.values()) if peaks else float("nan")
            n_workers = len(peaks)
    finally:
        if bar is not None:
            bar.close()
        if own_client is not None:
            cluster = getattr(own_client, "cluster", None)
            own_client.close()
            if cluster is not None and scheduler_address is None:
                cluster.close()
    report = InferenceReport(n_obs=n_obs, n_chunks=len(chunks), chunks_done_before=len(done),
                             chunks_run=len(pending), seconds=time.perf_counter() - t0,
                             n_workers=n_workers, executor=executor, parts_dir=parts_dir,
                             peak_memory_mb_per_worker=peak, cluster_start_seconds=cluster_start)
    log.info("labelled %d chunks in %.1f s (%s, %d workers)", report.chunks_run, report.seconds,
             executor, n_workers)
    return report


def _prepare_dask_worker() -> None:
    """Once per Dask worker process, before its first chunk: keep freed memory for reuse
    (:func:`lamostcannon.parallel.keep_freed_memory`: the nanny's ``MALLOC_TRIM_THRESHOLD_``
    made every large array a fresh mmap, ~1.3x the CPU per chunk) and import the labelling
    code, so that neither is charged to a chunk."""
    global _DASK_WORKER_READY
    if not _DASK_WORKER_READY:
        from . import cannon, parallel  # noqa: F401  (imported here, not in the first chunk)

        parallel.keep_freed_memory()
        _DASK_WORKER_READY = True


_DASK_WORKER_READY = False


def _dask_label_chunk(store_path: str, start: int, stop: int, meta: pd.DataFrame,
                      ctx: LabelContext) -> pd.DataFrame:
    """Dask task: :func:`_label_store_chunk` on one BLAS thread (whatever the deployment set:
    ``dask worker --no-nanny`` leaves BLAS at one thread per core, oversubscribing)."""
    from threadpoolctl import threadpool_limits

    _prepare_dask_worker()  # a worker that joined after the start (cluster.scale)
    with threadpool_limits(limits=1):
        return _label_store_chunk(store_path, start, stop, meta, ctx)


def _run_dask(client, store_path, pending, meta, ctx, parts_dir, bar, max_in_flight=None):
    """Submit one task per chunk (at most ``max_in_flight`` at a time) and write parts as they come.

    The context (models, windows, boundaries: a few MB) is scattered to every worker once; a
    task carries only its row range and its rows of the metadata table (~100 kB per 2048
    rows), so the scheduler holds ``max_in_flight`` small tasks however big the survey.
    """
    from distributed import as_completed

    try:
        info = client.scheduler_info(n_workers=-1)  # distributed >= 2025 lists 5 by default
    except TypeError:
        info = client.scheduler_info()
    n_workers = max(len(info.get("workers", {})), 1)
    max_in_flight = max_in_flight or 2 * n_workers
    client.run(_prepare_dask_worker)
    client.run(_reset_peak_rss)
    [ctx_future] = client.scatter([ctx], broadcast=True, hash=False)
    token = hashlib.sha256(str(parts_dir).encode()).hexdigest()[:8]
    todo = list(pending)
    futures = {}

    def submit():
        i, start, stop = todo.pop(0)
        fut = client.submit(_dask_label_chunk, store_path, start, stop,
                            meta.iloc[start:stop].reset_index(drop=True), ctx_future,
                            key=f"label-chunk-{token}-{i}-{time.monotonic_ns()}", pure=False)
        futures[fut] = i
        return fut

    queue = as_completed([submit() for _ in range(min(max_in_flight, len(todo)))])
    for fut in queue:
        i = futures.pop(fut)
        write_part(fut.result(), parts_dir, i)
        fut.release()
        if bar is not None:
            bar.update(1)
        if todo:
            queue.add(submit())


def assemble_observations(parts_dir=None, n_chunks: int | None = None, path=None, *,
                          stream: bool = False):
    """Concatenate the parts into ``processed/labels_per_observation.parquet`` (atomic write).

    Returns the per-observation astropy Table (units and descriptions set). With
    ``stream=True`` the parts are read and written one at a time (one Parquet row group per
    part; memory bounded by the chunk size, plus 8 bytes per observation for the obsid check)
    and the path is returned instead of the table; the file reads back as the same table.
    Retired store rows are left out and duplicated obsids are an error either way.
    """
    parts_dir = Path(parts_dir or default_parts_dir())
    if n_chunks is None:
        run = json.loads((parts_dir / RUN_FILE).read_text())
        n_chunks = len(plan_chunks(run["n_obs"], run["chunk_size"]))
    if stream:
        return _assemble_stream(parts_dir, n_chunks, path)
    df = read_parts(parts_dir, n_chunks)
    # rows the store retired (their file changed and gives no spectrum now: obsid -1, no
    # pixels) hold no observation; files without an OBSID card (obsid -1) that do are kept
    retired = (df["obsid"].to_numpy() < 0) & (df["n_pixels"].to_numpy() == 0)
    if retired.any():
        log.info("%d retired store rows (no spectrum) left out of the per-observation table",
                 int(retired.sum()))
        df = df[~retired].reset_index(drop=True)
    known = df["obsid"].to_numpy() >= 0
    if df.loc[known, "obsid"].duplicated().any():
        raise RuntimeError("duplicated obsids in the per-observation table")
    table = to_table(df, kind="observation")
    path = Path(path or paths.processed_dir() / "labels_per_observation.parquet")
    write_table(table, path)
    return table


def _assemble_stream(parts_dir: Path, n_chunks: int, path) -> Path:
    """:func:`assemble_observations` part by part (``stream=True``)."""
    missing = sorted(set(range(n_chunks)) - done_chunks(parts_dir))
    if missing:
        raise RuntimeError(f"{len(missing)} of {n_chunks} chunks are not done (first: {missing[:5]})")
    files = [part_path(parts_dir, i) for i in range(n_chunks)]
    width, n_retired = 1, 0
    for f in files:   # the longest designation first: every row group gets the same width
        d = _drop_retired(pd.read_parquet(f, columns=["designation", "obsid", "n_pixels"]),
                          ["designation"])["designation"]
        if len(d):
            width = max(width, int(d.astype(str).str.len().max()))
    path = Path(path or paths.processed_dir() / "labels_per_observation.parquet")
    paths.ensure(path.parent)
    _remove_dead_temps(path)
    tmp = _tmp_name(path)
    writer = _ParquetTableWriter(tmp)
    obsids = []
    try:
        for f in files:
            df = pd.read_parquet(f)
            n = len(df)
            df = _drop_retired(df)
            n_retired += n - len(df)
            ids = df["obsid"].to_numpy(np.int64)
            obsids.append(ids[ids >= 0])
            if len(df) or writer.writer is None:
                writer.write(to_table(df, kind="observation", str_width=width))
        writer.close()
        ids = np.concatenate(obsids) if obsids else np.zeros(0, np.int64)
        if np.unique(ids).size != ids.size:
            raise RuntimeError("duplicated obsids in the per-observation table")
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    if n_retired:
        log.info("%d retired store rows (no spectrum) left out of the per-observation table",
                 n_retired)
    os.replace(tmp, path)
    log.info("wrote %s (%d rows, streamed from %d parts)", path, writer.n_rows, n_chunks)
    return path


# --------------------------------------------------------------------------------------------
# Repeats, Gaia, kinematics
# --------------------------------------------------------------------------------------------

#: Float columns averaged over a star's observations with S/N(z) weights.
MEAN_COLUMNS = ALL_LABELS + ("chi2", "chi2_per_pixel") + tuple(f"chi2_{n}" for n in
                                                             ABUNDANCE_LABELS) + ("rv",)
#: Integer bitmasks OR-ed over a star's combined observations.
OR_COLUMNS = ("flag", "quality_flag", "cannon_flag")


def combine_repeats(obs: pd.DataFrame) -> pd.DataFrame:
    """One row per star (``designation``): S/N(z)-weighted means of repeat observations.

    Parameters
    ----------
    obs : DataFrame
        Per-observation table (:func:`observation_columns`).

    Returns
    -------
    DataFrame, sorted by designation
        ``designation, giantmodel, n_obs`` (observations combined), ``n_obs_all`` (all
        observations of the star), the columns of :data:`MEAN_COLUMNS` as weighted means (weights
        ``w = snr_z``; NaN values are skipped), the errors (below), boolean ``_extrap`` and
        ``outside_training`` OR-ed, the bitmasks of :data:`OR_COLUMNS` OR-ed and ``ood_score``
        the largest over the combined observations, ``snr_z`` and ``snr`` the quadrature sums of
        the combined observations' values (the S/N of the combination for equal-weight,
        independent noise), and ``ra, dec, obsid`` of the combined observation with the highest
        S/N(z).

    Notes
    -----
    Which observations are combined: those with ``quality_flag == 0`` when the star has any; else
    those without :data:`BAD_FLAGS`; else all; and of those only the ones made with the star's model
    (the model whose combined observations carry the larger total S/N(z); ties go to the dwarf).

    Errors: ``e_<label>_formal`` and ``e_<label>_random`` propagate as ``sqrt(sum w^2 e^2) / sum w``
    (independent visits); the systematic floor of :mod:`lamostcannon.uncertainty` is shared by
    the visits and does not average down, so ``e_<label> = sqrt(e_random^2 + floor^2)`` with
    ``floor^2`` the weighted mean of ``e_<label>^2 - e_<label>_random^2`` over the observations.
    """
    missing = [c for c in ("designation", "snr_z", "flag", "giantmodel") if c not in obs]
    if missing:
        raise KeyError(f"combine_repeats: the observations lack the columns {missing} "
                       "(see observation_columns)")
    df = obs.reset_index(drop=True)
    # an observation listed twice is one visit, not two (it would shrink the random errors);
    # one without a star identity cannot be combined with anything
    drop = df["designation"].isna().to_numpy().copy()
    if "obsid" in df:
        obsid = pd.to_numeric(df["obsid"], errors="coerce").fillna(-1).to_numpy(np.int64)
        drop |= (obsid >= 0) & pd.Series(obsid).duplicated().to_numpy()
    if drop.any():
        log.warning("combine_repeats: %d of %d observation rows skipped (%d without a "
                    "designation, the rest a repeated obsid)", int(drop.sum()), len(df),
                    int(df["designation"].isna().sum()))
        df = df[~drop].reset_index(drop=True)
    if len(df) == 0:
        return _combine_empty()
    snr = df["snr_z"].to_numpy(float)
    w = np.where(np.isfinite(snr) & (snr > 0), snr, 1e-3)
    key = df["designation"].to_numpy()
    codes, uniques = pd.factorize(key, sort=True)
    n_stars = len(uniques)

    def count(mask):
        return np.bincount(codes, weights=mask, minlength=n_stars)

    qf = df["quality_flag"].to_numpy(np.int64) if "quality_flag" in df else np.zeros(len(df), int)
    good = (df["flag"].to_numpy() & BAD_FLAGS) == 0
    recommended = (qf == 0) & good
    has_rec = count(recommended) > 0
    has_good = count(good) > 0
    eligible = np.where(has_rec[codes], recommended, np.where(has_good[codes], good, True))
    giant = df["giantmodel"].to_numpy(bool)
    wg = np.bincount(codes, weights=w * (eligible & giant), minlength=n_stars)
    wd = np.bincount(codes, weights=w * (eligible & ~giant), minlength=n_stars)
    star_giant = wg > wd
    use = eligible & (giant == star_giant[codes])

    out = {"designation": np.asarray(uniques, dtype=object), "giantmodel": star_giant,
           "n_obs": count(use).astype(np.int32), "n_obs_all": count(np.ones(len(df))).astype(np.int32)}
    wu = np.where(use, w, 0.0)

    def wmean(x):
        ok = np.isfinite(x) & use
        num = np.bincount(codes, weights=np.where(ok, wu * np.where(ok, x, 0), 0), minlength=n_stars)
        den = np.bincount(codes, weights=np.where(ok, wu, 0), minlength=n_stars)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)

    def wquad(e):
        ok = np.isfinite(e) & use
        var = np.bincount(codes, weights=np.where(ok, (wu * np.where(ok, e, 0)) ** 2, 0),
                          minlength=n_stars)
        den = np.bincount(codes, weights=np.where(ok, wu, 0), minlength=n_stars)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, np.sqrt(var) / den, np.nan)

    for name in MEAN_COLUMNS:
        if name in df:
            out[name] = wmean(df[name].to_numpy(float))
    for name in ALL_LABELS:
        x = df[name].to_numpy(float)
        has = np.isfinite(x)
        e = df[f"e_{name}"].to_numpy(float)
        er = df[f"e_{name}_random"].to_numpy(float) if f"e_{name}_random" in df else e
        ef = df[f"e_{name}_formal"].to_numpy(float) if f"e_{name}_formal" in df else e
        er = np.where(np.isfinite(er), er, e)     # not calibrated: no floor
        ef = np.where(np.isfinite(ef), ef, e)
        out[f"e_{name}_formal"] = wquad(np.where(has, ef, np.nan))
        out[f"e_{name}_random"] = wquad(np.where(has, er, np.nan))
        with np.errstate(invalid="ignore"):
            floor2 = wmean(np.where(has, np.clip(e ** 2 - er ** 2, 0, None), np.nan))
        out[f"e_{name}"] = np.sqrt(out[f"e_{name}_random"] ** 2 + floor2)
    for name in [*extrap_columns(), "outside_training"]:
        if name in df:
            out[name] = count(df[name].to_numpy(bool) & use) > 0
    for name in OR_COLUMNS:
        if name not in df:
            continue
        flags = df[name].to_numpy(np.int64)
        star_flag = np.zeros(n_stars, dtype=np.int64)
        bits = np.unique(flags[use])
        all_bits = 0
        for b in bits:
            all_bits |= int(b)
        bit = 1
        while bit <= all_bits:
            if all_bits & bit:
                star_flag |= np.where(count(((flags & bit) != 0) & use) > 0, bit, 0)
            bit <<= 1
        out[name] = star_flag.astype(np.int64 if name == "cannon_flag" else np.int32)
    if "ood_score" in df:
        s = np.where(use, df["ood_score"].to_numpy(float), np.nan)
        best = np.full(n_stars, -np.inf)
        np.fmax.at(best, codes, np.where(np.isfinite(s), s, -np.inf))
        out["ood_score"] = np.where(np.isfinite(best), best, np.nan)
    for name in ("snr_z", "snr"):
        if name in df:
            v = df[name].to_numpy(float)
            out[name] = np.sqrt(np.bincount(codes, weights=np.where(use & np.isfinite(v),
                                                                      np.nan_to_num(v) ** 2, 0),
                                            minlength=n_stars))
    # Best (highest S/N) combined observation of each star: its position and obsid.
    order = np.lexsort((-np.where(use, w, -np.inf), codes))
    first = order[np.r_[True, codes[order][1:] != codes[order][:-1]]]
    for name in ("ra", "dec", "obsid"):
        out[name] = df[name].to_numpy()[first]
    return pd.DataFrame(out)


def _combine_empty() -> pd.DataFrame:
    cols = ["designation", "giantmodel", "n_obs", "n_obs_all", *MEAN_COLUMNS, *error_columns(),
            *extrap_columns(), "outside_training", *OR_COLUMNS, "ood_score", "snr_z", "snr", "ra",
            "dec", "obsid"]
    return pd.DataFrame({c: [] for c in cols})


class GaiaIndex:
    """Gaia DR2 positions and G magnitudes in a k-d tree, built once and queried many times.

    The index of :func:`match_gaia` (which builds one per call) and of the streaming catalogue
    (:func:`build_catalog` with ``stream=True``, which queries it once per bucket of stars). It
    holds the sources' ``source_id``, G magnitude and unit vectors: ~70 bytes per source, the
    one part of the per-star stages that scales with the Gaia input rather than the bucket.

    Parameters
    ----------
    gaia : Table, DataFrame or path
        ``source_id, ra, dec, phot_g_mean_mag`` (Gaia DR2 columns; ra, dec in deg).
    """

    def __init__(self, gaia):
        from scipy.spatial import cKDTree

        g = _as_frame(gaia, ["source_id", "ra", "dec", "phot_g_mean_mag"])
        self.n = len(g)
        self.ids = g["source_id"].to_numpy(np.int64)
        gmag = np.append(g["phot_g_mean_mag"].to_numpy(float), np.inf)
        gmag = np.where(np.isfinite(gmag), gmag, 99.0)
        gmag[-1] = np.inf
        self.gmag = gmag
        self.tree = (cKDTree(self._unit(g["ra"].to_numpy(float), g["dec"].to_numpy(float)))
                     if self.n else None)

    @staticmethod
    def _unit(a, d):
        a, d = np.radians(a), np.radians(d)
        return np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])

    @property
    def nbytes(self) -> int:
        """Bytes of the index's arrays (ids, magnitudes, the tree's points and order)."""
        tree = 0 if self.tree is None else self.tree.data.nbytes + self.tree.indices.nbytes
        return int(self.ids.nbytes + self.gmag.nbytes + tree)

    def match(self, ra, dec, radius_arcsec: float = 1.0) -> np.ndarray:
        """``source_id`` of the brightest source within the radius of each (ra, dec); (S,) int64."""
        ra = np.asarray(ra, dtype=float)
        dec = np.asarray(dec, dtype=float)
        result = np.full(ra.shape, NO_SOURCE_ID, dtype=np.int64)
        if self.n == 0 or ra.size == 0:
            return result
        chord = 2 * np.sin(np.radians(radius_arcsec / 3600) / 2)
        ok = np.isfinite(ra) & np.isfinite(dec)
        k = min(8, self.n)
        dist, idx = self.tree.query(self._unit(ra[ok], dec[ok]), k=k, distance_upper_bound=chord)
        dist, idx = dist.reshape(-1, k), idx.reshape(-1, k)
        found = np.isfinite(dist)
        mags = np.where(found, self.gmag[np.minimum(idx, self.n)], np.inf)
        best = np.argmin(mags, axis=1)
        has = found.any(axis=1)
        matched = np.full(ok.sum(), NO_SOURCE_ID, dtype=np.int64)
        matched[has] = self.ids[idx[has, best[has]]]
        result[ok] = matched
        return result


def match_gaia(ra, dec, gaia, radius_arcsec: float = 1.0) -> np.ndarray:
    """Gaia ``source_id`` of the brightest source (smallest ``phot_g_mean_mag``) within the radius.

    Parameters
    ----------
    ra, dec : array (S,), deg
    gaia : Table or DataFrame
        ``source_id, ra, dec, phot_g_mean_mag`` (Gaia DR2 columns).
    radius_arcsec : float
        Match radius (paper: 1 arcsec).

    Returns
    -------
    int64 array (S,)
        :data:`NO_SOURCE_ID` where nothing lies within the radius.
    """
    return GaiaIndex(gaia).match(ra, dec, radius_arcsec)


#: Galactocentric columns of Table 1 (right-handed frame of :mod:`lamostcannon.kinematics`), with
#: ``vphi = -vT`` and ``Jphi_prograde = -Jphi`` (positive for disk rotation) beside ``vT``/``Jphi``.
KINEMATIC_COLUMNS = ("R", "phi", "z", "vR", "vT", "vphi", "vz", "JR", "Jphi", "Jphi_prograde", "Jz")


class KinematicsInputs:
    """Gaia proper motions and positions and Bailer-Jones distances, deduplicated and indexed
    by ``source_id`` once, so that :func:`add_kinematics` can look up one bucket of stars at a
    time (the streaming catalogue) without joining the whole Gaia table again.

    Parameters
    ----------
    gaia : Table, DataFrame or path
        ``source_id, ra, dec, pmra, pmdec`` (deg, mas/yr).
    distances : Table, DataFrame or path
        ``source_id, r_est`` (pc).
    """

    def __init__(self, gaia, distances):
        g = _as_frame(gaia, ["source_id", "ra", "dec", "pmra", "pmdec"]).drop_duplicates("source_id")
        d = _as_frame(distances, ["source_id", "r_est"]).drop_duplicates("source_id")
        self.gaia = g.set_index("source_id")
        self.distances = d.set_index("source_id")

    @property
    def nbytes(self) -> int:
        """Bytes of the two indexed tables (values and ``source_id`` index)."""
        return int(self.gaia.memory_usage(index=True).sum()
                   + self.distances.memory_usage(index=True).sum())

    def join(self, source_id, rv) -> pd.DataFrame:
        """``source_id, rv, ra, dec, pmra, pmdec, r_est`` of each star (NaN where not found)."""
        ids = np.asarray(source_id, dtype=np.int64)
        out = pd.DataFrame({"source_id": ids, "rv": np.asarray(rv, dtype=float)})
        g = self.gaia.reindex(ids)
        for name in self.gaia.columns:
            out[name] = g[name].to_numpy()
        out["r_est"] = self.distances["r_est"].reindex(ids).to_numpy()
        return out


def add_kinematics(stars: pd.DataFrame, gaia=None, distances=None, *,
                   n_workers: int | None = None, inputs: KinematicsInputs | None = None
                   ) -> pd.DataFrame:
    """Galactocentric positions, velocities and actions (paper section 5.1) for matched stars.

    Uses :mod:`lamostcannon.kinematics` with Gaia DR2 proper motions, Bailer-Jones ``r_est`` (pc)
    distances and the LAMOST radial velocity (``rv``, km/s; combined over repeats). Stars without a
    Gaia match, distance or radial velocity get NaN. Right-handed frame (as the paper's Table 1):
    disk stars have ``vT < 0`` and ``Jphi < 0``; ``vphi = -vT`` and ``Jphi_prograde = -Jphi`` are
    positive for disk rotation (galpy's sign). ``n_workers``: processes for the chunks of
    :func:`lamostcannon.kinematics.kinematics` (default: this process, whose galpy uses every
    core through OpenMP; worker processes when galpy runs on one thread, from 200,000 stars on).
    ``inputs``: a :class:`KinematicsInputs` prepared once (then ``gaia`` and ``distances`` are
    not used); each star's values depend on that star's row only, so calling this bucket by
    bucket gives the rows of one call on the whole table.
    """
    out = stars.copy()
    for name in KINEMATIC_COLUMNS:
        out[name] = np.nan
    if inputs is None:
        if gaia is None or distances is None:
            log.warning("no Gaia sources or distances: kinematic columns are NaN")
            return out
        inputs = KinematicsInputs(gaia, distances)
    if len(out) == 0:
        return out
    from . import kinematics

    joined = inputs.join(out["source_id"].to_numpy(np.int64), out["rv"].to_numpy(float))
    # Gaia positions (epoch 2015.5, consistent with the proper motions); NaN rows are flagged by
    # kinematics.kinematics, never dropped.
    kin = kinematics.kinematics_from_table(joined, n_workers=n_workers)
    for name in KINEMATIC_COLUMNS:
        if name == "Jphi_prograde":
            out[name] = -kin["Jphi"].to_numpy(float)
        else:
            out[name] = kin[name].to_numpy(float)
    return out


# --------------------------------------------------------------------------------------------
# Table 1 schema and writing
# --------------------------------------------------------------------------------------------

_ELEMENT_NAMES = {"o": "O", "mg": "Mg", "al": "Al", "si": "Si", "ca": "Ca", "sc": "Sc", "ti": "Ti",
                  "mn": "Mn", "y": "Y", "ba": "Ba", "eu": "Eu", "alpha": "alpha", "s": "s-process"}


def _describe(name: str) -> tuple[str | None, str]:
    """(unit, description) of a catalogue or per-observation column (descriptions fit the 68
    characters of a FITS ``TCOMMn`` card; the header carries the full bit definitions)."""
    fixed = {
        "source_id": (None, f"Gaia DR2 source id, brightest within 1 arcsec ({NO_SOURCE_ID}: none)"),
        "designation": (None, "LAMOST unique star identifier"),
        "obsid": (None, "LAMOST obsid (per star: the highest-S/N combined observation)"),
        "row": (None, "row of the observation in the spectra store"),
        "giantmodel": (None, "true if labels were estimated with the giant model"),
        "teff": ("K", "T_eff"), "logg": ("dex", "log(g)"), "vmic": ("km / s", "v_mic"),
        "fe_h": ("dex", "[Fe/H]"),
        "kiel_extrap": (None, "T_eff or log(g) beyond its KDE boundary, for any observation"),
        "outside_training": (None, "T_eff, log(g) or [Fe/H] outside the training range"),
        "chi2": (None, "whole-spectrum chi^2"),
        "chi2_per_pixel": (None, "chi^2 / pixels used"),
        "snr_z": (None, "LAMOST z-band S/N; per star: quadrature sum of combined obs"),
        "snr": (None, "median flux*sqrt(ivar), normalised spectrum; star: quadrature sum"),
        "ra": ("deg", "right ascension"), "dec": ("deg", "declination"),
        "R": ("kpc", "R, Galactocentric cylindrical radius"),
        "phi": ("rad", "phi = atan2(Y, X), right-handed, Sun at phi = 0"),
        "z": ("kpc", "z, height in Galactocentric cylindrical coordinates"),
        "vR": ("km / s", "R-velocity dR/dt"),
        "vT": ("km / s", "R dphi/dt, right-handed: < 0 for disk rotation (Sun -232)"),
        "vphi": ("km / s", "-vT: azimuthal velocity, > 0 for disk rotation (Sun +232)"),
        "vz": ("km / s", "z-velocity (> 0 towards the North Galactic Pole)"),
        "JR": ("kpc km / s", "radial action"),
        "Jphi": ("kpc km / s", "L_z = R vT, right-handed: < 0 for prograde (disk) orbits"),
        "Jphi_prograde": ("kpc km / s", "-Jphi: angular momentum, > 0 for prograde (disk) orbits"),
        "Jz": ("kpc km / s", "vertical action"),
        "rv": ("km / s", "LAMOST heliocentric radial velocity"),
        "teff_lasp": ("K", "LAMOST pipeline (LASP) T_eff used for the model choice"),
        "logg_lasp": ("dex", "LAMOST pipeline (LASP) log(g) used for the model choice"),
        "n_pixels": (None, "pixels used in the fit"), "n_iter": (None, "test-step iterations"),
        "converged": (None, "true if the test step converged"),
        "cannon_flag": (None, "test-step bitmask (lamostcannon.cannon.FLAG_BITS), OR-ed"),
        "flag": (None, "processing bitmask: 1 no pixels, 2 not converged, 4 no LASP, 8 NaN"),
        "quality_flag": (None, "0 = recommended for science; bits: header QF_BITS"),
        "ood_score": (None, "how unlike the training set (> header OOD_THR: flagged)"),
        "n_obs": (None, "number of observations combined"),
        "n_obs_all": (None, "number of observations of the star"),
    }
    if name in fixed:
        return fixed[name]
    if name.endswith("_cal"):
        return _calibration.describe_column(name)

    def element(label):
        x = label[:-3]
        return f"[{_ELEMENT_NAMES.get(x, x)}/Fe]"

    if name.startswith("e_"):
        base = name[2:]
        kind = "total"
        for suffix, what in (("_random", "random"), ("_formal", "formal")):
            if base.endswith(suffix):
                base, kind = base[: -len(suffix)], what
        unit, desc = _describe(base)
        return unit, {"total": f"calibrated total 1-sigma error of {desc} (random+floor)",
                      "random": f"visit-to-visit 1-sigma error of {desc} (calibrated)",
                      "formal": f"formal 1-sigma error of {desc} (inverse Hessian)"}[kind]
    if name.startswith("chi2_"):
        return None, f"chi^2 in windows around strong lines of {element(name[5:])[1:-4]}"
    if name.endswith("_extrap"):
        label = name[:-7]
        what = "[Fe/H]" if label == "fe_h" else element(label)
        return None, f"{what} beyond its KDE extrapolation boundary, any observation"
    if name.endswith("_fe"):
        return "dex", element(name)
    return None, name


def catalog_columns() -> list[str]:
    """The catalogue's columns: paper Table 1 order, then ``n_obs``, flags, S/N and errors."""
    cols = ["source_id", "designation", "giantmodel", "teff", "logg", "vmic", "kiel_extrap", "chi2",
            "fe_h", "fe_h_extrap"]
    for name in ABUNDANCE_LABELS:
        cols += [name, f"chi2_{name}", f"{name}_extrap"]
    cols += ["snr_z", "ra", "dec", *KINEMATIC_COLUMNS]
    cols += ["obsid", "n_obs", "n_obs_all", "quality_flag", "flag", "cannon_flag",
             "outside_training", "ood_score", "chi2_per_pixel", "snr", *error_columns()]
    return cols


def trust_header(ctx: LabelContext | None = None, directory=None) -> dict:
    """Table metadata of the trust columns: the ``quality_flag`` bits, the OOD thresholds and
    the labels without CV skill of each model (from ``ctx``, or from the calibration files
    beside the models in ``directory``, default ``processed/``)."""
    from . import ood as _ood
    from . import uncertainty
    from .labelling import companion_path

    meta = {"QF_BITS": {str(b): f"{n}: {t}" for b, (n, t) in QUALITY_BITS.items()}}
    thresholds, noskill = {}, {}
    for g in ("dwarf", "giant"):
        if ctx is not None:
            b = ctx.models[g]
            cal, errors = b.ood, b.errors
        else:
            directory = Path(directory or paths.processed_dir())
            try:
                mpath = _model_path(g, directory)
            except FileNotFoundError:
                continue
            pe, po = companion_path(mpath, "uncertainty"), companion_path(mpath, "ood")
            errors = uncertainty.read_error_model(pe) if pe else None
            cal = _ood.read_calibration(po) if po else None
        if cal is not None:
            thresholds[g] = round(float(cal.threshold), 4)
        if errors is not None:
            noskill[g] = [n for n, v in errors.skill.items() if not v.get("skill", True)]
    meta["OOD_THR"] = thresholds
    meta["NOSKILL"] = noskill
    return meta


def to_table(df: pd.DataFrame, kind: str = "catalog", meta=None, *, str_width: int | None = None):
    """An astropy Table with units and descriptions from the per-observation or star DataFrame
    (``meta``: extra header entries, e.g. :func:`trust_header`; ``str_width``: characters of the
    ``designation`` column, default the longest value; the streaming writers give every bucket
    the survey's longest)."""
    from astropy.table import Table

    if kind == "catalog":
        names = catalog_columns()
    elif kind == "observation":
        names = list(observation_columns())
    else:
        raise ValueError(f"kind must be 'catalog' or 'observation', got {kind!r}")
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise KeyError(f"columns missing for the {kind} table: {missing}")
    table = Table()
    for name in names:
        values = df[name].to_numpy()
        if name == "designation":
            values = values.astype(str)
            if str_width is not None:
                if values.dtype.itemsize // 4 > str_width:
                    raise ValueError(f"a designation is longer than str_width={str_width}")
                values = values.astype(f"U{max(int(str_width), 1)}")
        unit, description = _describe(name)
        table[name] = values
        table[name].unit = unit
        table[name].description = description
    from . import __version__

    table.meta["lamostcannon_version"] = __version__
    table.meta["flag_bits"] = {str(b): t for b, t in FLAG_BITS.items()}
    table.meta["reference"] = "Wheeler et al. 2020, ApJ 898, 58, Table 1"
    table.meta.update(meta or {})
    return table


def write_table(table, path) -> Path:
    """Write a Table (FITS or Parquet by suffix) to a temporary name and rename it into place."""
    import warnings

    path = Path(path)
    paths.ensure(path.parent)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FITS drops the unit "dex" with a UnitsWarning
        if path.suffix == ".fits":
            from .cleaning import write_table_fits

            return write_table_fits(table, path)  # keeps 'dex' and descriptions (TCOMMn)
        elif path.suffix == ".parquet":
            table.write(tmp, format="parquet", overwrite=True)
        else:
            raise ValueError(f"write FITS or Parquet, not {path.suffix}")
    os.replace(tmp, path)
    log.info("wrote %s (%d rows)", path, len(table))
    return path


# --------------------------------------------------------------------------------------------
# Streaming per-star stages: buckets of stars, Table 1 written bucket by bucket
# --------------------------------------------------------------------------------------------

#: Observations per bucket of the streaming catalogue (:func:`build_catalog` with ``stream=True``):
#: the per-star stages hold one bucket at a time (~5 kB per observation at the peak).
BUCKET_ROWS = 50_000
#: Observations read from the input at a time while partitioning into buckets (at most
#: ``bucket_rows``).
PARTITION_BATCH_ROWS = 65_536
#: Designations sampled per bucket to place the bucket boundaries.
_SAMPLE_PER_BUCKET = 64
BUCKET_PATTERN = "bucket-{:05d}.arrows"
BUCKET_MANIFEST = "buckets.json"


def default_bucket_dir() -> Path:
    """``interim/catalog_buckets``: the observations partitioned by star (streaming catalogue)."""
    return paths.interim_dir() / "catalog_buckets"


class _ObservationSource:
    """The per-observation rows of a DataFrame, an astropy Table, a Parquet file or a folder of
    labelling parts, read in batches of at most ``batch_rows`` rows in their order."""

    def __init__(self, obs, batch_rows: int = PARTITION_BATCH_ROWS):
        self.batch_rows = int(batch_rows)
        self.obs = obs
        self.kind = "frame"
        self.fingerprint = None       # None: not resumable (an in-memory frame)
        if isinstance(obs, (str, Path)):
            path = Path(obs)
            if path.is_dir():
                run = json.loads((path / RUN_FILE).read_text())
                self.kind, self.path = "parts", path
                self.n_chunks = len(plan_chunks(run["n_obs"], run["chunk_size"]))
                missing = sorted(set(range(self.n_chunks)) - done_chunks(path))
                if missing:
                    raise RuntimeError(f"{len(missing)} of {self.n_chunks} chunks of {path} are "
                                       f"not done (first: {missing[:5]}); run run_inference first")
                files = [part_path(path, i) for i in range(self.n_chunks)]
                self.n_rows = sum(_parquet_rows(f) for f in files)
                self.fingerprint = {"parts": str(path.resolve()), "run": run,
                                    "files": [_file_stamp(f) for f in files]}
            elif path.is_file() and path.suffix == ".parquet":
                self.kind, self.path = "parquet", path
                self.n_rows = _parquet_rows(path)
                self.fingerprint = {"parquet": _file_stamp(path)}
            else:
                raise ValueError(f"obs must be a DataFrame, a Table, a .parquet file or a folder "
                                 f"of labelling parts; got {obs!r}")
        else:
            self.n_rows = len(obs)

    def batches(self, columns=None):
        """DataFrames of consecutive rows (only ``columns`` when given)."""
        if self.kind == "parts":
            for i in range(self.n_chunks):
                df = pd.read_parquet(part_path(self.path, i), columns=_with_retired(columns))
                yield _drop_retired(df, columns)
        elif self.kind == "parquet":
            for table in self._row_groups(columns):
                yield table.to_pandas()
        else:
            for start in range(0, self.n_rows, self.batch_rows):
                part = self.obs[start:start + self.batch_rows]
                if not isinstance(part, pd.DataFrame):
                    part = part.to_pandas()
                yield (part[columns] if columns else part).reset_index(drop=True)

    def _row_groups(self, columns=None):
        """The Parquet file one row group at a time, in slices of ``batch_rows`` rows (pyarrow's
        ``iter_batches`` reads ahead: ~0.6 kB per row of the file, measured; a row group at a
        time is bounded by the largest row group)."""
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.path) as f:
            for i in range(f.metadata.num_row_groups):
                table = f.read_row_group(i, columns=columns)
                for start in range(0, table.num_rows, self.batch_rows):
                    yield table.slice(start, self.batch_rows)
                del table

    def arrow_batches(self):
        """The same rows as :meth:`batches`, as pyarrow Tables (no pandas conversion)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.kind == "parts":
            for i in range(self.n_chunks):
                t = pq.read_table(part_path(self.path, i))
                retired = ((t.column("obsid").to_numpy() < 0)
                           & (t.column("n_pixels").to_numpy() == 0))
                yield t.filter(pa.array(~retired)) if retired.any() else t
        elif self.kind == "parquet":
            yield from self._row_groups()
        else:
            for df in self.batches():
                yield pa.Table.from_pandas(df, preserve_index=False)


def _with_retired(columns):
    return None if columns is None else list(dict.fromkeys([*columns, "obsid", "n_pixels"]))


def _drop_retired(df: pd.DataFrame, columns=None) -> pd.DataFrame:
    """Leave out rows the store retired (obsid -1 and no pixels), as :func:`assemble_observations`."""
    retired = (df["obsid"].to_numpy() < 0) & (df["n_pixels"].to_numpy() == 0)
    if retired.any():
        df = df[~retired].reset_index(drop=True)
    return df[columns] if columns is not None else df


def _parquet_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _file_stamp(path) -> list:
    st = os.stat(path)
    return [Path(path).name, st.st_size, st.st_mtime_ns]


def _designations(values) -> np.ndarray:
    return np.asarray(pd.Series(values).astype(str).to_numpy(), dtype=object)


def _bucket_boundaries(source: _ObservationSource, n_buckets: int) -> list[str]:
    """``n_buckets - 1`` designations splitting the stars into buckets of about equal numbers of
    observations: quantiles of a deterministic sample (every observation of the stars whose
    designation hash falls below a threshold, so a star is sampled with all its visits)."""
    if n_buckets <= 1:
        return []
    rate = min(1.0, _SAMPLE_PER_BUCKET * n_buckets / max(source.n_rows, 1))
    threshold = np.uint64(min(int(rate * 2.0 ** 64), 2 ** 64 - 1))
    sample = []
    for df in source.batches(["designation"]):
        d = _designations(df["designation"])
        h = pd.util.hash_array(d)
        sample.append(d[h <= threshold])
    sample = np.sort(np.concatenate(sample)) if sample else np.array([], dtype=object)
    if sample.size == 0:
        return []
    q = (np.arange(1, n_buckets) * sample.size) // n_buckets
    return sorted(set(sample[q].tolist()))


def _lock(path: Path):
    """An exclusive OS lock (``fcntl.flock``) on ``path``, released when the file is closed or
    the process ends however it ends; a racing build waits for it."""
    import fcntl

    fh = open(path, "a+")
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    return fh


def read_bucket(path, columns=None) -> pd.DataFrame:
    """The observations of one bucket of :func:`partition_observations` (an Arrow IPC stream
    file), in their input order; ``columns``: only those."""
    import pyarrow as pa

    with pa.ipc.open_stream(str(path)) as reader:
        table = reader.read_all()
    if columns is not None:
        table = table.select(list(columns))
    return table.to_pandas()


def partition_observations(obs, bucket_dir=None, *, bucket_rows: int = BUCKET_ROWS,
                           batch_rows: int = PARTITION_BATCH_ROWS) -> dict:
    """Partition the per-observation rows into buckets by star (``designation``).

    Every observation of a star lands in the same bucket, so repeats combine within a bucket;
    bucket ``j`` holds the designations ``boundaries[j-1] <= d < boundaries[j]`` (Python string
    order), so the buckets one after another, each sorted by designation, give the order of
    :func:`combine_repeats` on the whole table. Within a bucket the rows keep their input order.
    Buckets are Arrow IPC stream files (``bucket-NNNNN.arrows``, uncompressed record batches,
    ~650 bytes per observation on disk; :func:`read_bucket`). Memory: one batch of ``batch_rows`` input rows (and, for a Parquet
    input, its largest row group: the streamed :func:`assemble_observations` writes one per
    part), whatever the number of observations.

    Parameters
    ----------
    obs : DataFrame, Table, path of a ``.parquet`` file, or a folder of labelling parts
        The per-observation table (:func:`observation_columns`). A parts folder is read as
        :func:`assemble_observations` reads it (every chunk must be done; retired store rows
        left out).
    bucket_dir : path, optional
        Default :func:`default_bucket_dir`.
    bucket_rows : int
        Observations per bucket, on average (the boundaries come from a sample).

    Returns
    -------
    dict
        The manifest (also ``<bucket_dir>/buckets.json``): ``n_obs``, ``boundaries``, and per
        bucket ``file``, ``n_obs``, ``n_stars``, ``max_designation``; ``resumed`` is true when the
        buckets of an earlier run of the same input were reused.

    Notes
    -----
    Crash-safe and resumable: the buckets are written under temporary names, renamed, and the
    manifest is written last (atomically) with the input's fingerprint (file names, sizes and
    modification times; the run's ``run.json`` for a parts folder). A later call with the same
    file input and ``bucket_rows`` reuses complete buckets; anything else (no manifest, another
    input, an in-memory frame) rebuilds them. An exclusive lock on ``<bucket_dir>/.lock`` makes
    a racing call wait.
    """
    bucket_dir = paths.ensure(Path(bucket_dir or default_bucket_dir()))
    source = obs if isinstance(obs, _ObservationSource) else _ObservationSource(obs, batch_rows)
    with _lock(bucket_dir / ".lock"):
        return _partition(source, bucket_dir, bucket_rows)


def _partition(source: _ObservationSource, bucket_dir: Path, bucket_rows: int) -> dict:
    """:func:`partition_observations` under the caller's lock of ``bucket_dir``."""
    import pyarrow as pa

    if bucket_rows < 1:
        raise ValueError(f"bucket_rows must be >= 1, got {bucket_rows}")
    manifest_path = bucket_dir / BUCKET_MANIFEST
    if source.fingerprint is not None and manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if (old.get("fingerprint") == source.fingerprint
                and old.get("bucket_rows") == bucket_rows
                and all((bucket_dir / b["file"]).exists() for b in old["buckets"])):
            log.info("reusing %d buckets of %s", len(old["buckets"]), bucket_dir)
            return {**old, "resumed": True}
    manifest_path.unlink(missing_ok=True)
    for p in [*bucket_dir.glob("bucket-*.arrows"), *bucket_dir.glob(".bucket-*.tmp")]:
        p.unlink()
    n_buckets = max(1, -(-source.n_rows // bucket_rows))
    bounds = _bucket_boundaries(source, n_buckets)
    n_buckets = len(bounds) + 1
    edges = np.asarray(bounds, dtype=object)
    names = [BUCKET_PATTERN.format(j) for j in range(n_buckets)]
    tmps = [bucket_dir / f".{n}.{os.getpid()}.tmp" for n in names]
    writers, schema, n_in = {}, None, 0
    # Arrow IPC streams: each piece is appended as one record batch; unlike a Parquet writer,
    # which keeps every row group's metadata until it closes (~0.35 kB per observation with
    # many small row groups, measured), nothing accumulates per write. Uncompressed: LZ4 saved
    # a quarter of the ~650 bytes per observation and cost 4-7x the CPU (measured).
    def writer(j):
        if j not in writers:
            writers[j] = pa.ipc.new_stream(str(tmps[j]), schema)
        return writers[j]

    try:
        for df in source.arrow_batches():
            if df.num_rows == 0:
                continue
            if schema is None:
                schema = df.schema
            elif df.schema != schema:
                df = df.cast(schema)
            n_in += df.num_rows
            stars = df.column("designation").to_numpy(zero_copy_only=False)
            which = np.searchsorted(edges, _designations(stars), side="right")
            order = np.argsort(which, kind="stable")
            counts = np.bincount(which, minlength=n_buckets)
            ends = np.cumsum(counts)
            for j in np.flatnonzero(counts):
                rows = order[ends[j] - counts[j]:ends[j]]
                writer(j).write_table(df.take(pa.array(rows)))
            del df
        if schema is not None:
            for j in range(n_buckets):   # an empty bucket: a stream with the schema only
                writer(j)
    finally:
        for w in writers.values():
            w.close()
    buckets = []
    for j, (name, tmp) in enumerate(zip(names, tmps)):
        if j not in writers:
            continue
        os.replace(tmp, bucket_dir / name)
        d = read_bucket(bucket_dir / name, columns=["designation"])["designation"].astype(str)
        buckets.append({"file": name, "n_obs": int(len(d)), "n_stars": int(d.nunique()),
                        "max_designation": int(d.str.len().max()) if len(d) else 0})
    manifest = {"n_obs": int(n_in), "bucket_rows": int(bucket_rows), "boundaries": bounds,
                "fingerprint": source.fingerprint, "buckets": buckets}
    _atomic_write_text(manifest_path, json.dumps(manifest))
    log.info("partitioned %d observations into %d buckets under %s", n_in, len(buckets),
             bucket_dir)
    return {**manifest, "resumed": False}


class _ParquetTableWriter:
    """Writes astropy Tables of one schema to one Parquet file, one row group per table, with the
    metadata astropy's own writer puts there (``Table.read`` restores units, descriptions and
    ``meta``; string widths from the first table, so give every table the same widths)."""

    def __init__(self, path):
        self.path = Path(path)
        self.writer = None
        self.schema = None
        self.n_rows = 0

    def write(self, table) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from astropy.table import meta as table_meta

        if self.writer is None:
            types, metadata = [], {}
            for name in table.colnames:
                dt = table[name].dtype
                if dt.kind == "O" or len(dt.shape):
                    raise TypeError(f"column {name!r}: only plain columns stream to Parquet")
                types.append((name, pa.from_numpy_dtype(dt.type)))
                if dt.kind == "U":
                    metadata[f"table::len::{name}"] = str(dt.itemsize // 4)
                elif dt.kind == "S":
                    metadata[f"table::len::{name}"] = str(dt.itemsize)
            metadata["table_meta_yaml"] = "\n".join(table_meta.get_yaml_from_table(table))
            self.schema = pa.schema(types, metadata={k.encode(): v.encode()
                                                     for k, v in metadata.items()})
            self.writer = pq.ParquetWriter(self.path, self.schema, version="2.4")
        arrays = []
        for name in table.colnames:
            values = np.asarray(table[name])
            arrays.append(pa.array(values.astype(values.dtype.newbyteorder("<"), copy=False),
                                   type=self.schema.field(name).type))
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.n_rows += len(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _FitsTableWriter:
    """Writes astropy Tables of one schema as the rows of one FITS binary table whose row count
    is known in advance: the header (NAXIS2 = ``n_rows``) and the first table's rows, then each
    table's rows, then the padding. Each table is encoded by astropy
    (:func:`lamostcannon.cleaning.write_table_fits` into a scratch file), so the bytes are those
    of one call on the whole table."""

    def __init__(self, path, n_rows: int, scratch: Path):
        self.path = Path(path)
        self.n_rows = int(n_rows)
        self.scratch = Path(scratch)
        self.fh = None
        self.formats = None
        self.written = 0
        self.fast = False

    def write(self, table) -> None:
        if self.fh is not None and self.fast:
            self.fh.write(_fits_rows(table, self.formats))
            self.written += len(table)
            return
        from astropy.io import fits

        from .cleaning import write_table_fits

        write_table_fits(table, self.scratch)
        raw = self.scratch.read_bytes()
        with fits.open(self.scratch) as hdul:
            info = hdul.fileinfo(1)
            header = hdul[1].header
            width, rows = header["NAXIS1"], header["NAXIS2"]
            formats = [(header[f"TTYPE{i}"], header[f"TFORM{i}"])
                       for i in range(1, header["TFIELDS"] + 1)]
        if self.fh is None:
            self.formats = formats
            head = bytearray(raw[:info["datLoc"]])
            card = fits.Card("NAXIS2", self.n_rows, header.comments["NAXIS2"]).image.encode()
            for at in range(info["hdrLoc"], info["datLoc"], 80):
                if head[at:at + 9] == b"NAXIS2  =":
                    head[at:at + 80] = card
                    break
            else:
                raise RuntimeError("no NAXIS2 card in the binary-table header")
            self.fh = open(self.path, "wb")
            self.fh.write(head)
        elif formats != self.formats:
            raise ValueError(f"table columns differ from the first table's: {formats} vs "
                             f"{self.formats}")
        data = raw[info["datLoc"]:info["datLoc"] + width * rows]
        if self.fh.tell() == info["datLoc"]:   # the first table: may numpy encode the next ones?
            try:
                self.fast = _fits_rows(table, formats) == data
            except (TypeError, ValueError):
                self.fast = False
            if not self.fast:
                log.info("FITS rows encoded by astropy for every bucket (slower)")
        self.fh.write(data)
        self.written += rows

    def close(self) -> None:
        if self.fh is None:
            return
        if self.written != self.n_rows:
            self.fh.close()
            raise RuntimeError(f"wrote {self.written} rows into a FITS table of {self.n_rows}")
        size = self.fh.tell()
        self.fh.write(b"\0" * (-size % 2880))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.scratch.unlink(missing_ok=True)


_FITS_CODES = {"L": "i1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}


def _fits_rows(table, formats) -> bytes:
    """The FITS binary-table rows of ``table`` for columns ``[(TTYPE, TFORM), ...]`` (scalar
    L, B, I, J, K, E, D and ``nA`` columns), encoded with numpy: big-endian numbers, ``T``/``F``
    for booleans, ASCII strings padded with NUL. Checked against astropy's bytes on the first
    bucket before it is used (:class:`_FitsTableWriter`)."""
    import re

    dtype = []
    for name, tform in formats:
        m = re.fullmatch(r"(\d*)([A-Z])", tform.strip())
        if not m or (m.group(1) not in ("", "1") and m.group(2) != "A"):
            raise ValueError(f"column {name}: TFORM {tform} is not encoded here")
        code = m.group(2)
        dtype.append((name, f"S{m.group(1) or 1}" if code == "A" else _FITS_CODES[code]))
    rows = np.zeros(len(table), dtype=dtype)
    for name, tform in formats:
        values = np.asarray(table[name])
        if tform.strip().endswith("L"):
            rows[name] = np.where(values, ord("T"), ord("F"))
        elif tform.strip().endswith("A"):
            rows[name] = np.char.encode(values.astype(str), "ascii")
        else:
            rows[name] = values
    return rows.tobytes()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _remove_dead_temps(path: Path) -> None:
    """Remove the temporary files of ``path`` left by runs whose process is gone."""
    for tmp in path.parent.glob(f".{path.stem}.*.tmp{path.suffix}"):
        try:
            pid = int(tmp.name[len(path.stem) + 2:].split(".")[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            tmp.unlink(missing_ok=True)


@dataclass
class CatalogStream:
    """What the streaming :func:`build_catalog` did (``stream=True``): the catalogue is in the
    files, not in memory; :meth:`read` loads it."""

    n_observations: int
    n_stars: int
    n_buckets: int
    fits_path: Path | None
    parquet_path: Path | None
    bucket_dir: Path
    buckets_resumed: bool
    #: Wall and CPU seconds per stage (partition, combine, gaia, kinematics, table1), summed
    #: over the buckets; CPU counts every thread of this process.
    stage_seconds: dict
    stage_cpu_seconds: dict
    #: Peak resident memory of this process during each stage, MB (the largest over the
    #: buckets); measured only with ``track_memory=True``.
    stage_peak_rss_mb: dict
    #: Resident memory the Gaia index and distances take (MB, ``track_memory=True``).
    reference_mb: float = float("nan")
    #: Bytes of their arrays (scales with the number of Gaia sources).
    reference_nbytes: int = 0

    def __len__(self) -> int:
        return self.n_stars

    def read(self):
        """The catalogue as an astropy Table (from the Parquet file, else the FITS file)."""
        if self.parquet_path is not None:
            from astropy.table import Table

            return Table.read(self.parquet_path)
        from .cleaning import read_table_fits

        return read_table_fits(self.fits_path)


class _Stages:
    """Wall, CPU and (optionally) peak-RSS accounting of interleaved stages in one process."""

    def __init__(self, track_memory: bool):
        self.track = track_memory
        self.seconds, self.cpu, self.peak = {}, {}, {}

    def __call__(self, name):
        import contextlib

        @contextlib.contextmanager
        def stage():
            if self.track:
                _reset_peak_rss()
            t, c = time.perf_counter(), time.process_time()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
                if self.track:
                    self.peak[name] = max(self.peak.get(name, 0.0), _peak_rss_mb())
        return stage()


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _build_catalog_stream(obs, gaia, distances, fits_path, parquet_path, radius_arcsec, ctx,
                          calibration, bucket_dir, bucket_rows, track_memory) -> CatalogStream:
    """The streaming path of :func:`build_catalog` (see there)."""
    if fits_path is False and parquet_path is False:
        raise ValueError("stream=True writes the catalogue to files: give fits_path or "
                         "parquet_path (not both False)")
    stages = _Stages(track_memory)
    bucket_dir = paths.ensure(Path(bucket_dir or default_bucket_dir()))
    source = _ObservationSource(obs, min(PARTITION_BATCH_ROWS, bucket_rows))
    lock = _lock(bucket_dir / ".lock")   # held until the catalogue is written
    try:
        return _stream_buckets(source, lock, stages, gaia, distances, fits_path, parquet_path,
                               radius_arcsec, ctx, calibration, bucket_dir, bucket_rows,
                               track_memory)
    finally:
        lock.close()


def _stream_buckets(source, lock, stages, gaia, distances, fits_path, parquet_path,
                    radius_arcsec, ctx, calibration, bucket_dir, bucket_rows, track_memory):
    # the reference catalogues first (their memory is measured alone): Gaia index, distances
    rss0 = _rss_mb()
    with stages("gaia"):
        if isinstance(gaia, (str, Path)):
            gaia = _as_frame(gaia, ["source_id", "ra", "dec", "pmra", "pmdec", "phot_g_mean_mag"])
        index = GaiaIndex(gaia) if gaia is not None else None
    with stages("kinematics"):
        inputs = (KinematicsInputs(gaia, distances)
                  if gaia is not None and distances is not None else None)
    del gaia
    reference_mb = _rss_mb() - rss0
    reference_nbytes = sum(x.nbytes for x in (index, inputs) if x is not None)
    if inputs is None:
        log.warning("no Gaia sources or distances: kinematic columns are NaN")
    with stages("partition"):
        manifest = _partition(source, bucket_dir, bucket_rows)
    buckets = manifest["buckets"]
    n_stars = sum(b["n_stars"] for b in buckets)
    width = max([b["max_designation"] for b in buckets] + [1])
    targets = {}
    if fits_path is not False:
        targets["fits"] = Path(fits_path or paths.processed_dir() / "catalog.fits")
    if parquet_path is not False:
        targets["parquet"] = Path(parquet_path or paths.processed_dir() / "catalog.parquet")
    for target in targets.values():
        paths.ensure(target.parent)
        _remove_dead_temps(target)
    tmps = {k: _tmp_name(v) for k, v in targets.items()}
    for old in bucket_dir.glob(".scratch.*.fits"):   # a killed build's (we hold the lock)
        old.unlink(missing_ok=True)
    header = trust_header(ctx)
    writers = {}
    if "parquet" in tmps:
        writers["parquet"] = _ParquetTableWriter(tmps["parquet"])
    if "fits" in tmps:
        writers["fits"] = _FitsTableWriter(tmps["fits"], n_stars,
                                           bucket_dir / f".scratch.{os.getpid()}.fits")
    first_meta, resolved = None, calibration
    n_done = 0
    try:
        for bucket in buckets:
            if bucket["n_obs"] == 0:
                continue
            with stages("combine"):
                df = read_bucket(bucket_dir / bucket["file"])
                if source.kind == "parts":
                    known = df["obsid"].to_numpy() >= 0
                    if df.loc[known, "obsid"].duplicated().any():
                        raise RuntimeError(f"duplicated obsids in {bucket['file']}")
                stars = combine_repeats(df)
                del df
            with stages("gaia"):
                stars["source_id"] = (index.match(stars["ra"], stars["dec"], radius_arcsec)
                                      if index is not None else NO_SOURCE_ID)
            with stages("kinematics"):
                stars = add_kinematics(stars, inputs=inputs) if inputs is not None else \
                    add_kinematics(stars)
            with stages("table1"):
                table = to_table(stars, kind="catalog", meta=header, str_width=width)
                del stars
                if first_meta is None:
                    out = _calibration.apply(table, calibration)
                    if "calibration" in out.meta and calibration is not False:
                        resolved = (calibration if isinstance(calibration, _calibration.Calibration)
                                    else _calibration.Calibration.read(
                                        out.meta["calibration"]["file"]))
                    else:
                        resolved = False
                    first_meta = out.meta
                else:
                    out = _calibration.apply(table, resolved)
                    out.meta = first_meta
                for w in writers.values():
                    w.write(out)
                n_done += len(out)
                del table, out
        if first_meta is None:   # no observations at all: the empty table of the in-memory path
            table = _build_catalog_memory(_empty_frame(0), None, None, radius_arcsec, ctx,
                                          calibration)
            for w in writers.values():
                w.write(table)
        for w in writers.values():
            w.close()
        if n_done != n_stars:
            raise RuntimeError(f"wrote {n_done} stars, the buckets hold {n_stars}")
    except BaseException:
        for w in writers.values():
            try:
                w.close()
            except Exception:
                pass
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        for old in bucket_dir.glob(f".scratch.{os.getpid()}.fits"):
            old.unlink(missing_ok=True)
        raise
    for kind, target in targets.items():
        os.replace(tmps[kind], target)
        log.info("wrote %s (%d rows, streamed from %d buckets)", target, n_stars, len(buckets))
    return CatalogStream(
        n_observations=manifest["n_obs"], n_stars=n_stars, n_buckets=len(buckets),
        fits_path=targets.get("fits"), parquet_path=targets.get("parquet"),
        bucket_dir=bucket_dir, buckets_resumed=manifest["resumed"],
        stage_seconds=stages.seconds, stage_cpu_seconds=stages.cpu,
        stage_peak_rss_mb=stages.peak, reference_mb=reference_mb if track_memory else float("nan"),
        reference_nbytes=reference_nbytes)


def build_catalog(obs, gaia=None, distances=None, fits_path=None,
                  parquet_path=None, radius_arcsec: float = 1.0, ctx=None, calibration=False, *,
                  stream: bool | None = None, bucket_dir=None, bucket_rows: int = BUCKET_ROWS,
                  track_memory: bool = False):
    """Per-star catalogue (paper Table 1) from the per-observation table; written as FITS and Parquet.

    Two paths give the same rows in the same order (sorted by ``designation``) with the same
    values: in memory (the default for a DataFrame or Table) and streaming (``stream=True``, the
    default when ``obs`` is a path), whose memory is bounded by ``bucket_rows`` instead of the
    survey size.

    Parameters
    ----------
    obs : DataFrame, Table, or path
        Per-observation table (:func:`assemble_observations`): in memory, or the path of its
        Parquet file, or the folder of labelling parts (:func:`run_inference`; read as
        :func:`assemble_observations` reads it).
    gaia, distances : Table, DataFrame or path, optional
        Gaia DR2 sources and Bailer-Jones distances; default ``raw_dir()/gaia/gaia_source.fits``
        and ``raw_dir()/gaia/distances.fits`` when they exist.
    fits_path, parquet_path : path, optional
        Default ``processed/catalog.fits`` and ``processed/catalog.parquet``; ``False`` skips.
        Both are written to a temporary name and renamed into place.
    ctx : LabelContext, optional
        Where the header's OOD thresholds and labels without CV skill come from (default: the
        calibration files beside the models in ``processed/``, :func:`trust_header`).
    calibration : bool, Calibration or path
        The dwarfs' temperature calibration (:func:`lamostcannon.calibration.apply`), adding
        ``<x>_cal`` and ``e_<x>_cal``: ``True`` applies ``processed/calibration_dwarf.json`` when
        it was fitted on the current dwarf model; ``False`` (default) writes the raw catalogue.
    stream : bool, optional
        ``False``: every per-star stage on the whole table in memory (~5 kB per observation at
        the peak; fastest for the notebooks' sizes). ``True``: the streaming path below.
        ``None`` (default): streaming when ``obs`` is a path, in memory for a DataFrame or Table.
    bucket_dir : path, optional
        Streaming: where the observations are partitioned by star (default
        ``interim/catalog_buckets``; :func:`partition_observations`).
    bucket_rows : int
        Streaming: observations per bucket (on average; default :data:`BUCKET_ROWS`).
    track_memory : bool
        Streaming: measure the peak resident memory of each stage (resets this process's
        ``VmHWM`` counter; Linux).

    Returns
    -------
    astropy Table (in memory), or :class:`CatalogStream` (streaming: counts, paths, seconds per
    stage; ``.read()`` loads the table)

    Notes
    -----
    Streaming: (1) the observations are partitioned into buckets by ``designation``
    (:func:`partition_observations`: every visit of a star in one bucket; bucket boundaries are
    designations, so the buckets in order are in designation order; resumed when the same input
    file was partitioned before); (2) bucket by bucket, :func:`combine_repeats`, the Gaia match
    (:class:`GaiaIndex`, built once), :func:`add_kinematics` (:class:`KinematicsInputs`, built
    once), the Table 1 columns (:func:`to_table`) and the calibration, appended to the Parquet
    file (one row group per bucket) and to the FITS binary table (header written for the known
    number of stars). Each star's values depend on that star's observations only, so the rows
    equal those of the in-memory path. Memory: one bucket (``bucket_rows`` observations and
    their stars), plus the Gaia index and distances (~100 bytes per Gaia source), plus one
    input batch while partitioning. A killed run leaves the previous catalogue files (or none)
    and temporary files that the next run removes.
    """
    if stream is None:
        stream = isinstance(obs, (str, Path))
    gaia_dir = paths.raw_dir() / "gaia"
    if gaia is None and (gaia_dir / "gaia_source.fits").exists():
        gaia = gaia_dir / "gaia_source.fits"
    if distances is None and (gaia_dir / "distances.fits").exists():
        distances = gaia_dir / "distances.fits"
    if stream:
        return _build_catalog_stream(obs, gaia, distances, fits_path, parquet_path,
                                     radius_arcsec, ctx, calibration, bucket_dir, bucket_rows,
                                     track_memory)
    if isinstance(gaia, (str, Path)):
        gaia = _as_frame(gaia, ["source_id", "ra", "dec", "pmra", "pmdec", "phot_g_mean_mag"])
    if isinstance(obs, (str, Path)):
        obs = _ObservationSource(obs)
        obs = pd.concat(list(obs.batches()), ignore_index=True) if obs.n_rows else _empty_frame(0)
    elif not isinstance(obs, pd.DataFrame):
        obs = obs.to_pandas()
    table = _build_catalog_memory(obs, gaia, distances, radius_arcsec, ctx, calibration)
    if fits_path is not False:
        write_table(table, fits_path or paths.processed_dir() / "catalog.fits")
    if parquet_path is not False:
        write_table(table, parquet_path or paths.processed_dir() / "catalog.parquet")
    return table


def _build_catalog_memory(obs: pd.DataFrame, gaia, distances, radius_arcsec, ctx, calibration):
    """The in-memory per-star stages of :func:`build_catalog`: the whole Table 1."""
    stars = combine_repeats(obs)
    stars["source_id"] = (match_gaia(stars["ra"], stars["dec"], gaia, radius_arcsec)
                          if gaia is not None else NO_SOURCE_ID)
    stars = add_kinematics(stars, gaia, distances)
    return _calibration.apply(to_table(stars, kind="catalog", meta=trust_header(ctx)),
                              calibration)


def run(store_path=None, *, ctx=None, n_workers=None, client=None, scheduler_address=None,
        chunk_size: int = 2048, overwrite: bool = False, progress: bool = True):
    """The whole step of notebook 05: label the store, assemble, combine repeats, write products.

    Returns ``(report, observations, catalogue)`` (an :class:`InferenceReport` and two Tables).
    """
    store_path = store_path or paths.interim_dir() / "survey_spectra.zarr"
    report = run_inference(store_path, ctx, chunk_size=chunk_size, n_workers=n_workers,
                           client=client, scheduler_address=scheduler_address,
                           overwrite=overwrite, progress=progress)
    observations = assemble_observations(report.parts_dir, report.n_chunks)
    catalogue = build_catalog(observations.to_pandas())
    return report, observations, catalogue


# --------------------------------------------------------------------------------------------
# Checks and examples for notebook 05
# --------------------------------------------------------------------------------------------

def completeness(observations, store_path) -> dict:
    """Compare the per-observation table with the store: every stored observation exactly once?

    Returns ``{"n_store", "n_rows", "n_missing", "n_duplicated", "n_unknown"}`` (``n_unknown``:
    rows whose obsid is not in the store).
    """
    obs = observations if isinstance(observations, pd.DataFrame) else observations.to_pandas()
    stored = StoreReader(store_path).metadata()["obsid"].to_numpy(np.int64)
    got = obs["obsid"].to_numpy(np.int64)
    return {"n_store": int(stored.size), "n_rows": int(got.size),
            "n_missing": int(np.setdiff1d(stored, got).size),
            "n_duplicated": int(got.size - np.unique(got).size),
            "n_unknown": int(np.setdiff1d(got, stored).size)}


def best_fit_spectra(observations, store_path, ctx: LabelContext, path=None, *,
                     chunk_size: int = 2048):
    """Data and best-fit model spectra of observations (paper Fig 8); optionally as a file.

    Parameters
    ----------
    observations : DataFrame
        Rows of the per-observation table (``row``, ``giantmodel`` and the labels).
    store_path : path
    ctx : LabelContext
    path : path, optional
        Write the model-spectra FITS file of :class:`lamostcannon.labelling.ModelSpectraWriter`
        (one row per observation: ``FLUX``, ``IVAR``, ``MODEL``, ``WAVELENGTH`` and a ``STARS``
        table with obsid, designation, model, labels and ``quality_flag``), in chunks of
        ``chunk_size`` observations (bounded memory), and return its path instead of arrays.

    Returns
    -------
    flux, ivar, model_flux : arrays (n, P); or the written path
    """
    from .labelling import ModelSpectraWriter, predict_rows

    obs = observations.reset_index(drop=True).copy()
    obs["model"] = np.where(obs["giantmodel"].to_numpy(bool), "giant", "dwarf")
    reader = StoreReader(store_path)
    if path is None:
        flux, ivar = reader.store.read(obs["row"].to_numpy(np.int64))
        return flux, ivar, predict_rows(ctx.models, obs).astype(float)
    writer = ModelSpectraWriter(path, ctx.models["dwarf"].wavelength)
    keep = [c for c in ("obsid", "designation", "model", *ALL_LABELS, "snr", "quality_flag",
                        "ood_score", "chi2_per_pixel") if c in obs.columns]
    try:
        for a in range(0, len(obs), chunk_size):
            part = obs.iloc[a:a + chunk_size].reset_index(drop=True)
            flux, ivar = reader.store.read(part["row"].to_numpy(np.int64))
            writer.add(part[keep], flux, ivar, predict_rows(ctx.models, part))
        return writer.close({"source": "lamostcannon catalogue"})
    except BaseException:
        writer.abort()
        raise


def truth_residuals(stars, truth, label_names=("teff", "logg", "fe_h"), key: str = "designation",
                    good=None) -> pd.DataFrame:
    """Inferred minus true labels, for checks against the mock universe's truth table.

    Parameters
    ----------
    stars : Table or DataFrame
        The per-star catalogue (``build_catalog``), with ``key`` and the label columns.
    truth : Table or DataFrame
        ``truth/truth.fits`` of the mock (never read by the pipeline itself).
    label_names : sequence of str
        Labels to compare; labels missing from either table are skipped.
    key : str
        Column joining the two tables (LAMOST ``designation`` by default).
    good : callable, optional
        ``good(joined) -> bool array`` selecting the rows to summarise; by default
        ``quality_flag == 0`` (older tables: ``flag == 0`` and not ``kiel_extrap``).

    Returns
    -------
    DataFrame indexed by label with ``n``, ``bias`` (mean of inferred - true) and ``scatter``
    (standard deviation), in the label's units.
    """
    names = [n for n in label_names]
    joined = _as_frame(stars).merge(_as_frame(truth, [key, *names]), on=key, suffixes=("", "_true"))
    if good is None:
        if "quality_flag" in joined:
            sel = joined["quality_flag"].to_numpy() == 0
        else:
            sel = (joined["flag"].to_numpy() == 0) & ~joined["kiel_extrap"].to_numpy(bool)
    else:
        sel = np.asarray(good(joined), bool)
    rows = {}
    for n in names:
        if n not in joined or f"{n}_true" not in joined:
            continue
        d = (joined[n] - joined[f"{n}_true"]).to_numpy(float)[sel]
        d = d[np.isfinite(d)]
        rows[n] = {"n": d.size, "bias": d.mean() if d.size else np.nan,
                   "scatter": d.std() if d.size else np.nan}
    return pd.DataFrame.from_dict(rows, orient="index")


def observation_pairs(obs, label_names=("teff", "logg", "fe_h"), *, recommended_only=True):
    """Pairs of observations of the same star (``designation``) made with the same model.

    The repeat pairs of the survey check the random part of the calibrated errors (a pair's
    difference has spread ``sqrt(e_random,1^2 + e_random,2^2)``; the floor cancels).

    Parameters
    ----------
    obs : DataFrame
        Per-observation table.
    label_names : sequence of str
    recommended_only : bool
        Use only observations with ``quality_flag == 0``.

    Returns
    -------
    DataFrame, one row per pair: ``designation``, ``i``, ``j`` (row positions), ``snr1``,
    ``snr2`` and per label ``delta_<l>``, ``e1_<l>``, ``e2_<l>`` (formal) and ``r1_<l>``,
    ``r2_<l>`` (calibrated random errors).
    """
    import itertools

    df = obs.reset_index(drop=True)
    use = np.ones(len(df), bool)
    if recommended_only and "quality_flag" in df:
        use &= df["quality_flag"].to_numpy() == 0
    idx = np.flatnonzero(use)
    sub = df.iloc[idx]
    rows = []
    for (des, giant), members in sub.groupby(["designation", "giantmodel"]).indices.items():
        if len(members) < 2:
            continue
        rows += [(des, idx[a], idx[b]) for a, b in itertools.combinations(sorted(members), 2)]
    out = pd.DataFrame(rows, columns=["designation", "i", "j"])
    i, j = out["i"].to_numpy(np.int64), out["j"].to_numpy(np.int64)
    snr = df["snr"].to_numpy(float)
    out["snr1"], out["snr2"] = snr[i], snr[j]
    for n in label_names:
        v = df[n].to_numpy(float)
        out[f"delta_{n}"] = v[i] - v[j]
        for pre, col in (("e", f"e_{n}_formal"), ("r", f"e_{n}_random")):
            e = df[col].to_numpy(float)
            out[f"{pre}1_{n}"], out[f"{pre}2_{n}"] = e[i], e[j]
    return out
