"""The spectra store: continuum-normalised spectra of millions of observations on disk.

Format (a folder, conventionally ``<name>.zarr``)
-------------------------------------------------
::

    <store>/
      zarr.json            Zarr 3 group; attributes: format, format_version, grid constants,
                           continuum (the definition its rows were normalised with)
      flux/                Zarr 3 array (N, 3909) float32, chunks (chunk_rows, 3909),
                           Blosc LZ4 + byte shuffle (~24 kB per spectrum and array pair)
      ivar/                Zarr 3 array (N, 3909) float32, same chunks
      wavelength/          Zarr 3 array (3909,) float64: the common rest-frame grid (Angstrom)
      meta/part-*.parquet  the metadata table, row-aligned with flux/ivar, in committed parts
      meta/patch-*.parquet replaced metadata rows (column ``row`` + the metadata columns),
                           applied over the parts in commit order; folded in by compact()
      COMMIT.json          {"n_rows": N, "parts": [[file, first_row, n_rows], ...],
                            "patches": [file, ...], "revision": R, "pending": null | {...}}
      ingest_report.csv    the last :func:`ingest` run: one line per input file and its fate
      .lock                the write lock (an OS file lock, see below); holds the pid of the
                           last writer, for messages only

Row ``i`` of ``flux``/``ivar`` is row ``i`` of the metadata table (columns :data:`META_COLUMNS`;
``obsid`` is the key, unique when ingested with ``deduplicate=True``).

Changed source files (format version 2)
---------------------------------------
Each row records the size and modification time (ns) of the file it was read from
(``source_size``, ``source_mtime_ns``, taken just before the file was read). :func:`ingest`
with ``skip_existing=True`` skips a file only when its path *and* both numbers match its row;
a file that changed since (a mock regenerated under the same names, a re-downloaded file) is
read again and its row is **replaced in place** (:meth:`SpectraStore.replace`): the store never
serves the old spectrum for it, never holds two rows for it, and keeps every other row. When
the changed file no longer gives a spectrum (unreadable now, or its obsid is stored from another
file), its row is *retired*: flux 1, ivar 0, ``n_good`` 0, ``obsid`` -1 and no fingerprint
(so the file is tried again by the next ingest, which puts its spectrum back into that row).
A stored file that cannot be found any more has not changed: its row is kept as it is.
Each replacement increments ``revision`` (:attr:`SpectraStore.revision`), which results derived
from the rows (the catalogue's resumable labelling) compare to notice a changed store.

Stores written by format version 1 (no fingerprints) are read as they are (the two columns read
-1) and upgraded to version 2 when opened for writing; their rows have an unknown fingerprint, so
the next ingest of their files reads each once more and replaces its row (the cost of one
rebuild, done in place; rows whose files are not in that ingest stay as they are).

Crash safety (``kill -9`` at any moment)
----------------------------------------
``COMMIT.json`` is the single source of truth and is only ever replaced atomically
(write to a temporary file, then :func:`os.replace`). An append writes the data rows first
(Zarr writes each chunk file atomically too), then the metadata part (temp file + rename), and
only then the new ``COMMIT.json``. Opening a store for writing truncates ``flux``/``ivar`` to
the committed length and deletes metadata parts that no commit names, so an interrupted append
leaves no trace and is redone by the next :func:`ingest` (files already stored are skipped).
Readers see exactly the committed rows.

A replacement of existing rows first stages the new rows beyond the committed length and writes
their metadata patch, then commits its intent (``pending`` in ``COMMIT.json``), copies the
staged rows onto their places and commits again (patch named, ``pending`` cleared). Opening for
writing finishes a pending replacement from the staged rows (the copy is idempotent) before
truncating, so a replacement killed at any moment ends either not done or fully done. A reader
that runs during the copy may see some replaced rows' new data with their old metadata. (The files are not fsync'ed: this protects against a
killed process, not against a power cut on a filesystem that reorders writes.)

One writer at a time
--------------------
Opening for writing takes an exclusive, non-blocking OS lock on ``<store>/.lock``
(:func:`fcntl.flock` on POSIX, :func:`msvcrt.locking` on Windows) on a file descriptor held until
:meth:`SpectraStore.close`; a second writer gets :class:`StoreBusy` at once. The kernel
arbitrates simultaneous openers, and releases the lock when the holder exits or is killed, so
there is no stale lock to clean up (the file itself stays; it is never deleted, which would let
two writers lock two different files). Readers take no lock. The descriptor is not inherited by
spawned processes; a *forked* child shares it (and so keeps the lock while it lives).
:meth:`SpectraStore.create` builds a new store in a locked temporary sibling folder and renames
it into place, so two processes creating one store at once end with one store, one of them
writing and the other told so in one line.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from os import PathLike
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from . import __version__
from .parallel import ordered_map
from .spectra import (CONTINUUM_METHOD, LOG10_WAVE_START, LOG10_WAVE_STEP, MIN_GOOD_PIXELS,
                      N_PIXELS,
                      _init_worker, _one_blas_thread, _process_files, _process_payload,
                      common_wavelength, find_spectra, printable_path, unencodable_name)

log = logging.getLogger(__name__)

__all__ = ["SpectraStore", "StoreBusy", "StoreDamaged", "ingest", "META_COLUMNS", "REPORT_COLUMNS",
           "FORMAT", "FORMAT_VERSION", "source_fingerprints"]

FORMAT = "lamostcannon.SpectraStore"
FORMAT_VERSION = 2
#: Format versions this code reads (version 1: no source fingerprints; upgraded on writing).
READABLE_VERSIONS = (1, 2)
_COMMIT = "COMMIT.json"
_LOCK = ".lock"
REPORT_NAME = "ingest_report.csv"

#: Metadata columns and their dtypes (the :class:`~lamostcannon.spectra.LamostSpectrum` meta,
#: plus ``source``: the absolute path ingested, ``n_good``: valid pixels on the grid (0 for a
#: retired row), ``source_size`` (bytes) and ``source_mtime_ns`` (ns since the epoch): the
#: source file's fingerprint when it was read (-1: unknown, e.g. a version-1 store's row).
META_COLUMNS = {
    "obsid": "int64", "designation": "str", "ra": "float64", "dec": "float64", "z": "float64",
    "z_err": "float64", "snru": "float64", "snrg": "float64", "snrr": "float64",
    "snri": "float64", "snrz": "float64", "class": "str", "subclass": "str", "mjd": "int64",
    "data_release": "str", "layout": "str", "filename": "str", "source": "str", "n_good": "int32",
    "source_size": "int64", "source_mtime_ns": "int64",
}
_DEFAULTS = {"int64": -1, "int32": -1, "float64": np.nan, "str": ""}
#: Columns of the ingest report. ``status``: stored, failed, duplicate (obsid already stored),
#: already_stored (the same source path, size and modification time are in the store: skipped
#: on resume). A file that changed since it was stored is ``stored`` again into its old row,
#: with ``reason`` "replaced ..." (or failed/duplicate, with its old row retired).
REPORT_COLUMNS = ("source", "status", "reason", "obsid", "row")


def _meta_frame(records) -> pd.DataFrame:
    df = pd.DataFrame.from_records(list(records), columns=list(META_COLUMNS))
    for col, dtype in META_COLUMNS.items():  # records without a key (a retired row's)
        if dtype != "float64" and df[col].isna().any():
            df[col] = df[col].astype(object).where(df[col].notna(), _DEFAULTS[dtype])
    return df.astype(META_COLUMNS)


def _with_defaults(df: pd.DataFrame, columns) -> pd.DataFrame:
    """``df[columns]`` with the dtypes of :data:`META_COLUMNS`; a missing column (a part
    written by format version 1) gets its default (-1, NaN or "")."""
    for col in columns:
        if col not in df:
            df[col] = _DEFAULTS[META_COLUMNS[col]]
    return df[list(columns)].astype({c: META_COLUMNS[c] for c in columns})


def _read_part(path: Path, columns: list) -> pd.DataFrame:
    """The columns of one metadata file that it has (a version-1 part lacks the fingerprint)."""
    import pyarrow.parquet as pq

    try:
        have = set(pq.read_schema(path).names)
        return pd.read_parquet(path, columns=[c for c in columns if c in have])
    except (OSError, ValueError) as exc:  # missing or cut short (pyarrow's errors are these)
        raise StoreDamaged(f"metadata part {path} is unreadable ({type(exc).__name__}: "
                           f"{exc}); the store is damaged") from None


def source_fingerprints(sources: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Size (bytes) and modification time (ns) of each file; -1 and -1 where ``stat`` fails.

    The fingerprint the store keeps per row (``source_size``, ``source_mtime_ns``) to notice a
    file rewritten under the same name. ~2 us per file on a local disk.

    Returns
    -------
    size, mtime_ns : ndarray (N,) int64
    """
    size = np.full(len(sources), -1, np.int64)
    mtime = np.full(len(sources), -1, np.int64)
    for k, src in enumerate(sources):
        try:
            st = os.stat(src)
        except (OSError, ValueError):
            continue
        size[k], mtime[k] = st.st_size, st.st_mtime_ns
    return size, mtime


