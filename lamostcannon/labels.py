"""Label names and label sets shared by every step (GALAH-style, lower case).

Stellar parameters are ``teff`` (K), ``logg`` (log10 cm s^-2), ``vmic`` (km/s) and ``fe_h`` (dex);
abundance ratios are ``<x>_fe`` (dex). ``alpha_fe`` is the error-weighted mean of Mg, Si, Ca and Ti
and ``s_fe`` the error-weighted mean of Ba and Y (paper section 2).
"""

from __future__ import annotations

#: Stellar parameters common to both models.
STELLAR = ("teff", "logg", "vmic", "fe_h")

#: GALAH elements used by the paper (each as ``<x>_fe``).
ELEMENTS = ("o", "mg", "al", "si", "ca", "sc", "ti", "mn", "y", "ba", "eu")

#: Elements averaged into the derived labels.
ALPHA_ELEMENTS = ("mg", "si", "ca", "ti")
S_PROCESS_ELEMENTS = ("ba", "y")

#: Label set of the dwarf model (paper section 2.3).
DWARF_LABELS = ("teff", "logg", "vmic", "fe_h", "o_fe", "eu_fe", "alpha_fe", "sc_fe", "s_fe")

#: Label set of the giant model (paper section 2.3).
GIANT_LABELS = ("teff", "logg", "vmic", "fe_h", "o_fe", "eu_fe", "mg_fe", "al_fe", "mn_fe", "ba_fe")

#: Units for table columns.
UNITS = {"teff": "K", "logg": "dex", "vmic": "km/s", "fe_h": "dex"}


def unit(label: str) -> str:
    """Unit of a label: K, km/s or dex."""
    return UNITS.get(label, "dex")


def model_labels(giant: bool) -> tuple[str, ...]:
    """The label set of the giant (``True``) or dwarf (``False``) model."""
    return GIANT_LABELS if giant else DWARF_LABELS


def is_giant(teff, logg):
    """Dwarf/giant split of the paper's eq. 1, on LAMOST teff (K) and logg.

    A star is a giant when ``logg < 4.18`` for ``teff < 5200 K``, and when
    ``logg < -6e-4 * teff + 7.3`` otherwise. Works elementwise on arrays; NaN and non-physical
    pipeline values (LAMOST's ``-9999``, see :func:`pipeline_value`) give ``False``; use
    :func:`pipeline_known` to tell "dwarf" from "unknown".
    """
    import numpy as np

    teff = pipeline_value(teff, "teff")
    logg = pipeline_value(logg, "logg")
    boundary = np.where(teff < 5200.0, 4.18, -6e-4 * teff + 7.3)
    with np.errstate(invalid="ignore"):
        return logg < boundary


#: Physically possible ranges of LAMOST pipeline (LASP) parameters; anything outside (LAMOST's
#: ``-9999`` sentinel, ``+9999``, zeros written for "not measured", NaN, inf) is missing.
PIPELINE_RANGES = {"teff": (2000.0, 60000.0), "logg": (-1.0, 6.5), "fe_h": (-5.0, 1.5),
                   "feh": (-5.0, 1.5)}


def pipeline_value(values, label: str):
    """LAMOST pipeline (LASP) values with every non-physical entry read as missing (NaN).

    LAMOST writes ``-9999`` (and in some releases ``-9999.00`` errors or ``0``) where its
    pipeline gave no parameters. This is the one place where those sentinels are recognised;
    :mod:`lamostcannon.catalog`, :mod:`lamostcannon.cleaning` and :mod:`lamostcannon.real` read
    pipeline labels through it.

    Parameters
    ----------
    values : array_like (S,)
        teff (K), logg (dex) or [Fe/H] (dex); masked entries count as missing.
    label : str
        ``"teff"``, ``"logg"``, ``"fe_h"`` (or ``"feh"``); any other label only loses
        non-finite values and sentinels with ``|x| >= 9000``.

    Returns
    -------
    float ndarray (S,), NaN where the value is missing or outside :data:`PIPELINE_RANGES`.
    """
    import numpy as np

    x = np.ma.filled(np.ma.asarray(values, dtype=float), np.nan).astype(float, copy=True)
    lo, hi = PIPELINE_RANGES.get(label, (-9000.0, 9000.0))
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(x) | (x <= lo) | (x >= hi)
    x[bad] = np.nan
    return x


def pipeline_known(teff, logg):
    """True where both pipeline teff and logg are physical (:func:`pipeline_value`)."""
    import numpy as np

    return np.isfinite(pipeline_value(teff, "teff")) & np.isfinite(pipeline_value(logg, "logg"))
