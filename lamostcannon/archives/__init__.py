"""Fetching the paper's real inputs: GALAH, LAMOST, Gaia and the companion catalogues.

Three layers, as in galpy/apogee: *where* (:mod:`.sources`: releases, identifiers, URLs, all
overridable), *fetch* (:mod:`.http`: idempotent, verified, resumable, retried, bounded downloads
with a manifest; :mod:`.services`: astroquery VizieR and CDS XMatch), and the fetchers that write
the raw-data layout of ``docs/API.md`` (:mod:`.core`). Notebook 01 calls :func:`download_all`
when ``LAMOSTCANNON_SOURCE=archive``::

    from lamostcannon import archives
    report = archives.download_all()      # data/raw/archive/
    print(report)

Offline, or with an archive down, :class:`ArchiveUnavailable` says what failed and how to use
the mock universe instead. Nothing is fetched or imported at import time.
"""

from .core import (Archives, DownloadReport, conform, download_all, fits_size_problem,
                   lamost_filename, validate_fits, validate_lamost)
from .http import ArchiveUnavailable, Downloader, FetchReport, FileTask, Failure, Manifest
from .sources import GALAH_RELEASES, LAMOST_RELEASES, Endpoints
from .windows import WINDOWS, build_window_spectra

__all__ = ["ArchiveUnavailable", "Archives", "DownloadReport", "Downloader", "Endpoints",
           "Failure", "FetchReport", "FileTask", "GALAH_RELEASES", "fits_size_problem", "LAMOST_RELEASES", "Manifest",
           "WINDOWS", "build_window_spectra", "conform", "download_all", "lamost_filename",
           "validate_fits", "validate_lamost"]