def _codec():
    """Blosc LZ4 with byte shuffling: ~25% smaller than raw float32.

    Per spectrum (flux and ivar, 256-row chunks, one core, measured by hand): 0.016 ms to
    compress and 0.005 ms to decompress, 23.6 kB; bit shuffling (the codec of stores written before 2026-11-30, still
    read) took 0.027 and 0.011 ms for 23.1 kB.
    """
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class StoreBusy(RuntimeError):
    """The store is open for writing by another process (or another writer in this one)."""


class StoreDamaged(ValueError):
    """A store file was damaged outside this code (its commit, a metadata part, an array's
    description or a chunk cannot be read): writes are atomic, so no interrupted run does this."""


def _os_lock(fd: int) -> None:
    """Take an exclusive, non-blocking lock on ``fd``; raise :class:`BlockingIOError` if held."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            raise BlockingIOError(str(exc)) from None
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _os_unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _acquire_lock(store: Path) -> int:
    """Lock ``store/.lock`` for writing; return the descriptor that holds the lock.

    Raises
    ------
    StoreBusy
        Another process (or another open writer) holds it; the message names its pid when known.
    """
    lock = store / _LOCK
    # not inheritable (PEP 446); never through a planted symbolic link
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        _os_lock(fd)
    except OSError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:  # pragma: no cover
            holder = ""
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise StoreBusy(f"{store} is open for writing by another process{who}; wait for it to "
                        "finish (or stop it) and try again") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release_lock(fd: int) -> None:
    try:
        _os_unlock(fd)
    finally:
        os.close(fd)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _build_empty(path: Path, chunk_rows: int) -> None:
    """Write an empty store into the (existing, empty but for .lock) folder ``path``."""
    import zarr

    group = zarr.open_group(path, mode="a", attributes={
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "log10_wave_start": LOG10_WAVE_START, "log10_wave_step": LOG10_WAVE_STEP,
        "n_pixels": N_PIXELS, "continuum": CONTINUUM_METHOD,
        "created_by": f"lamostcannon {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "description": "LAMOST continuum-normalised spectra on the common rest-frame grid; "
                       "flux = 1, ivar = 0 where there is no data"})
    for name in ("flux", "ivar"):
        group.create_array(name, shape=(0, N_PIXELS), chunks=(chunk_rows, N_PIXELS),
                           dtype="float32", compressors=[_codec()],
                           fill_value=0.0 if name == "ivar" else 1.0,
                           dimension_names=("observation", "pixel"))
    wave = group.create_array("wavelength", shape=(N_PIXELS,), dtype="float64",
                              dimension_names=("pixel",), attributes={"unit": "Angstrom"})
    wave[:] = common_wavelength()
    (path / "meta").mkdir()
    _write_atomic(path / _COMMIT, lambda p: p.write_text(json.dumps(
        {"n_rows": 0, "parts": []})))


def _remove_abandoned_builds(path: Path) -> None:
    """Delete temporary folders of creations/replacements of ``path`` whose process died.

    ``.<name>.creating-*`` folders are locked by their creator for their whole life (they get
    that name only once locked), so a free lock means an abandoned build; ``.<name>.new-*``
    (a creator killed between two system calls) and ``.<name>.replaced-*`` are removed once an
    hour old.
    """
    import shutil

    for tmp in path.parent.glob(f".{path.name}.creating-*"):
        try:
            fd = os.open(tmp / _LOCK, os.O_RDWR)
        except OSError:
            continue
        try:
            _os_lock(fd)
        except OSError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            _release_lock(fd)
    for pattern in (f".{path.name}.new-*", f".{path.name}.replaced-*"):
        for old in path.parent.glob(pattern):
            try:
                if time.time() - old.stat().st_mtime > 3600:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                continue


class SpectraStore:
    """An on-disk, appendable, crash-safe store of continuum-normalised spectra.

    See the module docstring for the format. Open an existing store with
    ``SpectraStore(path)`` (read-only) or ``SpectraStore(path, mode="a")`` (append); create one
    with :meth:`create` or ``SpectraStore.open(path, "a", create=True)``.

    Parameters
    ----------
    path : str or path-like
        The store folder.
    mode : {"r", "a"}
        ``"r"``: read the committed rows, change nothing. ``"a"``: also append; takes the write
        lock and rolls back any uncommitted (interrupted) append.

    Attributes
    ----------
    path : Path
    mode : str
    chunk_rows : int
        Observations per Zarr chunk.
    wavelength : ndarray, shape (3909,)
        The common rest-frame vacuum grid (Angstrom).
    """

    def __init__(self, path: str | PathLike, mode: str = "r", *, _lock_fd: int | None = None):
        import zarr

        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        if not (self.path / _COMMIT).is_file():
            raise FileNotFoundError(f"{self.path} is not a SpectraStore (no {_COMMIT}); create "
                                    "one with SpectraStore.create or ingest")
        self._lock_fd = _lock_fd
        if mode == "a" and _lock_fd is None:
            self._lock_fd = _acquire_lock(self.path)
        try:
            self._group = zarr.open_group(self.path, mode="r+" if mode == "a" else "r")
            attrs = dict(self._group.attrs)
            if (attrs.get("format") != FORMAT
                    or attrs.get("format_version") not in READABLE_VERSIONS):
                raise ValueError(f"{self.path}: not a {FORMAT} store of version "
                                 f"{' or '.join(map(str, READABLE_VERSIONS))} "
                                 f"(attributes {attrs})")
            self.format_version = int(attrs["format_version"])
            try:
                self.flux = self._group["flux"]
                self.ivar = self._group["ivar"]
            except KeyError as exc:
                raise StoreDamaged(f"{self.path}: the {exc} array cannot be opened; the store "
                                   "is damaged") from None
            if mode == "a":
                # zarr would compare every chunk it writes with the fill value, to skip writing
                # chunks that hold nothing else: spectra never do, and the comparison cost 15%
                # of an append's CPU (0.086 -> 0.073 ms per spectrum, paired, by hand;
                # bench_ingest.py's store_append_ms measures appends against a baseline). A
                # chunk of fill values written anyway reads back the same.
                self.flux = self.flux.with_config({"write_empty_chunks": True})
                self.ivar = self.ivar.with_config({"write_empty_chunks": True})
            self.chunk_rows = int(self.flux.chunks[0])
            self._read_commit()
            if mode == "a":
                self._recover()
                if self.format_version < FORMAT_VERSION:
                    # rows keep their data; their fingerprints read -1 (unknown), so the next
                    # ingest of their files reads them again and replaces the rows
                    log.warning("%s: upgrading a version-%d store to version %d (no source "
                                "fingerprints: the next ingest re-reads its files once)",
                                self.path, self.format_version, FORMAT_VERSION)
                    self._group.attrs["format_version"] = FORMAT_VERSION
                    self.format_version = FORMAT_VERSION
                stored = attrs.get("continuum", "evaluated at every pixel (a store older than "
                                                "the attribute)")
                if stored != CONTINUUM_METHOD:
                    # the two agree to ~1e-4 of the noise in the median pixel (spectra module,
                    # step 4): said, not refused, so that an old survey store can be extended
                    log.warning("%s: its rows were normalised with the continuum '%s'; rows "
                                "appended now use '%s'", self.path, stored, CONTINUUM_METHOD)
        except BaseException:
            self.close()
            raise
        self._meta_cache: pd.DataFrame | None = None

    # -- creation and opening -------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | PathLike, *, chunk_rows: int = 256,
               overwrite: bool = False) -> "SpectraStore":
        """Create an empty store and open it for appending.

        The store is built in a locked temporary sibling folder and renamed into place, so a
        store path never holds a half-created store, and of two processes creating one path at
        once exactly one succeeds (the other gets :class:`FileExistsError`).

        Parameters
        ----------
        path : str or path-like
            A folder that must not exist yet or be empty (unless ``overwrite``).
        chunk_rows : int
            Observations per chunk (256 rows = 4 MB of float32 per array and chunk).
        overwrite : bool
            Replace an existing store at ``path`` (after taking its write lock).

        Raises
        ------
        FileExistsError
            ``path`` exists (and is not an empty folder), without ``overwrite``; or it is not a
            store; or another process created it meanwhile.
        StoreBusy
            ``overwrite`` of a store that another process has open for writing.
        """
        import shutil

        path = Path(path)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        replace = False
        if path.exists() and not _is_empty_dir(path):
            if not (path / _COMMIT).is_file():
                raise FileExistsError(f"{path} exists and is not a SpectraStore (no {_COMMIT}); "
                                      "choose a new path or remove it")
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
            replace = True
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_builds(path)
        # locked before it gets the name that _remove_abandoned_builds looks for
        token = uuid.uuid4().hex[:12]
        tmp, new = (path.with_name(f".{path.name}.{kind}-{token}") for kind in ("creating", "new"))
        new.mkdir()
        fd = None
        try:
            fd = _acquire_lock(new)
            os.rename(new, tmp)
            _build_empty(tmp, chunk_rows)
            if replace:
                old_fd = _acquire_lock(path)
                trash = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:12]}")
                try:
                    os.rename(path, trash)
                    os.rename(tmp, path)
                finally:
                    _release_lock(old_fd)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                try:
                    os.rename(tmp, path)  # atomic; replaces an empty folder, nothing else
                except OSError as exc:
                    raise FileExistsError(f"{path} was created by another process meanwhile "
                                          f"({exc.strerror})") from None
        except BaseException:
            if fd is not None:
                _release_lock(fd)
            for folder in (new, tmp):
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(path, mode="a", _lock_fd=fd)

    @classmethod
    def open(cls, path: str | PathLike, mode: str = "r", *, create: bool = False,
             chunk_rows: int = 256) -> "SpectraStore":
        """Open ``path``; with ``create=True`` (mode ``"a"``) create it when it does not exist.

        Two processes that create one new store at once: one creates it, the other opens it
        (and gets :class:`StoreBusy` while the first is writing).
        """
        path = Path(path)
        if create and mode == "a" and not (path / _COMMIT).is_file():
            try:
                return cls.create(path, chunk_rows=chunk_rows, overwrite=False)
            except FileExistsError:
                if not (path / _COMMIT).is_file():
                    raise
        return cls(path, mode=mode)

    def close(self) -> None:
        """Release the write lock (mode ``"a"``). The store stays readable."""
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            self._lock_fd = None
            _release_lock(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"SpectraStore({str(self.path)!r}, mode={self.mode!r}, rows={len(self)})"

    # -- commit bookkeeping -----------------------------------------------------------------------

    def _read_commit(self) -> None:
        try:
            commit = json.loads((self.path / _COMMIT).read_text())
            self._n = int(commit["n_rows"])
            self._parts = [tuple(p) for p in commit["parts"]]
            self._patches = list(commit.get("patches", []))
            self._revision = int(commit.get("revision", 0))
            self._pending = commit.get("pending")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # never a killed
            # run's doing (the commit is replaced atomically): the file was damaged
            raise StoreDamaged(f"{self.path}/{_COMMIT} is unreadable ({type(exc).__name__}: "
                               f"{exc}); the store is damaged") from None
        if sum(p[2] for p in self._parts) != self._n:
            raise StoreDamaged(f"{self.path}/{_COMMIT} is inconsistent: parts hold "
                             f"{sum(p[2] for p in self._parts)} rows, n_rows = {self._n}")

    def _write_commit(self, n_rows: int, parts: list, *, patches: list | None = None,
                      revision: int | None = None, pending: dict | None = None) -> None:
        patches = self._patches if patches is None else list(patches)
        revision = self._revision if revision is None else int(revision)
        payload = json.dumps({"n_rows": n_rows, "parts": [list(p) for p in parts],
                              "patches": patches, "revision": revision, "pending": pending})
        _write_atomic(self.path / _COMMIT, lambda p: p.write_text(payload))
        self._n, self._parts = n_rows, list(parts)
        self._patches, self._revision, self._pending = patches, revision, pending

    @property
    def revision(self) -> int:
        """Number of committed replacements that changed existing rows (0 for an append-only
        store; a replacement that only updates the source fingerprints does not count).

        Rows never change while this stays the same; a result derived from rows ``[0, N)``
        (with the same ``len``) is still valid if the revision it was made from is unchanged.
        """
        return self._revision

    def _recover(self) -> None:
        """Finish an interrupted replacement; roll back an interrupted append (truncate the
        arrays, drop uncommitted metadata files)."""
        if self._pending:
            log.warning("%s: finishing an interrupted replacement of %d rows", self.path,
                        len(self._pending["rows"]))
            self._apply_pending(None, None)
        for arr in (self.flux, self.ivar):
            if arr.shape[0] != self._n:
                log.warning("%s: %s holds %d rows but %d are committed; truncating (an append "
                            "was interrupted)", self.path, arr.basename, arr.shape[0], self._n)
                arr.resize((self._n, N_PIXELS))
        named = {p[0] for p in self._parts} | set(self._patches)
        for f in (self.path / "meta").iterdir():
            if f.name not in named:
                log.warning("%s: removing uncommitted metadata file %s", self.path, f.name)
                f.unlink()
        for f in self.path.glob(".*.tmp"):
            f.unlink()

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    @property
    def n_pixels(self) -> int:
        return N_PIXELS

    @property
    def wavelength(self) -> np.ndarray:
        return common_wavelength()

    @property
    def meta(self) -> pd.DataFrame:
        """The metadata table, one row per observation, in store order.

        Returns
        -------
        pandas.DataFrame
            Index 0..N-1 (= row of ``flux``/``ivar``); columns :data:`META_COLUMNS`.
        """
        if self._meta_cache is None or len(self._meta_cache) != self._n:
            self._meta_cache = self._read_meta_columns(list(META_COLUMNS))
        return self._meta_cache

    def _read_meta_columns(self, columns: list) -> pd.DataFrame:
        """The committed metadata columns: the parts, then the patches in commit order."""
        frames = [_with_defaults(_read_part(self.path / "meta" / p[0], columns), columns)
                  for p in self._parts]
        df = pd.concat(frames, ignore_index=True) if frames else _meta_frame([])[columns]
        for name in self._patches:
            patch = _read_part(self.path / "meta" / name, columns + ["row"])
            rows = patch["row"].to_numpy(np.int64)
            patch = _with_defaults(patch, columns)
            for col in columns:
                values = df[col].to_numpy(copy=True)
                values[rows] = patch[col].to_numpy()
                df[col] = values
        return df.astype({c: META_COLUMNS[c] for c in columns})

    def read_meta(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The metadata table, or only some of its columns (less memory for millions of rows).

        Parameters
        ----------
        columns : sequence of str, optional
            Columns of :data:`META_COLUMNS`; all when omitted.

        Returns
        -------
        pandas.DataFrame
            Index 0..N-1 (= row of ``flux``/``ivar``).
        """
        if columns is None:
            return self.meta
        columns = list(columns)
        unknown = set(columns) - set(META_COLUMNS)
        if unknown:
            raise KeyError(f"unknown metadata columns {sorted(unknown)}; have {list(META_COLUMNS)}")
        return self._read_meta_columns(columns)

    def rows_for(self, obsids: Sequence[int]) -> np.ndarray:
        """Row numbers of the given obsids (first occurrence); -1 for an obsid not stored."""
        obsid = self.read_meta(["obsid"])["obsid"]
        first = pd.Series(obsid.index.to_numpy(), index=obsid.to_numpy())
        first = first[~first.index.duplicated()]
        found = first.reindex(np.asarray(obsids, dtype=np.int64))
        return found.fillna(-1).to_numpy(dtype=np.int64)

    def read(self, rows: int | slice | Sequence[int] | np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """Read observations into memory.

        Parameters
        ----------
        rows : int, slice, sequence of int or bool mask, optional
            Rows to read (any order, repeats allowed); all committed rows when omitted.

        Returns
        -------
        flux, ivar : ndarray, shape (len(rows), 3909) (or (3909,) for an int), float32

        Raises
        ------
        StoreDamaged
            A chunk file cannot be decoded (cut short or overwritten).
        """
        try:
            return self._read(rows)
        except (RuntimeError, ValueError, OSError) as exc:  # zarr / blosc on a damaged chunk
            raise StoreDamaged(f"{self.path}: cannot read rows {_describe_rows(rows)} "
                               f"({type(exc).__name__}: {exc}); the store is damaged") from exc

    def _read(self, rows):
        n = self._n
        if rows is None:
            rows = slice(0, n)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return _read_slice(self.flux, start, stop), _read_slice(self.ivar, start, stop)
            rows = np.arange(start, stop, step)
        if np.isscalar(rows):
            r = int(rows)
            r = r + n if r < 0 else r
            if not 0 <= r < n:
                raise IndexError(f"row {rows} out of range for a store of {n} rows")
            return self.flux[r], self.ivar[r]
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean rows must have shape ({n},), got {rows.shape}")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"rows out of range for a store of {n} rows")
        if rows.size == 0:
            return (np.empty((0, N_PIXELS), np.float32),) * 2
        uniq, inverse = np.unique(rows, return_inverse=True)
        flux = self.flux.get_orthogonal_selection((uniq, slice(None)))
        ivar = self.ivar.get_orthogonal_selection((uniq, slice(None)))
        return flux[inverse], ivar[inverse]

    def to_dask(self):
        """Lazy Dask arrays of the committed rows.

        Returns
        -------
        flux, ivar : dask.array.Array, shape (N, 3909), float32
            Chunked like the store (``chunk_rows`` observations per block).
        """
        import dask.array as da

        # by path, so that the graph pickles to distributed workers, which open the store
        chunks = (self.chunk_rows, N_PIXELS)
        flux = da.from_zarr(str(self.path), component="flux", chunks=chunks)[: self._n]
        ivar = da.from_zarr(str(self.path), component="ivar", chunks=chunks)[: self._n]
        return flux, ivar

    def refresh(self) -> None:
        """Re-read ``COMMIT.json`` (a read-only view of a store another process appends to)."""
        if self.mode == "a":
            return
        import zarr

        self._read_commit()
        self._group = zarr.open_group(self.path, mode="r")
        self.flux, self.ivar = self._group["flux"], self._group["ivar"]

    # -- writing ----------------------------------------------------------------------------------

    def append(self, flux: np.ndarray, ivar: np.ndarray,
               meta: pd.DataFrame | Iterable[dict]) -> range:
        """Append observations and commit them atomically.

        Parameters
        ----------
        flux, ivar : array_like, shape (K, 3909)
            Continuum-normalised spectra on the common grid (stored as float32).
        meta : DataFrame or iterable of dict
            K rows with the columns of :data:`META_COLUMNS` (missing ones are filled with
            defaults: -1, NaN or "").

        Returns
        -------
        range
            The new rows.
        """
        flux, ivar, meta = self._checked_rows(flux, ivar, meta)
        k = len(flux)
        if k == 0:
            return range(self._n, self._n)
        n0 = self._n
        # 1) data rows (beyond the committed length until step 3)
        for arr, data in ((self.flux, flux), (self.ivar, ivar)):
            arr.resize((n0 + k, N_PIXELS))
            arr[n0:n0 + k] = data
        # 2) the metadata part
        name = f"part-{n0:012d}-{uuid.uuid4().hex[:8]}.parquet"
        _write_atomic(self.path / "meta" / name,
                      lambda p: meta.to_parquet(p, index=False, engine="pyarrow"))
        # 3) the commit
        self._write_commit(n0 + k, self._parts + [(name, n0, k)])
        self._meta_cache = None  # re-read lazily (concatenating here would cost O(N) per append)
        return range(n0, n0 + k)

    def _checked_rows(self, flux, ivar, meta):
        if self.mode != "a":
            raise PermissionError(f"{self.path} is open read-only; open it with mode='a'")
        flux = np.asarray(flux, dtype=np.float32)
        ivar = np.asarray(ivar, dtype=np.float32)
        if flux.ndim != 2 or flux.shape[1] != N_PIXELS or ivar.shape != flux.shape:
            raise ValueError(f"flux and ivar must have shape (K, {N_PIXELS}); got {flux.shape} "
                             f"and {ivar.shape}")
        meta = meta if isinstance(meta, pd.DataFrame) else pd.DataFrame.from_records(list(meta))
        if len(meta) != len(flux):
            raise ValueError(f"meta has {len(meta)} rows but flux has {len(flux)}")
        return flux, ivar, _with_defaults(meta.copy(), list(META_COLUMNS))

    def replace(self, rows: Sequence[int] | np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                meta: pd.DataFrame | Iterable[dict]) -> None:
        """Replace committed rows (data and metadata) and commit atomically.

        Used by :func:`ingest` for files that changed since they were stored. The new rows are
        staged beyond the committed length, the intent committed, the rows copied into place
        and the replacement committed (see the module docstring): a kill at any moment leaves
        the old rows or the new ones, and opening for writing finishes a committed intent.
        :attr:`revision` grows by one. When every row equals its stored bits but for the
        source fingerprint (``source_size``, ``source_mtime_ns``), only the metadata is
        committed and the revision stays.

        Parameters
        ----------
        rows : sequence of int (K,)
            Distinct committed rows.
        flux, ivar : array_like, shape (K, 3909)
        meta : DataFrame or iterable of dict
            K rows with the columns of :data:`META_COLUMNS` (missing ones: defaults).
        """
        flux, ivar, meta = self._checked_rows(flux, ivar, meta)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) != len(flux):
            raise ValueError(f"{len(rows)} rows for {len(flux)} spectra")
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self._n or len(np.unique(rows)) != len(rows):
            raise ValueError(f"rows must be distinct committed rows in [0, {self._n})")
        order = np.argsort(rows, kind="stable")  # chunk by chunk, in order
        rows, flux, ivar = rows[order], flux[order], ivar[order]
        meta = meta.iloc[order].reset_index(drop=True)
        # rows whose data and metadata are the same bits as stored (a file touched, or re-read
        # after a version-1 upgrade) change only their fingerprint: one metadata commit, no copy
        # and no new revision (results derived from the rows stay valid)
        old_f, old_i = self.read(rows)
        same = ((old_f.view(np.uint32) == flux.view(np.uint32)).all(axis=1)
                & (old_i.view(np.uint32) == ivar.view(np.uint32)).all(axis=1))
        if same.any():
            content = [c for c in META_COLUMNS if c not in ("source_size", "source_mtime_ns")]
            old_meta = self.read_meta(content).iloc[rows].reset_index(drop=True)
            for col in content:
                a, b = old_meta[col].to_numpy(), meta[col].to_numpy()
                same &= (a == b) | (pd.isna(a) & pd.isna(b))
        if same.all():
            name = f"patch-{self._n:012d}-{uuid.uuid4().hex[:8]}.parquet"
            patch = meta.assign(row=rows)
            _write_atomic(self.path / "meta" / name,
                          lambda p: patch.to_parquet(p, index=False, engine="pyarrow"))
            self._write_commit(self._n, self._parts, patches=self._patches + [name])
            self._meta_cache = None
            return
        n0, k = self._n, len(rows)
        # 1) stage the new rows beyond the committed length (rolled back if killed here)
        for arr, data in ((self.flux, flux), (self.ivar, ivar)):
            arr.resize((n0 + k, N_PIXELS))
            arr[n0:n0 + k] = data
        # 2) the metadata patch
        name = f"patch-{n0:012d}-{uuid.uuid4().hex[:8]}.parquet"
        patch = meta.assign(row=rows)
        _write_atomic(self.path / "meta" / name,
                      lambda p: patch.to_parquet(p, index=False, engine="pyarrow"))
        # 3) the intent: from here on the replacement will be finished, if need be on reopening
        self._write_commit(n0, self._parts, pending={"rows": rows.tolist(), "staged_at": n0,
                                                     "patch": name})
        # 4) copy into place, commit, drop the staged rows
        self._apply_pending(flux, ivar)

    def _apply_pending(self, flux, ivar) -> None:
        """Copy a committed pending replacement's rows into place and commit it (idempotent).
        ``flux``/``ivar``: the staged rows when in memory, else read back from the store."""
        pending = self._pending
        rows = np.asarray(pending["rows"], dtype=np.int64)
        at = int(pending["staged_at"])
        for arr, data in ((self.flux, flux), (self.ivar, ivar)):
            if data is None:
                data = arr[at:at + len(rows)]
            arr.set_orthogonal_selection((rows, slice(None)), data)
        self._write_commit(self._n, self._parts, patches=self._patches + [pending["patch"]],
                           revision=self._revision + 1, pending=None)
        for arr in (self.flux, self.ivar):
            arr.resize((self._n, N_PIXELS))
        self._meta_cache = None

    def compact(self) -> None:
        """Merge the metadata parts and patches into one file (atomically; safe to interrupt).

        Streamed part by part (memory of one part plus the patches)."""
        if self.mode != "a":
            raise PermissionError(f"{self.path} is open read-only; open it with mode='a'")
        import pyarrow as pa
        import pyarrow.parquet as pq

        if len(self._parts) <= 1 and not self._patches:
            return
        old = [p[0] for p in self._parts] + list(self._patches)
        columns = list(META_COLUMNS)
        patches = [_read_part(self.path / "meta" / n, columns + ["row"]) for n in self._patches]
        patch = None
        if patches:
            patch = pd.concat(patches, ignore_index=True)
            rows = patch["row"].to_numpy(np.int64)
            patch = _with_defaults(patch, columns).assign(row=rows)
            patch = patch.drop_duplicates("row", keep="last").set_index("row")
        name = f"part-{0:012d}-{uuid.uuid4().hex[:8]}.parquet"

        def write(tmp):
            writer = None
            try:
                for part, first, n in self._parts:
                    df = _with_defaults(_read_part(self.path / "meta" / part, columns), columns)
                    if patch is not None:
                        mine = patch.index[(patch.index >= first) & (patch.index < first + n)]
                        if len(mine):
                            local = mine.to_numpy() - first
                            for col in columns:
                                values = df[col].to_numpy(copy=True)
                                values[local] = patch.loc[mine, col].to_numpy()
                                df[col] = values
                            df = df.astype(META_COLUMNS)
                    table = pa.Table.from_pandas(df, preserve_index=False)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
            finally:
                if writer is not None:
                    writer.close()

        _write_atomic(self.path / "meta" / name, write)
        self._write_commit(self._n, [(name, 0, self._n)], patches=[])
        self._meta_cache = None
        for f in old:
            (self.path / "meta" / f).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# Ingest
