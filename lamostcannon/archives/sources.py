"""Where each input lives: service addresses, catalogue identifiers and file URLs, per release.

Every address can be changed without editing code, by a constructor argument of
:class:`Endpoints` or an environment variable (tests point them all at a local server):

===============================  ===========================================================
variable                         default
===============================  ===========================================================
``LAMOSTCANNON_VIZIER_URL``      ``https://vizier.cds.unistra.fr`` (astroquery's first mirror)
``LAMOSTCANNON_XMATCH_URL``      ``http://cdsxmatch.u-strasbg.fr/xmatch/api/v1/sync``
``LAMOSTCANNON_LAMOST_URL``      per release, see :data:`LAMOST_RELEASES` (``{obsid}`` template)
``LAMOSTCANNON_LAMOST_CATALOG``  per release (a catalogue *file* URL; DR10 only)
``LAMOSTCANNON_GALAH_CATALOG``   per release, see :data:`GALAH_RELEASES`
``LAMOSTCANNON_GALAH_SPECTRA``   per release (``{sobject_id}`` and ``{band}`` template)
``LAMOSTCANNON_BINARIES_URL``    unset: VizieR ``J/MNRAS/480/4884``; else a FITS/CSV file URL
``LAMOSTCANNON_LAMOST_DR8_URL``  :data:`LAMOST_DR8_SPECTRA` (``{obsid}`` template; the DR8
                                 repeat visits of notebook 09, :mod:`lamostcannon.real`)
===============================  ===========================================================

``docs/data_sources.md`` lists every identifier with the documentation that confirms it (or says
that it could not be confirmed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: GALAH releases: catalogue file and per-camera spectra (Data Central SSA "slink" service).
GALAH_RELEASES = {
    "dr2.1": {
        "catalog": "https://cloud.datacentral.org.au/teamdata/GALAH/public/GALAH_DR2.1/"
                   "GALAH_DR2.1_catalog.fits",
        "spectra": "https://datacentral.org.au/vo/slink/links?ID={sobject_id}&DR=galah_dr2"
                   "&IDX=0&FILT={band}&RESPONSEFORMAT=fits",
    },
    "dr3": {
        "catalog": "https://cloud.datacentral.org.au/teamdata/GALAH/public/GALAH_DR3/"
                   "GALAH_DR3_main_allstar_v2.fits",
        "spectra": "https://datacentral.org.au/vo/slink/links?ID={sobject_id}&DR=galah_dr3"
                   "&IDX=0&FILT={band}&RESPONSEFORMAT=fits",
    },
    "dr4": {
        "catalog": "https://cloud.datacentral.org.au/teamdata/GALAH/public/GALAH_DR4/"
                   "catalogs/galah_dr4_allstar_240705.fits",
        "spectra": "https://datacentral.org.au/vo/slink/links?ID={sobject_id}&DR=galah_dr4"
                   "&IDX=0&FILT={band}&RESPONSEFORMAT=fits",
    },
}

#: HERMES cameras: slink band letter and file suffix (1 blue ... 4 near-infrared).
GALAH_BANDS = (("B", 1), ("G", 2), ("R", 3), ("I", 4))

#: LAMOST low-resolution releases. ``xmatch`` lists VizieR tables joined on obsid (the first one
#: carries the positions); ``catalog`` a catalogue file used when VizieR does not hold the release.
LAMOST_RELEASES = {
    "dr4": {
        "spectra": "http://dr4.lamost.org/v2/spectrum/fits/{obsid}",
        "xmatch": ("vizier:V/153/dr4", "vizier:V/153/stellar"),
        "catalog": None,
    },
    "dr10": {
        "spectra": "https://www.lamost.org/dr10/v2.0/spectrum/fits/{obsid}",
        "xmatch": None,
        "catalog": "https://www.lamost.org/dr10/v2.0/catdl?name=dr10_v2.0_LRS_stellar.fits.gz",
    },
}

#: LAMOST DR8 v2.0 low-resolution spectra by obsid (the repeat visits of notebook 09). The same
#: scheme as the DR10 v2.0 address above; not confirmed for DR8 (see docs/data_sources.md).
LAMOST_DR8_SPECTRA = "https://www.lamost.org/dr8/v2.0/spectrum/fits/{obsid}"


def lamost_dr8_spectra() -> str:
    """The DR8 spectrum URL template: ``LAMOSTCANNON_LAMOST_DR8_URL`` or the default."""
    return _env("LAMOSTCANNON_LAMOST_DR8_URL", LAMOST_DR8_SPECTRA)


#: VizieR / XMatch identifiers.
GAIA_DR2 = "vizier:I/345/gaia2"
BAILER_JONES_2018 = "vizier:I/347/gaia2dis"
CANTAT_GAUDIN_2018 = "J/A+A/618/A93/members"
EL_BADRY_RIX_2018 = "J/MNRAS/480/4884"


def _env(name: str, default):
    value = os.environ.get(name, "").strip()
    return value or default


@dataclass
class Endpoints:
    """Addresses for one run; ``None`` fields take the environment variable or the default."""

    galah_release: str = "dr2.1"
    lamost_release: str = "dr4"
    vizier: str | None = None
    xmatch: str | None = None
    lamost_spectra: str | None = None
    lamost_catalog: str | None = None
    galah_catalog: str | None = None
    galah_spectra: str | None = None
    binaries: str | None = None
    lamost_xmatch: tuple[str, ...] | None = field(default=None)

    def __post_init__(self):
        self.galah_release = self.galah_release.lower()
        self.lamost_release = self.lamost_release.lower()
        if self.galah_release not in GALAH_RELEASES:
            raise ValueError(f"galah_release must be one of {sorted(GALAH_RELEASES)}, "
                             f"got {self.galah_release!r}")
        if self.lamost_release not in LAMOST_RELEASES:
            raise ValueError(f"lamost_release must be one of {sorted(LAMOST_RELEASES)}, "
                             f"got {self.lamost_release!r}")
        g, lm = GALAH_RELEASES[self.galah_release], LAMOST_RELEASES[self.lamost_release]
        self.vizier = self.vizier or _env("LAMOSTCANNON_VIZIER_URL", "https://vizier.cds.unistra.fr")
        self.xmatch = self.xmatch or _env("LAMOSTCANNON_XMATCH_URL",
                                          "http://cdsxmatch.u-strasbg.fr/xmatch/api/v1/sync")
        self.lamost_spectra = self.lamost_spectra or _env("LAMOSTCANNON_LAMOST_URL", lm["spectra"])
        self.lamost_catalog = self.lamost_catalog or _env("LAMOSTCANNON_LAMOST_CATALOG",
                                                          lm["catalog"])
        if self.lamost_xmatch is None:
            self.lamost_xmatch = None if self.lamost_catalog and not lm["xmatch"] else lm["xmatch"]
        self.galah_catalog = self.galah_catalog or _env("LAMOSTCANNON_GALAH_CATALOG", g["catalog"])
        self.galah_spectra = self.galah_spectra or _env("LAMOSTCANNON_GALAH_SPECTRA", g["spectra"])
        self.binaries = self.binaries or _env("LAMOSTCANNON_BINARIES_URL", None)
