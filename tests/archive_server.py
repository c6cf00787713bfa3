"""A local stand-in for the archives, for tests without internet.

:class:`ArchiveServer` is a real HTTP server (``http.server`` in a thread, 127.0.0.1, ephemeral
port) that speaks the protocols the fetchers use:

* LAMOST spectra by obsid, ``GET /lamost/spectrum/fits/<obsid>``, serving the *real* files of
  ``../shared/data/lamost/dr10`` unchanged, with ``Range`` requests (206) and a ``Repr-Digest``
  (sha-256) header, as a resumable archive would;
* plain files (``/files/<name>``: a GALAH-style catalogue) and GALAH camera spectra through a
  Data Central-style ``/vo/slink/links?ID=..&FILT=..`` service;
* the CDS XMatch API (``/xmatch/api/v1/sync``: a multipart upload of a CSV, answered with a
  VOTable of all pairs within ``distMaxArcsec`` and an ``angDist`` column; ``.../tables`` lists
  the VizieR tables it knows);
* VizieR's ``/viz-bin/votable`` (the ``-source=`` script astroquery posts, answered with a VOTable
  whose TABLE is named after the catalogue).

Fault injection: ``server.faults[path] = ["drop", "503", "corrupt", "stall", "404", "drip",
...]``; each request for that path consumes the first action; ``server.always[path]`` applies on
every request. ``"drip"`` promises the whole file (``Content-Length``) and then sends one byte
every ``drip_seconds`` (default 0.3) until the client hangs up. ``server.requests`` counts requests per path; ``server.ranges`` records Range headers.
"""

from __future__ import annotations

import base64
import collections
import email.parser
import email.policy
import hashlib
import io
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np



#: The archive routes this server speaks (URL paths without the leading slash).
SPECTRUM_ROUTE = "lamost/spectrum/fits"      # LAMOST spectra by obsid
SLINK_ROUTE = "vo/slink/links"               # GALAH spectra (Data Central SODA links)
VIZIER_ROUTE = "viz-bin/votable"             # VizieR queries
XMATCH_ROUTE = "xmatch/api/v1/sync"          # CDS XMatch
GALAH_CATALOG_ROUTE = "files/GALAH_DR2.1_catalog.fits"


def path_of(route: str, *rest) -> str:
    """The URL path of ``route`` followed by ``rest`` (``path_of(SPECTRUM_ROUTE, 42)``)."""
    return "/" + "/".join([route, *map(str, rest)])


def _segments(path: str) -> tuple:
    """The segments of a URL path (``a/b/c`` -> ``("a", "b", "c")``), for routing."""
    return tuple(part for part in path.split("/") if part)

def votable_bytes(table, name: str | None = None) -> bytes:
    """A VOTable document for an astropy Table, its TABLE named ``name``."""
    from astropy.io.votable import from_table

    vot = from_table(table)
    if name:
        vot.resources[0].tables[0].name = name
    buf = io.BytesIO()
    vot.to_xml(buf)
    return buf.getvalue()


