"""The fetchers, one per input, and :func:`download_all`, which runs them in order.

Every fetcher writes the layout of ``docs/API.md`` ("Raw data layout") under ``out_dir``
(default ``paths.raw_dir("archive")``) and records each file in ``manifest.json``. A fetcher whose
output is already in place and verified does nothing; a service that cannot be reached raises
:class:`ArchiveUnavailable` before anything is written.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .http import Downloader, FetchReport, FileTask, Manifest, report_dict
from .services import vizier_tables, xmatch
from .sources import (BAILER_JONES_2018, CANTAT_GAUDIN_2018, EL_BADRY_RIX_2018, GAIA_DR2,
                      GALAH_BANDS, Endpoints)

log = logging.getLogger(__name__)

MATCH_RADIUS_ARCSEC = 1.0

# (name, aliases, kind) with kind "i" integer, "f" float, "s" string. Aliases are matched without
# regard to case; the first listed name that the source table has wins.
GALAH_SCHEMA = [("sobject_id", (), "i"), ("star_id", ("tmass_id",), "s"),
                ("ra", ("raj2000", "ra_dr2"), "f"), ("dec", ("dej2000", "dec_dr2"), "f"),
                ("teff", (), "f"), ("e_teff", (), "f"), ("logg", (), "f"), ("e_logg", (), "f"),
                ("fe_h", (), "f"), ("e_fe_h", (), "f"), ("flag_fe_h", (), "i"),
                ("vmic", (), "f"), ("vsini", ("vbroad",), "f"), ("alpha_fe", (), "f")]
GALAH_TAIL = [("flag_cannon", ("flag_sp",), "i"), ("chi2_cannon", ("chi2_sp",), "f")] + [
    (f"snr_c{k}", (f"snr_c{k}_iraf", f"snr_px_ccd{k}"), "f") for k in (1, 2, 3, 4)]

LAMOST_SCHEMA = [
    ("obsid", ("ObsID",), "i"), ("designation", ("Target", "Desig"), "s"),
    ("obsdate", ("ObsDate", "Date"), "s"), ("lmjd", ("LMJD",), "i"), ("mjd", ("MJD",), "i"),
    ("planid", ("PlanId", "Plan"), "s"), ("spid", ("spId", "sp"), "i"),
    ("fiberid", ("FiberId", "Fiber"), "i"), ("ra", ("RAdeg", "RAJ2000", "RA_ICRS", "objra"), "f"),
    ("dec", ("DEdeg", "DEJ2000", "DE_ICRS", "objdec"), "f"),
    ("snru", ("snrU", "S/Nu"), "f"), ("snrg", ("snrG", "S/Ng"), "f"),
    ("snrr", ("snrR", "S/Nr"), "f"), ("snri", ("snrI", "S/Ni"), "f"),
    ("snrz", ("snrZ", "S/Nz"), "f"), ("class", (), "s"), ("subclass", (), "s"), ("z", (), "f"),
    ("z_err", ("e_z", "zerr"), "f"), ("rv", ("HRV",), "f"), ("teff", (), "f"),
    ("teff_err", ("e_Teff",), "f"), ("logg", (), "f"), ("logg_err", ("e_logg",), "f"),
    ("feh", ("[Fe/H]", "FeH"), "f"), ("feh_err", ("e_[Fe/H]", "e_FeH"), "f")]

GAIA_SCHEMA = [("source_id", ("Source",), "i"), ("ra", ("RA_ICRS",), "f"),
               ("dec", ("DE_ICRS",), "f"), ("ref_epoch", ("Epoch",), "f"),
               ("parallax", ("Plx",), "f"), ("parallax_error", ("e_Plx",), "f"),
               ("pmra", ("pmRA",), "f"), ("pmra_error", ("e_pmRA",), "f"),
               ("pmdec", ("pmDE",), "f"), ("pmdec_error", ("e_pmDE",), "f"),
               ("radial_velocity", ("RV",), "f"), ("radial_velocity_error", ("e_RV",), "f"),
               ("phot_g_mean_mag", ("Gmag",), "f")]

DISTANCE_SCHEMA = [("source_id", ("Source",), "i"), ("r_est", ("rest",), "f"),
                   ("r_lo", ("b_rest",), "f"), ("r_hi", ("B_rest",), "f")]

CLUSTER_SCHEMA = [("source_id", ("Source", "GaiaDR2"), "i"), ("ra", ("RA_ICRS", "RAdeg"), "f"),
                  ("dec", ("DE_ICRS", "DEdeg"), "f"), ("cluster", ("Cluster",), "s"),
                  ("proba", ("PMemb", "Proba"), "f")]

BINARY_SCHEMA = [("source_id1", ("Source1", "Gaia1", "GaiaDR2-1"), "i"),
                 ("source_id2", ("Source2", "Gaia2", "GaiaDR2-2"), "i"),
                 ("ra1", ("RA1", "RAdeg1", "RA_ICRS1"), "f"), ("dec1", ("DE1", "DEdeg1", "DE_ICRS1"), "f"),
                 ("ra2", ("RA2", "RAdeg2", "RA_ICRS2"), "f"), ("dec2", ("DE2", "DEdeg2", "DE_ICRS2"), "f"),
                 ("sep_AU", ("sepAU", "s", "Sep"), "f"), ("pairdistance", ("theta",), "f"),
                 ("phot_g_mean_mag1", ("Gmag1",), "f"), ("phot_g_mean_mag2", ("Gmag2",), "f")]

UNITS = {"ra": "deg", "dec": "deg", "ra1": "deg", "dec1": "deg", "ra2": "deg", "dec2": "deg",
         "pairdistance": "deg", "parallax": "mas", "parallax_error": "mas", "pmra": "mas/yr",
         "pmra_error": "mas/yr", "pmdec": "mas/yr", "pmdec_error": "mas/yr",
         "radial_velocity": "km/s", "radial_velocity_error": "km/s", "rv": "km/s",
         "r_est": "pc", "r_lo": "pc", "r_hi": "pc", "sep_AU": "AU", "teff": "K", "e_teff": "K",
         "teff_err": "K", "vmic": "km/s", "vsini": "km/s", "phot_g_mean_mag": "mag",
         "phot_g_mean_mag1": "mag", "phot_g_mean_mag2": "mag", "ref_epoch": "yr"}


def galah_schema():
    from ..labels import ELEMENTS

    extra = []
    for el in ELEMENTS:
        extra += [(f"{el}_fe", (), "f"), (f"e_{el}_fe", (), "f"), (f"flag_{el}_fe", (), "i")]
    return GALAH_SCHEMA + extra + GALAH_TAIL


def conform(table, schema, what: str, *, defaults=None, warn: bool = True):
    """A new table with exactly the ``schema`` columns, found in ``table`` by name or alias.

    A name matches exactly first, then regardless of case (VizieR's ``b_rest`` and ``B_rest``
    differ only in case); no source column is used twice. Masked values become NaN (floats),
    -1 (integers) or "" (strings). A column that the source
    lacks is filled with those values and named in a warning (and in the returned ``missing``
    attribute of the table's ``meta``).
    """
    from astropy.table import MaskedColumn, Table

    defaults = defaults or {}
    out, missing, used = Table(), [], set()
    for name, aliases, kind in schema:
        src = _find_column(table.colnames, (name,) + tuple(aliases), used)
        used.add(src)
        if src is None:
            missing.append(name)
            fill = defaults.get(name, {"f": np.nan, "i": -1, "s": ""}[kind])
            data = np.full(len(table), fill, dtype={"f": float, "i": np.int64, "s": object}[kind])
            if kind == "s":
                data = data.astype(str)
        else:
            col = table[src]
            if kind == "f":
                data = np.asarray(col.filled(np.nan) if isinstance(col, MaskedColumn)
                                  else col, dtype=float)
            elif kind == "i":
                data = np.asarray(col.filled(-1) if isinstance(col, MaskedColumn) else col)
                data = np.asarray(np.where(np.isfinite(data.astype(float)), data, -1),
                                  dtype=np.int64)
            else:
                data = np.asarray(col.filled("") if isinstance(col, MaskedColumn) else col)
                data = np.char.strip(np.asarray([d.decode() if isinstance(d, bytes) else str(d)
                                                 for d in data], dtype=str))
        out[name] = data
        if name in UNITS:
            out[name].unit = UNITS[name]
    if missing and warn:
        log.warning("%s: no source column for %s (filled with NaN/-1/'')", what, ", ".join(missing))
    out.meta["missing"] = ",".join(missing)
    return out


def _find_column(colnames, candidates, used):
    """The first candidate present exactly, else the first present up to case; never a used one."""
    free = [c for c in colnames if c not in used]
    for cand in candidates:
        if cand in free:
            return cand
    lower = {c.lower(): c for c in free}
    for cand in candidates:
        if cand.lower() in lower:
            return lower[cand.lower()]
    return None


def write_table(table, path: Path) -> None:
    """Write a FITS table atomically (temporary name, then rename)."""
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. units FITS does not know
        table.write(tmp, format="fits", overwrite=True)
    os.replace(tmp, path)


def lamost_filename(lmjd, planid, spid, fiberid) -> str:
    """``spec-<lmjd>-<planid>_sp<spid:02d>-<fiberid:03d>.fits.gz`` (DR4 v2 layout)."""
    return f"spec-{int(lmjd)}-{str(planid).strip()}_sp{int(spid):02d}-{int(fiberid):03d}.fits.gz"


_BLOCK = 2880


class _CappedReader:
    """Reads a binary stream, raising ValueError once more than ``cap`` bytes came out."""

    def __init__(self, fh, cap: int | None, what: str):
        self.fh, self.cap, self.what, self.count = fh, cap, what, 0

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        self.count += len(data)
        if self.cap is not None and self.count > self.cap:
            raise ValueError(f"{self.what} exceeds the {self.cap}-byte limit (a gzip bomb?)")
        return data


def _card_int(header: dict, key: str, hdu: int, default=None) -> int:
    text = header.get(key)
    if text is None:
        if default is not None:
            return default
        raise ValueError(f"HDU {hdu} header lacks {key}")
    try:
        return int(text.split("/", 1)[0].strip())
    except ValueError:
        raise ValueError(f"HDU {hdu} header card {key} = {text.strip()!r} is not an "
                         "integer") from None


def fits_size_problem(stream, size: int | None = None) -> str | None:
    """Walk the HDUs of a FITS stream; say why it is incomplete, or None when it is whole.

    Every header is read and each HDU's data size is computed from its cards
    (``|BITPIX|/8 * GCOUNT * (PCOUNT + NAXIS1 * ... * NAXISn)``, FITS standard 4.0, eq. 1-2;
    random groups without ``NAXIS1``), and the bytes must hold all of it (the padding to 2880
    bytes after the last HDU may be missing). ``stream`` needs ``read(n)``; with ``size``
    (a plain file's length) and ``seek``, data are skipped without reading them.

    Returns
    -------
    str or None
        e.g. ``"truncated: HDU 1 declares 182400 data bytes from byte 5760, the file has
        91200"``.
    """
    pos, hdu = 0, 0
    while True:
        header, end = {}, False
        first = True
        while not end:
            block = stream.read(_BLOCK)
            if not block and first and hdu > 0:
                return None  # the file ends where an HDU ends
            if len(block) < _BLOCK:
                if first and hdu > 0 and not block.strip(b"\x00 "):
                    return None  # short zero padding after the last HDU
                return (f"truncated: the header of HDU {hdu} starting at byte {pos} is cut "
                        f"after {len(block)} bytes" if block or not first else
                        f"truncated: no header at byte {pos}")
            if first and hdu > 0 and not block.startswith(b"XTENSION"):
                if not block.strip(b"\x00 "):
                    return None  # padding after the last HDU
                return f"bytes at {pos} after HDU {hdu - 1} are not a FITS extension header"
            if first and hdu == 0 and not block.startswith(b"SIMPLE"):
                return "not a FITS file (no SIMPLE card)"
            for k in range(0, _BLOCK, 80):
                card = block[k:k + 80].decode("ascii", "replace")
                key = card[:8].strip()
                if key == "END":
                    end = True
                    break
                if card[8:10] == "= " and key not in header:
                    header[key] = card[10:]
            pos += _BLOCK
            first = False
        naxis = _card_int(header, "NAXIS", hdu)
        dims = [_card_int(header, f"NAXIS{i}", hdu) for i in range(1, naxis + 1)]
        if hdu == 0 and dims and dims[0] == 0 and "GROUPS" in header:
            dims = dims[1:]  # random groups
        n = math.prod(dims) if dims else 0
        bitpix = abs(_card_int(header, "BITPIX", hdu))
        nbytes = bitpix // 8 * _card_int(header, "GCOUNT", hdu, 1) * (
            _card_int(header, "PCOUNT", hdu, 0) + n)
        padded = -(-nbytes // _BLOCK) * _BLOCK
        if size is not None and hasattr(stream, "seek"):
            if pos + nbytes > size:
                return (f"truncated: HDU {hdu} declares {nbytes} data bytes from byte {pos}, "
                        f"the file has {size - pos}")
            stream.seek(min(pos + padded, size))
        else:
            left = padded
            while left > 0:
                got = len(stream.read(min(left, 1 << 20)))
                if got == 0:
                    break
                left -= got
            if padded - left < nbytes:
                return (f"truncated: HDU {hdu} declares {nbytes} data bytes from byte {pos}, "
                        f"the stream has {padded - left}")
        pos += padded
        hdu += 1


def validate_lamost(part: Path, task: FileTask) -> None:
    """A LAMOST spectrum must be a complete gzip (CRC checked) of a complete FITS file, no
    bigger than :data:`lamostcannon.spectra.MAX_SPECTRUM_BYTES` decompressed.

    The gzip stream is read in 1 MiB steps, so a gzip bomb costs no memory and is refused as
    soon as it passes the cap. A plain FITS answer is gzipped in place so that the file matches
    its ``.fits.gz`` name.
    """
    import gzip
    import shutil
    import zlib

    from ..spectra import MAX_SPECTRUM_BYTES

    cap = MAX_SPECTRUM_BYTES
    with open(part, "rb") as fh:
        head = fh.read(6)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(part, "rb") as fh:
                reader = _CappedReader(fh, cap, "decompressed spectrum")
                problem = fits_size_problem(reader)
                while reader.read(1 << 20):  # the rest, up to the cap, for the CRC check
                    pass
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"corrupt gzip ({exc})") from None
        if problem:
            raise ValueError(f"inside the gzip: {problem}")
    elif head == b"SIMPLE":
        size = part.stat().st_size
        if size > cap:
            raise ValueError(f"a {size}-byte spectrum exceeds the {cap}-byte limit")
        with open(part, "rb") as fh:
            problem = fits_size_problem(fh, size)
        if problem:
            raise ValueError(problem)
        tmp = part.with_name(part.name + ".gz")
        with open(part, "rb") as src, gzip.GzipFile(tmp, "wb", mtime=0) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, part)
    else:
        raise ValueError("neither FITS nor gzip")


def validate_fits(part: Path, task: FileTask) -> None:
    """A FITS file (plain or gzipped) is whole and its headers parse.

    Every HDU's declared size is checked against the bytes (:func:`fits_size_problem`), so a
    catalogue cut short with a consistent ``Content-Length`` and no digest is refused here, not
    when it is read; then :mod:`astropy.io.fits` verifies the headers.
    """
    import gzip
    import zlib

    from astropy.io import fits

    with open(part, "rb") as fh:
        head = fh.read(6)
    try:
        if head[:2] == b"\x1f\x8b":
            with gzip.open(part, "rb") as fh:
                problem = fits_size_problem(fh)
        elif head == b"SIMPLE":
            with open(part, "rb") as fh:
                problem = fits_size_problem(fh, part.stat().st_size)
        else:
            raise ValueError("not a FITS file")
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"corrupt gzip ({exc})") from None
    if problem:
        raise ValueError(problem)
    try:
        with fits.open(part, memmap=False) as hdul:
            hdul.verify("exception")
    except Exception as exc:  # astropy raises several types for broken files
        raise ValueError(f"unreadable FITS ({str(exc)[:80]})") from None


@dataclass
class DownloadReport:
    """What :func:`download_all` did, step by step; ``failures`` lists every file not fetched."""

    out_dir: Path
    steps: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    @property
    def failures(self):
        return [f for r in self.steps.values() for f in r.failures]

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "notes": self.notes,
                "steps": {k: report_dict(v) for k, v in self.steps.items()}}

    def __str__(self) -> str:
        lines = [f"archive data in {self.out_dir}"]
        for name, r in self.steps.items():
            lines.append(f"  {name:<16} fetched {len(r.fetched):>6}  already there "
                         f"{len(r.skipped):>6}  failed {len(r.failures):>4}")
        for f in self.failures[:20]:
            lines.append(f"  failed: {f.key}: {f.reason}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (report.failures)")
        return "\n".join(lines)



def _unless_verified(rel: str):
    """Decorate a fetcher that writes ``rel``: skip it (reported) when the manifest already
    holds a verified copy, else call it with ``rel`` and a fresh :class:`FetchReport`."""
    import functools

    def decorate(fetch):
        @functools.wraps(fetch)
        def run(self):
            report = FetchReport()
            if self._done(rel):
                report.skipped.append(rel)
                return report
            return fetch(self, rel, report)

        return run

    return decorate

class Archives:
    """The fetchers for one output folder and one set of :class:`Endpoints`.

    Parameters
    ----------
    out_dir : path, optional
        Defaults to ``paths.raw_dir("archive")``.
    endpoints : Endpoints, optional
        Service addresses and releases (environment variables apply to unset fields).
    downloader : Downloader, optional
        Retry, timeout, concurrency and progress settings for file downloads.
    """

    def __init__(self, out_dir=None, *, endpoints: Endpoints | None = None,
                 downloader: Downloader | None = None):
        from .. import paths

        self.out = Path(out_dir) if out_dir is not None else paths.raw_dir("archive")
        self.ep = endpoints or Endpoints()
        self.dl = downloader or Downloader()
        self.manifest = Manifest(self.out)

    # -- helpers ------------------------------------------------------------------------------
    def _done(self, rel: str) -> bool:
        return self.manifest.is_verified(rel)

    def _save_derived(self, table, rel: str, url: str, **extra) -> None:
        write_table(table, self.out / rel)
        self.manifest.record(rel, url, **extra)
        self.manifest.save()

    def _read(self, rel: str):
        from astropy.table import Table

        return Table.read(self.out / rel)

    def _one_file(self, url: str, rel: str, what: str, validate=None) -> FetchReport:
        return self.dl.fetch_many([FileTask(url, rel, key=rel)], self.out, self.manifest,
                                  what=what, validate=validate)

    def _xmatch(self, table, cat2, ra="ra", dec="dec"):
        return xmatch(table, cat2, radius_arcsec=MATCH_RADIUS_ARCSEC, url=self.ep.xmatch,
                      ra=ra, dec=dec, backoff=self.dl.backoff)

    # -- GALAH --------------------------------------------------------------------------------
    def galah_catalog(self) -> FetchReport:
        """GALAH catalogue file (kept as published) -> ``galah/catalog.fits`` (API schema)."""
        url = self.ep.galah_catalog
        raw = "galah/" + (url.rsplit("/", 1)[-1].split("?")[0] or "galah_catalog.fits")
        report = self._one_file(url, raw, f"GALAH {self.ep.galah_release} catalogue",
                                validate_fits)
        if report.failures:
            return report
        if not self._done("galah/catalog.fits") or \
                self.manifest.get("galah/catalog.fits").get("derived_from") != raw:
            table = conform(self._read(raw), galah_schema(), "GALAH catalogue")
            self._save_derived(table, "galah/catalog.fits", url, derived_from=raw,
                               release=self.ep.galah_release)
        return report

    def galah_spectra(self, sobject_ids) -> FetchReport:
        """The four camera files of each star -> ``galah/spectra/<sobject_id><camera>.fits``."""
        tasks = [FileTask(self.ep.galah_spectra.format(sobject_id=int(s), band=band),
                          f"galah/spectra/{int(s)}{ccd}.fits", key=f"{int(s)}{ccd}")
                 for s in np.unique(np.asarray(sobject_ids, dtype=np.int64))
                 for band, ccd in GALAH_BANDS]
        return self.dl.fetch_many(tasks, self.out, self.manifest,
                                  what=f"GALAH {self.ep.galah_release} spectra",
                                  validate=validate_fits)

    def galah_window_spectra(self, sobject_ids, *, model: str = "refit") -> dict:
        """``galah/window_spectra.fits`` from the downloaded spectra; see :mod:`.windows`."""
        from .windows import build_window_spectra

        cat = self._read("galah/catalog.fits")
        cat = cat[np.isin(np.asarray(cat["sobject_id"]), np.asarray(sobject_ids))]
        rel = "galah/window_spectra.fits"
        notes = build_window_spectra(cat, self.out / "galah" / "spectra", self.out / rel,
                                     model=model)
        self.manifest.record(rel, "derived:galah/spectra", **{"window_model": model})
        self.manifest.notes.update(notes)
        self.manifest.save()
        return notes

    # -- LAMOST -------------------------------------------------------------------------------
    @_unless_verified("lamost/catalog.fits")
    def lamost_catalog(self, rel: str, report: FetchReport) -> FetchReport:
        """LAMOST observations within 1 arcsec of a GALAH star -> ``lamost/catalog.fits``."""
        from astropy.table import Table, join, unique

        galah = self._read("galah/catalog.fits")
        pos = Table({"galah_id": galah["sobject_id"], "ra_galah": galah["ra"],
                     "dec_galah": galah["dec"]})
        pos = pos[np.isfinite(pos["ra_galah"]) & np.isfinite(pos["dec_galah"])]
        if self.ep.lamost_xmatch:
            first, *others = self.ep.lamost_xmatch
            matched = self._xmatch(pos, first, "ra_galah", "dec_galah")
            table = conform(matched, LAMOST_SCHEMA, "LAMOST catalogue", warn=not others)
            for cat2 in others:
                extra = conform(self._xmatch(pos, cat2, "ra_galah", "dec_galah"),
                                LAMOST_SCHEMA, f"LAMOST {cat2}", warn=False)
                keep = ["obsid"] + [c for c in extra.colnames if c != "obsid"
                                    and table[c].dtype.kind == "f"
                                    and not np.isfinite(table[c]).any()]
                extra = unique(extra[keep], keys="obsid")
                table.remove_columns([c for c in keep if c != "obsid"])
                table.meta.clear()
                extra.meta.clear()
                table = join(table, extra, keys="obsid", join_type="left")
            empty = [c for c in table.colnames if table[c].dtype.kind == "f"
                     and not np.isfinite(np.asarray(table[c].filled(np.nan) if hasattr(
                         table[c], "filled") else table[c], float)).any()]
            if empty:
                log.warning("LAMOST catalogue: no values for %s", ", ".join(empty))
            source = f"xmatch:{','.join(self.ep.lamost_xmatch)} within 1 arcsec via {self.ep.xmatch}"
        else:
            table, source = self._lamost_catalog_from_file(pos, report)
            if table is None:
                return report
        table = unique(table, keys="obsid")
        table["filename"] = [lamost_filename(*r) for r in
                             zip(table["lmjd"], table["planid"], table["spid"], table["fiberid"])]
        table = table[[n for n, _, _ in LAMOST_SCHEMA] + ["filename"]]
        self._save_derived(table, rel, source, release=self.ep.lamost_release)
        return report

    def _lamost_catalog_from_file(self, pos, report):
        """Download a whole LAMOST catalogue file and cross-match locally (releases not on VizieR)."""
        import astropy.units as u
        from astropy.coordinates import SkyCoord

        url = self.ep.lamost_catalog
        raw = "lamost/" + url.rsplit("=", 1)[-1].rsplit("/", 1)[-1]
        report.merge(self._one_file(url, raw, f"LAMOST {self.ep.lamost_release} catalogue"))
        if report.failures:
            return None, None
        full = conform(self._read(raw), LAMOST_SCHEMA, "LAMOST catalogue")
        c1 = SkyCoord(pos["ra_galah"] * u.deg, pos["dec_galah"] * u.deg)
        c2 = SkyCoord(full["ra"] * u.deg, full["dec"] * u.deg)
        _, i2, _, _ = c2.search_around_sky(c1, MATCH_RADIUS_ARCSEC * u.arcsec)
        return full[np.unique(i2)], f"{url} cross-matched locally within 1 arcsec"

    def lamost_spectra(self) -> FetchReport:
        """Every spectrum of ``lamost/catalog.fits``, by obsid -> ``lamost/spectra/<filename>``."""
        cat = self._read("lamost/catalog.fits")
        from ..spectra import MAX_SPECTRUM_BYTES

        tasks = [FileTask(self.ep.lamost_spectra.format(obsid=int(o)),
                          f"lamost/spectra/{fn}", key=str(int(o)), max_bytes=MAX_SPECTRUM_BYTES)
                 for o, fn in zip(cat["obsid"], cat["filename"])]
        return self.dl.fetch_many(tasks, self.out, self.manifest,
                                  what=f"LAMOST {self.ep.lamost_release} spectra",
                                  validate=validate_lamost)

    # -- Gaia ---------------------------------------------------------------------------------
    @_unless_verified("gaia/gaia_source.fits")
    def gaia_sources(self, rel: str, report: FetchReport) -> FetchReport:
        """Brightest Gaia DR2 source within 1 arcsec of each LAMOST star -> ``gaia/gaia_source.fits``."""
        from astropy.table import Table, unique

        lam = self._read("lamost/catalog.fits")
        pos = Table({"obsid": lam["obsid"], "ra_lamost": lam["ra"], "dec_lamost": lam["dec"]})
        pairs = self._xmatch(pos, GAIA_DR2, "ra_lamost", "dec_lamost")
        gaia = conform(pairs, GAIA_SCHEMA, "Gaia DR2", defaults={"ref_epoch": 2015.5})
        gaia["obsid"] = np.asarray(pairs["obsid"], dtype=np.int64)
        g = np.where(np.isfinite(gaia["phot_g_mean_mag"]), gaia["phot_g_mean_mag"], np.inf)
        gaia = gaia[np.lexsort((g, gaia["obsid"]))]
        gaia = unique(gaia, keys="obsid", keep="first")  # brightest G wins
        gaia = unique(gaia, keys="source_id")
        gaia.remove_column("obsid")
        self._save_derived(gaia, rel, f"xmatch:{GAIA_DR2} within 1 arcsec, brightest G, "
                                      f"via {self.ep.xmatch}")
        return report

    @_unless_verified("gaia/distances.fits")
    def distances(self, rel: str, report: FetchReport) -> FetchReport:
        """Bailer-Jones et al. (2018) distances of the Gaia sources -> ``gaia/distances.fits``."""
        from astropy.table import Table, unique

        gaia = self._read("gaia/gaia_source.fits")
        pos = Table({"gaia_id": gaia["source_id"], "ra_gaia": gaia["ra"], "dec_gaia": gaia["dec"]})
        pairs = self._xmatch(pos, BAILER_JONES_2018, "ra_gaia", "dec_gaia")
        dist = conform(pairs, DISTANCE_SCHEMA, "Bailer-Jones distances")
        dist = unique(dist[dist["source_id"] == np.asarray(pairs["gaia_id"], dtype=np.int64)],
                      keys="source_id")
        self._save_derived(dist, rel, f"xmatch:{BAILER_JONES_2018} by source_id via "
                                      f"{self.ep.xmatch}")
        return report

    # -- companion catalogues -----------------------------------------------------------------
    @_unless_verified("binaries/wide_binaries.fits")
    def wide_binaries(self, rel: str, report: FetchReport) -> FetchReport:
        """El-Badry et al. wide binaries -> ``binaries/wide_binaries.fits``.

        With ``LAMOSTCANNON_BINARIES_URL`` (or ``Endpoints.binaries``) set, that FITS/CSV file is
        downloaded (the El-Badry et al. 2019 catalogue, whose public location could not be
        confirmed); otherwise the El-Badry & Rix (2018) Gaia DR2 catalogue on VizieR is used.
        """
        if self.ep.binaries:
            url = self.ep.binaries
            raw = "binaries/" + url.rsplit("/", 1)[-1].split("?")[0]
            report.merge(self._one_file(url, raw, "wide-binary catalogue"))
            if report.failures:
                return report
            table, source = self._read(raw), url
        else:
            tables = vizier_tables(EL_BADRY_RIX_2018, base_url=self.ep.vizier,
                                   backoff=self.dl.backoff)
            table = max(tables.values(), key=len)
            source = f"vizier:{EL_BADRY_RIX_2018} via {self.ep.vizier}"
        out = conform(table, BINARY_SCHEMA, "wide binaries")
        if not np.isfinite(out["pairdistance"]).any():
            import astropy.units as u
            from astropy.coordinates import SkyCoord

            c1 = SkyCoord(out["ra1"], out["dec1"], unit="deg")
            c2 = SkyCoord(out["ra2"], out["dec2"], unit="deg")
            out["pairdistance"] = c1.separation(c2).to_value(u.deg)
            out["pairdistance"].unit = "deg"
        self._save_derived(out, rel, source)
        return report

    @_unless_verified("clusters/members.fits")
    def cluster_members(self, rel: str, report: FetchReport) -> FetchReport:
        """Cantat-Gaudin et al. (2018) members -> ``clusters/members.fits``."""
        tables = vizier_tables(CANTAT_GAUDIN_2018, base_url=self.ep.vizier,
                               backoff=self.dl.backoff)
        out = conform(max(tables.values(), key=len), CLUSTER_SCHEMA, "cluster members")
        self._save_derived(out, rel, f"vizier:{CANTAT_GAUDIN_2018} via {self.ep.vizier}")
        return report

    # -- everything ---------------------------------------------------------------------------
    def run(self, *, galah_model: str = "refit", galah_spectra: bool = True) -> DownloadReport:
        """Every step in order; see :func:`download_all`."""
        rep = DownloadReport(self.out)
        self.manifest.notes.update({"galah_release": self.ep.galah_release,
                                    "lamost_release": self.ep.lamost_release})
        rep.steps["galah_catalog"] = self.galah_catalog()
        if rep.steps["galah_catalog"].failures:
            return rep
        rep.steps["lamost_catalog"] = self.lamost_catalog()
        if rep.steps["lamost_catalog"].failures:
            return rep
        rep.steps["lamost_spectra"] = self.lamost_spectra()
        rep.steps["gaia"] = self.gaia_sources()
        rep.steps["distances"] = self.distances()
        rep.steps["wide_binaries"] = self.wide_binaries()
        rep.steps["clusters"] = self.cluster_members()
        if galah_spectra:
            import astropy.units as u
            from astropy.coordinates import SkyCoord

            galah = self._read("galah/catalog.fits")
            lam = self._read("lamost/catalog.fits")
            ok = np.isfinite(galah["ra"]) & np.isfinite(galah["dec"])
            c_galah = SkyCoord(galah["ra"][ok], galah["dec"][ok], unit="deg")
            c_lam = SkyCoord(lam["ra"], lam["dec"], unit="deg")
            i1 = c_lam.search_around_sky(c_galah, MATCH_RADIUS_ARCSEC * u.arcsec)[0]
            ids = np.unique(np.asarray(galah["sobject_id"][ok])[i1])
            rep.steps["galah_spectra"] = self.galah_spectra(ids)
            rep.notes.update(self.galah_window_spectra(ids, model=galah_model))
        else:
            self.manifest.notes["window_model"] = "skipped"
            self.manifest.notes["window_model_text"] = (
                "GALAH spectra not downloaded: the per-element windowed chi2 cut cannot be applied.")
            self.manifest.save()
        rep.notes.update(self.manifest.notes)
        return rep


def download_all(out_dir=None, *, galah_release: str = "dr2.1", lamost_release: str = "dr4",
                 progress: bool = True, galah_model: str = "refit", galah_spectra: bool = True,
                 workers: int = 6, endpoints: Endpoints | None = None,
                 downloader: Downloader | None = None) -> DownloadReport:
    """Fetch the paper's real inputs into ``out_dir`` (default ``data/raw/archive``).

    Steps, each idempotent and recorded in ``manifest.json``: GALAH catalogue; LAMOST catalogue
    rows within 1 arcsec of GALAH stars (CDS XMatch with VizieR ``V/153``); their LAMOST spectra by
    obsid; brightest Gaia DR2 source within 1 arcsec (XMatch with ``I/345/gaia2``); Bailer-Jones
    (2018) distances (``I/347/gaia2dis``); wide binaries; Cantat-Gaudin (2018) members
    (``J/A+A/618/A93``); the GALAH spectra of the cross-matched stars and
    ``galah/window_spectra.fits`` (see :mod:`lamostcannon.archives.windows` for the model).

    Parameters
    ----------
    out_dir : path, optional
        Output folder; default ``paths.raw_dir("archive")``.
    galah_release : {"dr2.1", "dr3", "dr4"}
    lamost_release : {"dr4", "dr10"}
    progress : bool
        Progress bars (files and bytes) for the downloads.
    galah_model : {"refit", "none"}
        How ``MODEL`` of ``window_spectra.fits`` is made (GALAH publishes no model spectra).
    galah_spectra : bool
        ``False`` skips the GALAH spectra (and so the windowed chi2 cut; the manifest says so).
    workers : int
        Parallel downloads.

    Returns
    -------
    DownloadReport
        Per step: files fetched, already in place, and failures with reasons. ``print(report)``.

    Raises
    ------
    ArchiveUnavailable
        A service cannot be reached; nothing half-written is left at a final path.
    """
    ep = endpoints or Endpoints(galah_release=galah_release, lamost_release=lamost_release)
    dl = downloader or Downloader(progress=progress, workers=workers)
    return Archives(out_dir, endpoints=ep, downloader=dl).run(galah_model=galah_model,
                                                              galah_spectra=galah_spectra)
