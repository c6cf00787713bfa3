"""Thin wrappers over astroquery's VizieR and CDS XMatch clients, with configurable addresses.

astroquery builds VizieR URLs by putting ``https://`` before ``VIZIER_SERVER`` and the
``viz-bin/votable`` path after it, so a full base URL (scheme included, e.g. a local test server on ``http://127.0.0.1:port``) needs the small
override in :class:`_Vizier`; the XMatch client takes its address from its ``URL`` attribute.
Both are called with ``row_limit=-1`` / ``cache=False`` (astroquery's defaults are 50 rows and an
on-disk cache in the user's home). Network failures become :class:`ArchiveUnavailable`.
"""

from __future__ import annotations

import io
import logging
import time
import warnings

from .http import ArchiveUnavailable, _short

log = logging.getLogger(__name__)


def _call(what: str, url: str, fn, *, retries: int = 2, backoff: float = 2.0):
    """Run ``fn()``; retry 5xx/timeouts, turn an unreachable service into ArchiveUnavailable."""
    reason = "no answer"
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            cause = _network_cause(exc)
            if cause is None:
                raise
            reason = cause
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise ArchiveUnavailable(what, url, reason) from None


def _network_cause(exc: BaseException) -> str | None:
    """A short reason when ``exc`` (or what caused it) is a network failure or a 5xx answer."""
    import requests

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, requests.exceptions.HTTPError):
            status = exc.response.status_code if exc.response is not None else 0
            return f"HTTP {status}" if status >= 500 or status == 0 else None
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return _short(exc)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def vizier_tables(catalog: str, *, base_url: str, timeout: float = 300.0,
                  columns=("**",), backoff: float = 2.0):
    """Every row of a VizieR catalogue (``row_limit=-1``) as an astroquery ``TableList``."""
    from astroquery.vizier import VizierClass

    class _Vizier(VizierClass):
        def _server_to_url(self, return_type="votable"):
            if "://" in base_url:
                return base_url.rstrip("/") + "/viz-bin/" + return_type
            return super()._server_to_url(return_type)

    server = base_url.split("://", 1)[-1].rstrip("/")
    viz = _Vizier(columns=list(columns), row_limit=-1, timeout=timeout, vizier_server=server)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = _call(f"VizieR ({catalog})", base_url, lambda: viz.get_catalogs(catalog),
                       backoff=backoff)
    if len(tables) == 0:
        raise LookupError(f"VizieR returned no table for {catalog!r}")
    return tables


def xmatch(table, cat2: str, *, radius_arcsec: float, url: str, ra: str = "ra",
           dec: str = "dec", timeout: float = 600.0, backoff: float = 2.0):
    """Positional cross-match of ``table`` (uploaded) with a VizieR table on the CDS XMatch service.

    Returns every pair within ``radius_arcsec`` (column ``angDist`` in arcsec), the uploaded
    columns first. ``cat2`` is ``"vizier:<catalogue>/<table>"``.
    """
    import astropy.units as u
    from astropy.table import Table
    from astroquery.xmatch import XMatchClass

    class _XMatch(XMatchClass):
        URL = url
        TIMEOUT = timeout

        def get_available_tables(self, *, cache=False):
            return super().get_available_tables(cache=False)

    upload = Table(table, copy=False)
    buf = io.StringIO()
    upload.write(buf, format="ascii.csv")
    client = _XMatch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _call(f"CDS XMatch ({cat2})", url, lambda: client.query(
            cat1=io.BytesIO(buf.getvalue().encode()), cat2=cat2,
            max_distance=radius_arcsec * u.arcsec, colRA1=ra, colDec1=dec, cache=False),
            backoff=backoff)
    log.info("XMatch %s: %d pairs within %.1f arcsec", cat2, len(result), radius_arcsec)
    return result