def xmatch_pairs(upload, cat2, ra1: str, dec1: str, radius_arcsec: float):
    """All pairs within the radius, as CDS XMatch returns them (angDist, cat1 cols, cat2 cols)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astropy.table import Table, hstack

    c1 = SkyCoord(np.asarray(upload[ra1], float) * u.deg, np.asarray(upload[dec1], float) * u.deg)
    c2 = SkyCoord(np.asarray(cat2["RA_ICRS" if "RA_ICRS" in cat2.colnames else "RAdeg"]) * u.deg,
                  np.asarray(cat2["DE_ICRS" if "DE_ICRS" in cat2.colnames else "DEdeg"]) * u.deg)
    i2, i1, sep, _ = c1.search_around_sky(c2, radius_arcsec * u.arcsec)
    order = np.lexsort((sep.arcsec, i1))
    i1, i2, sep = i1[order], i2[order], sep[order]
    out = hstack([Table({"angDist": sep.arcsec}), upload[i1], cat2[i2]],
                 metadata_conflicts="silent")
    return out


def galah_camera(ccd: int, labels, rng, step_factor: float = 0.9) -> bytes:
    """A GALAH DR2-style camera file: 5 image HDUs (0 flux, 1 relative error, 2-3 without sky
    subtraction, 4 normalised flux), wavelengths from CRVAL1/CDELT1/CRPIX1; absorption lines in
    every element window whose depth follows ``labels[f"{el}_fe"]`` and ``labels["teff"]``."""
    from astropy.io import fits

    from lamostcannon.archives.windows import CAMERA_RANGE, CAMERA_STEP, WINDOWS
    from lamostcannon.labels import ELEMENTS

    lo, hi = CAMERA_RANGE[ccd]
    step = CAMERA_STEP[ccd] * step_factor
    wave = lo + step * np.arange(int((hi - lo) / step))
    flux = np.ones_like(wave)
    for el in ELEMENTS:
        value = float(labels[f"{el}_fe"])
        depth = 0.3 + 0.2 * (value if np.isfinite(value) else 0.0) \
            + 1e-4 * (float(labels["teff"]) - 5500)
        for a, b in WINDOWS[el]:
            if lo <= a <= hi:
                flux -= depth * np.exp(-0.5 * ((wave - 0.5 * (a + b)) / 0.1) ** 2)
    rel = np.full_like(wave, 0.01)
    flux = flux + rng.normal(0, 0.01, wave.size)
    hdr = fits.Header({"CRVAL1": lo, "CDELT1": step, "CRPIX1": 1.0})
    hdus = [fits.PrimaryHDU(flux.astype(np.float32), header=hdr),
            fits.ImageHDU(rel.astype(np.float32), header=hdr, name="input_sigma"),
            fits.ImageHDU(flux.astype(np.float32), header=hdr, name="no_sky_spectrum"),
            fits.ImageHDU(rel.astype(np.float32), header=hdr, name="no_sky_sigma"),
            fits.ImageHDU(flux.astype(np.float32), header=hdr, name="normalised_spectrum")]
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


class ArchiveServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, *, stall_seconds: float = 2.0, drip_seconds: float = 0.3):
        self.files: dict[str, bytes] = {}          # path -> bytes (exact paths)
        self.spectra: dict[int, bytes] = {}        # obsid -> LAMOST file bytes
        self.galah_spectra: dict[tuple[int, str], bytes] = {}  # (sobject_id, band) -> bytes
        self.xmatch_tables: dict[str, object] = {}  # "V/153/dr4" -> astropy Table
        self.vizier_tables: dict[str, list] = {}    # "J/A+A/618/A93/members" -> [Table, ...]
        self.faults: dict[str, list[str]] = collections.defaultdict(list)
        self.always: dict[str, str] = {}
        self.requests: collections.Counter = collections.Counter()
        self.ranges: list[tuple[str, str]] = []
        self.stall_seconds = stall_seconds
        self.drip_seconds = drip_seconds
        self.dripped: list[int] = []  # bytes sent by each finished drip
        self.down = False  # every request answers 503
        self._lock = threading.Lock()
        self._httpd = None

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> "ArchiveServer":
        handler = type("Handler", (_Handler,), {"archive": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def next_fault(self, path: str) -> str | None:
        with self._lock:
            self.requests[path] += 1
            if path in self.always:
                return self.always[path]
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    def count(self, prefix: str = "/") -> int:
        return sum(n for p, n in self.requests.items() if p.startswith(prefix))


class _Handler(BaseHTTPRequestHandler):
    archive: ArchiveServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # -- answers --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream",
              headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, path: str, data: bytes, ctype="application/fits"):
        fault = self.archive.next_fault(path)
        if fault == "404":
            return self._send(404, b"not found", "text/plain")
        if fault == "503":
            return self._send(503, b"busy", "text/plain", {"Retry-After": "0"})
        if fault == "stall":
            time.sleep(self.archive.stall_seconds)
            self.close_connection = True
            return
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        headers = {"Repr-Digest": f"sha-256=:{digest}:", "Accept-Ranges": "bytes"}
        body, status = data, 200
        rng = self.headers.get("Range")
        if rng:
            self.archive.ranges.append((path, rng))
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                return self._send(416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
            body, status = data[start:], 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if fault == "corrupt":
            body = bytearray(body)
            mid = len(body) // 2
            body[mid:mid + 64] = bytes(64)  # zero 64 bytes in the middle
            body = bytes(body)
        if fault == "drip":  # promise everything, then one byte at a time until hung up
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            sent = 0
            try:
                for k in range(len(body)):
                    self.wfile.write(body[k:k + 1])
                    self.wfile.flush()
                    sent += 1
                    time.sleep(self.archive.drip_seconds)
            except OSError:
                pass
            self.archive.dripped.append(sent)
            self.close_connection = True
            return
        if fault == "drop":  # promise everything, send half, hang up
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        return self._send(status, body, ctype, headers)

    # -- routes ---------------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        a = self.archive
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        segs = _segments(path)
        if a.down:
            a.requests[path] += 1
            return self._send(503, b"down", "text/plain")
        if segs[:-1] == _segments(SPECTRUM_ROUTE):
            obsid = int(path.rsplit("/", 1)[1])
            if obsid not in a.spectra:
                a.requests[path] += 1
                return self._send(404, b"no such obsid", "text/plain")
            return self._send_file(path, a.spectra[obsid])
        if segs == _segments(SLINK_ROUTE):
            key = (int(query["ID"][0]), query["FILT"][0])
            full = f"{path}?ID={key[0]}&FILT={key[1]}"
            if key not in a.galah_spectra:
                a.requests[full] += 1
                return self._send(404, b"no such spectrum", "text/plain")
            return self._send_file(full, a.galah_spectra[key])
        if path in a.files:
            return self._send_file(path, a.files[path])
        if path.endswith("/tables") and query.get("action") == ["getVizieRTableNames"]:
            a.requests[path] += 1
            return self._send(200, "\n".join(a.xmatch_tables).encode(), "text/plain")
        a.requests[path] += 1
        return self._send(404, b"not found", "text/plain")

    def do_POST(self):
        a = self.archive
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        a.requests[path] += 1
        if a.down:
            return self._send(503, b"down", "text/plain")
        if _segments(path)[-2:] == _segments(VIZIER_ROUTE):
            text = body.decode()
            from urllib.parse import unquote_plus

            if "-source=" not in text:  # form-encoded rather than VizieR's plain script
                text = unquote_plus(text)
            m = re.search(r"-source=([^\s&]+)", text)
            name = m.group(1) if m else ""
            if name not in a.vizier_tables:
                return self._send(200, votable_bytes(_empty(), "none"), "text/xml")
            from astropy.io.votable.tree import Resource, VOTableFile
            from astropy.io.votable import from_table

            vot = VOTableFile()
            res = Resource()
            vot.resources.append(res)
            for k, t in enumerate(a.vizier_tables[name]):
                vt = from_table(t).resources[0].tables[0]
                vt.name = name if k == 0 else f"{name}_{k}"
                res.tables.append(vt)
            buf = io.BytesIO()
            vot.to_xml(buf)
            return self._send(200, buf.getvalue(), "text/xml")
        if _segments(path)[-4:] == _segments(XMATCH_ROUTE):
            form = _multipart(self.headers.get("Content-Type", ""), body)
            from astropy.table import Table

            from astropy.io import ascii as _ascii

            upload = _ascii.read(form["cat1"].decode(), format="csv")
            cat2 = form["cat2"].decode().removeprefix("vizier:")
            if cat2 not in a.xmatch_tables:
                return self._send(400, b"unknown table", "text/plain")
            out = xmatch_pairs(upload, a.xmatch_tables[cat2], form["colRA1"].decode(),
                               form["colDec1"].decode(), float(form["distMaxArcsec"]))
            return self._send(200, votable_bytes(out), "application/x-votable+xml")
        return self._send(404, b"not found", "text/plain")


def _empty():
    from astropy.table import Table

    return Table({"x": np.zeros(0)})


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """Fields of a multipart/form-data body (names -> raw bytes)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[name] = part.get_payload(decode=True)
    return out