# ------------------------------------------------------------------------------------------------

def _direct_layout(array):
    """``(folder, chunk_rows, encode_chunk_key)`` when the rows of ``array`` can be decoded
    straight from its chunk files (what :meth:`SpectraStore.create` writes: a local Zarr 3
    array (N, P) of little-endian float32, regular chunks of whole rows, codecs bytes + Blosc);
    else None."""
    try:
        import zarr
        from zarr.codecs import BloscCodec, BytesCodec

        md = array.metadata
        store = array.store_path.store
        codecs = tuple(md.codecs)
        if not (isinstance(store, zarr.storage.LocalStore) and md.zarr_format == 3
                and np.dtype(array.dtype) == np.dtype("<f4") and np.little_endian
                and len(array.shape) == 2 and len(codecs) == 2
                and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec)
                and tuple(md.chunk_grid.chunk_shape)[1] == array.shape[1]):
            return None
        folder = Path(store.root) / array.store_path.path
        return folder, int(md.chunk_grid.chunk_shape[0]), md.chunk_key_encoding.encode_chunk_key
    except (AttributeError, ImportError, TypeError, ValueError):  # another zarr or layout
        return None


def _read_slice(array, start: int, stop: int) -> np.ndarray:
    """``array[start:stop]`` of a spectra array (N, P) float32, the same values.

    Zarr's read of a row range decodes each chunk into a buffer of its own, copies it into the
    result and runs on an asyncio thread: ~0.02 ms of CPU per spectrum for rows of 3909
    float32, of which reading the chunk files and Blosc's decompression are ~0.012. Where the
    layout allows (:func:`_direct_layout`) the chunk files are read here and decompressed
    straight into the result (partial chunks at the ends through a buffer); otherwise, and when
    a chunk file is missing (Zarr's fill value), Zarr reads them. A chunk file that does not
    decompress to a whole chunk raises ValueError or RuntimeError, as Zarr would.
    """
    layout = _direct_layout(array) if stop > start else None
    if layout is None:
        return array[start:stop]
    from numcodecs import blosc

    folder, rows_per_chunk, key = layout
    width = int(array.shape[1])
    out = np.empty((stop - start, width), np.float32)
    chunk_bytes = rows_per_chunk * width * 4
    buffer = None
    for c in range(start // rows_per_chunk, (stop - 1) // rows_per_chunk + 1):
        a, b = max(start, c * rows_per_chunk), min(stop, (c + 1) * rows_per_chunk)
        try:
            data = (folder / key((c, 0))).read_bytes()
        except FileNotFoundError:
            return array[start:stop]
        # Blosc header: bytes 4-8 hold the decompressed size (a shorter frame would leave
        # rows of the result unwritten)
        if len(data) < 16 or int.from_bytes(data[4:8], "little") != chunk_bytes:
            raise ValueError(f"chunk {c} of {folder} does not hold {rows_per_chunk} rows")
        if b - a == rows_per_chunk:
            blosc.decompress(data, out[a - start:b - start])
        else:
            if buffer is None:
                buffer = np.empty((rows_per_chunk, width), np.float32)
            blosc.decompress(data, buffer)
            out[a - start:b - start] = buffer[a - c * rows_per_chunk:b - c * rows_per_chunk]
    return out


def _describe_rows(rows) -> str:
    if rows is None or isinstance(rows, slice) or np.isscalar(rows):
        return "all" if rows is None else str(rows)
    rows = np.asarray(rows)
    return f"{rows.size} rows" + (f" from {rows.min()} to {rows.max()}" if rows.size else "")


class _ObsidIndex:
    """Set of obsids with 8 bytes per entry: a sorted array plus a small recent set."""

    def __init__(self, obsids: np.ndarray):
        self._base = np.unique(np.asarray(obsids, dtype=np.int64))
        self._recent: set[int] = set()

    def __contains__(self, obsid: int) -> bool:
        if obsid in self._recent:
            return True
        i = np.searchsorted(self._base, obsid)
        return bool(i < len(self._base) and self._base[i] == obsid)

    def add(self, obsid: int) -> None:
        self._recent.add(obsid)
        if len(self._recent) > 200_000:
            self._base = np.union1d(self._base, np.fromiter(self._recent, np.int64))
            self._recent.clear()


def ingest(files_or_folder: str | PathLike | Iterable[str | PathLike],
           store_path: str | PathLike, *, n_workers: int | None = None, chunk_size: int = 32,
           commit_rows: int = 2048, chunk_rows: int = 256, progress: bool = True,
           deduplicate: bool = True, skip_existing: bool = True, use_ormask: bool = True,
           min_good_pixels: int = MIN_GOOD_PIXELS) -> pd.DataFrame:
    """Read, preprocess and store many LAMOST files; parallel, resumable, never fatal per file.

    Each file goes through :func:`~lamostcannon.spectra.read_lamost`,
    :func:`~lamostcannon.spectra.resample` and :func:`~lamostcannon.spectra.normalise` (the same
    code as :func:`~lamostcannon.spectra.preprocess`; the continuum sums are exact integer
    arithmetic, so a stored row equals per-file processing bit for bit whatever the batch, BLAS
    or CPU: see :mod:`lamostcannon.spectra`, step 4). Worker processes handle chunks of
    ``chunk_size`` files (one running and one queued per worker); the parent appends their
    results in input order and commits every ``commit_rows`` observations, from a background
    thread so that the workers are kept busy during a commit. An
    interrupted run (Ctrl-C, ``kill -9``) loses at most the uncommitted rows, and the next run
    skips every file already stored.

    Parameters
    ----------
    files_or_folder : path or iterable of paths
        A folder (searched recursively for ``*.fits[.gz]``, sorted) or the files, in order.
    store_path : path
        The :class:`SpectraStore` (created when missing, appended to otherwise).
    n_workers : int, optional
        Worker processes; default ``config.settings().n_workers`` (``LAMOSTCANNON_WORKERS`` or
        the CPU count). 1 runs in this process. Scripts that call ``ingest`` with more than one
        worker need the ``if __name__ == "__main__":`` guard (processes are spawned).
    chunk_size : int
        Files per task sent to a worker.
    commit_rows : int
        Observations buffered between commits (best a multiple of ``chunk_rows``).
    chunk_rows : int
        Observations per Zarr chunk when the store is created.
    progress : bool
        Show a :mod:`tqdm.auto` progress bar.
    deduplicate : bool
        Store each obsid once (files without an OBSID card, obsid -1, are not deduplicated).
    skip_existing : bool
        Skip files whose absolute path is already in the store with the same size and
        modification time (resume). A file that changed since it was stored is read again and
        replaces its row (see the module docstring); files that failed in an earlier run are
        tried again. ``False``: every file is read and appended (deduplication still applies).
    use_ormask, min_good_pixels
        See :func:`~lamostcannon.spectra.resample`.

    Returns
    -------
    pandas.DataFrame
        The ingest report, one row per input file: ``source``, ``status`` (stored, failed,
        duplicate, already_stored), ``reason``, ``obsid``, ``row`` (store row or -1). Also
        written to ``<store>/ingest_report.csv``.
    """
    from tqdm.auto import tqdm

    if isinstance(files_or_folder, (str, PathLike)) and Path(files_or_folder).is_dir():
        paths = find_spectra(files_or_folder)
    elif isinstance(files_or_folder, (str, PathLike)):
        paths = [Path(files_or_folder)]
    else:
        paths = list(files_or_folder)
    # os.path.abspath, with the working directory looked up once (not once per file: a
    # getcwd system call and a Path object per file cost ~20 us, 90 s for 4.5 million files)
    cwd = os.getcwd()
    sources = [os.path.normpath(os.path.join(cwd, os.fsdecode(p))) for p in paths]
    if chunk_size < 1 or commit_rows < 1:
        raise ValueError("chunk_size and commit_rows must be >= 1")
    # a name that is not UTF-8 cannot be stored (nor reported as it is): listed as failed
    bad_name = {i: why for i, why in enumerate(map(unencodable_name, sources)) if why}
    listed = [printable_path(p) for p in sources] if bad_name else sources  # for tables
    if n_workers is None:
        from .config import settings

        n_workers = settings().n_workers
    status = np.full(len(sources), "", dtype=object)
    reason = np.full(len(sources), "", dtype=object)
    obsid_col = np.full(len(sources), -1, dtype=np.int64)
    row_col = np.full(len(sources), -1, dtype=np.int64)

    with SpectraStore.open(store_path, "a", create=True, chunk_rows=chunk_rows) as store:
        todo = np.arange(len(sources))
        # target[i]: the row that file i replaces (it changed since it was stored), else -1
        target = np.full(len(sources), -1, dtype=np.int64)
        was_retired = np.zeros(len(sources), bool)  # its row was retired by an earlier run
        stored_obsid = (store.read_meta(["obsid"])["obsid"].to_numpy() if deduplicate
                        else np.zeros(0, np.int64))
        if skip_existing and len(store) and sources:
            stored = store.read_meta(["source", "obsid", "source_size", "source_mtime_ns",
                                      "n_good"])
            first = stored.reset_index(names="row").drop_duplicates("source").set_index("source")
            index = pd.Index(listed)
            known = index.isin(first.index) & ~index.duplicated()  # first listing of a path
            known[list(bad_name)] = False
            if known.any():
                at = first.reindex(index[known])
                size, mtime = source_fingerprints([sources[i] for i in np.flatnonzero(known)])
                same = ((at["source_size"].to_numpy() == size)
                        & (at["source_mtime_ns"].to_numpy() == mtime) & (size >= 0))
                # a stored file that is gone (deleted after its ingest) has not changed: its
                # row is kept, never retired (the store may be the only copy left)
                gone = (size < 0) & (at["n_good"].to_numpy() > 0)
                reason[np.flatnonzero(known)[gone]] = ("the file cannot be found now; its "
                                                       "stored row is kept")
                same |= gone
                done = np.zeros(len(sources), bool)
                done[np.flatnonzero(known)[same]] = True
                changed = np.flatnonzero(known)[~same]
                target[changed] = at["row"].to_numpy(np.int64)[~same]
                was_retired[changed] = at["n_good"].to_numpy()[~same] == 0
                # a later listing of a path that is stored unchanged is skipped too
                done |= index.isin(index[done]) & ~known & index.isin(first.index)
                status[done] = "already_stored"
                obsid_col[done] = first["obsid"].reindex(index[done]).to_numpy(np.int64)
                todo = np.flatnonzero(~done)
                log.info("%s: %d of %d files already stored; skipping them; %d changed since "
                         "they were stored: reading them again to replace their rows",
                         store.path, int(done.sum()), len(sources), len(changed))
                if len(changed) and deduplicate:  # their old obsids are free again
                    free = np.ones(len(stored_obsid), bool)
                    free[target[changed]] = False
                    stored_obsid = stored_obsid[free]
        if bad_name:
            for i, why in bad_name.items():
                status[i], reason[i] = "failed", why
            todo = todo[~np.isin(todo, list(bad_name))]
        seen = _ObsidIndex(stored_obsid)
        tasks = [todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size)]
        buffer = {"flux": [], "ivar": [], "meta": [], "n": 0}
        swap = {"rows": [], "flux": [], "ivar": [], "meta": []}  # replacements of changed files
        handed = {"rows": len(store)}  # rows given to the writer (committed or about to be)
        writer = _Appender(store)

        def flush():
            if buffer["n"]:
                writer.put(np.concatenate(buffer["flux"]), np.concatenate(buffer["ivar"]),
                           buffer["meta"])
                handed["rows"] += buffer["n"]
                buffer.update(flux=[], ivar=[], meta=[], n=0)
            if swap["rows"]:
                writer.put(np.stack(swap["flux"]), np.stack(swap["ivar"]), swap["meta"],
                           rows=np.asarray(swap["rows"], np.int64))
                swap.update(rows=[], flux=[], ivar=[], meta=[])

        def retire(i, why):
            """File i changed and gives no spectrum now: its old row must not serve the old one."""
            row = int(target[i])
            reason[i] = f"{why}; the file changed since it was stored: its row {row} was retired"
            if was_retired[i]:
                return  # retired by an earlier run: nothing to rewrite
            swap["rows"].append(row)
            swap["flux"].append(np.ones(N_PIXELS, np.float32))
            swap["ivar"].append(np.zeros(N_PIXELS, np.float32))
            swap["meta"].append({"source": sources[i], "filename": os.path.basename(sources[i]),
                                 "obsid": -1, "n_good": 0})  # no fingerprint: tried again

        def take(task, result):
            keep = []
            for k, why in result["failed"]:
                status[task[k]], reason[task[k]] = "failed", why
                log.info("skipping %s: %s", sources[task[k]], why)
                if target[task[k]] >= 0:
                    retire(task[k], why)
            for pos, (k, meta) in enumerate(zip(result["ok"], result["meta"])):
                i = task[k]
                obsid_col[i] = meta["obsid"]
                if deduplicate and meta["obsid"] >= 0:
                    if meta["obsid"] in seen:
                        status[i], reason[i] = "duplicate", f"obsid {meta['obsid']} already stored"
                        if target[i] >= 0:
                            retire(i, reason[i])
                        continue
                    seen.add(meta["obsid"])
                status[i] = "stored"
                if target[i] >= 0:
                    row_col[i] = target[i]
                    reason[i] = f"replaced row {target[i]} (the file changed since it was stored)"
                    swap["rows"].append(int(target[i]))
                    swap["flux"].append(result["flux"][pos])
                    swap["ivar"].append(result["ivar"][pos])
                    swap["meta"].append(meta)
                    continue
                row_col[i] = handed["rows"] + buffer["n"] + len(keep)
                keep.append(pos)
            if keep:
                everything = len(keep) == len(result["ok"])  # no copy in the common case
                buffer["flux"].append(result["flux"] if everything else result["flux"][keep])
                buffer["ivar"].append(result["ivar"] if everything else result["ivar"][keep])
                buffer["meta"].extend(result["meta"][p] for p in keep)
                buffer["n"] += len(keep)
            if buffer["n"] + len(swap["rows"]) >= commit_rows:
                flush()

        args = (use_ormask, min_good_pixels)
        bar = tqdm(total=len(todo), desc="ingest", unit="file", disable=not progress)
        try:
            if n_workers <= 1 or len(tasks) <= 1:
                with _one_blas_thread():
                    for task in tasks:
                        take(task, _process_files([sources[i] for i in task], *args))
                        bar.update(len(task))
            else:
                _run_pool(tasks, sources, args, n_workers, take, bar)
        finally:
            bar.close()
            try:
                flush()  # results already received are complete and valid: keep them
            finally:
                writer.close()  # waits for every append; raises the writer's error, if any
        if len(store._parts) > 1 or store._patches:
            store.compact()
        report = pd.DataFrame({"source": listed, "status": status, "reason": reason,
                               "obsid": obsid_col, "row": row_col})
        if (report["status"] == "already_stored").any():
            source = store.read_meta(["source"])["source"]
            rows = pd.Series(source.index.to_numpy(), index=source.to_numpy())
            rows = rows[~rows.index.duplicated()]
            sel = report["status"] == "already_stored"
            report.loc[sel, "row"] = rows.reindex(report.loc[sel, "source"]).to_numpy()
        _write_atomic(store.path / REPORT_NAME, lambda p: report.to_csv(p, index=False))
        counts = report["status"].value_counts().to_dict()
        log.log(logging.WARNING if counts.get("failed") else logging.INFO,
                "%s: ingest done, %s; store holds %d observations", store.path, counts,
                len(store))
    return report


class _Appender:
    """Appends batches to a store from one background thread, in order.

    A 2,048-row append (Blosc compression, Zarr chunk files, the metadata part, the commit)
    takes ~0.1 ms of CPU but 0.15-0.25 ms of wall time per spectrum; done in the ingest loop, it
    kept the loop from handing the next task to a worker that had finished, so both workers
    sat idle for most of every append (about a fifth of the run on 2 cores). In this thread
    the loop goes on; Blosc and the file writes release the GIL. At most ``depth`` batches
    wait (bounded memory). Each append still commits atomically, in the order given, so a
    killed run keeps exactly the committed rows, as before.
    """

    def __init__(self, store: "SpectraStore", depth: int = 1):
        import queue
        import threading

        self._store = store
        self._queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lamostcannon-store-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # a failed append: drop the rest (uncommitted), report at close
            try:
                flux, ivar, records, rows = item
                if rows is None:
                    self._store.append(flux, ivar, _meta_frame(records))
                else:
                    self._store.replace(rows, flux, ivar, _meta_frame(records))
            except BaseException as exc:  # re-raised in the ingest loop
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, flux: np.ndarray, ivar: np.ndarray, records: list,
            rows: np.ndarray | None = None) -> None:
        """Queue one batch (waits while ``depth`` batches are pending): an append, or with
        ``rows`` a replacement of those rows."""
        self._raise()
        self._queue.put((flux, ivar, records, rows))

    def close(self) -> None:
        """Wait for every queued append; raise the first append error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


def _run_pool(tasks, sources, args, n_workers, take, bar) -> None:
    """Run the tasks on ``n_workers`` spawned processes; results are taken in task order.

    A worker that dies (killed, or a file that crashes a C library) costs nothing but time: a
    new worker runs its chunk again; a chunk whose worker dies twice fails its files with the
    reason (:class:`~lamostcannon.parallel.WorkerDied`) and the ingest goes on. Workers die
    with this process (:mod:`lamostcannon.parallel`).
    """
    payloads = [([sources[i] for i in task], *args) for task in tasks]

    def failed(index, exc):
        why = f"worker failed: {type(exc).__name__}: {exc}"
        return {"ok": [], "meta": [], "failed": [(k, why) for k in range(len(tasks[index]))],
                "flux": None, "ivar": None}

    # the task function lives in spectra (numpy only), so a worker starts without importing
    # pandas and zarr (0.45 s of CPU per worker)
    # 4 tasks in flight per worker (2 MB of results each): with 2, a worker that finished its
    # tasks while the oldest one was still running waited for it (results are taken in order):
    # 1.86-1.88 against 1.82 cores busy on 2 cores, 30,000 files, 5 of 5 pairs (by hand)
    for index, result in ordered_map(_process_payload, payloads, n_workers,
                                     initializer=_init_worker, on_error=failed,
                                     in_flight_per_worker=4,
                                     env={"OPENBLAS_NUM_THREADS": "1"}):
        take(tasks[index], result)
        bar.update(len(tasks[index]))

