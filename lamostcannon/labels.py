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
    ``logg < -6e-4 * teff + 7.3`` otherwise. Works elementwise on arrays; NaN gives ``False``.
    """
    import numpy as np

    teff = np.asarray(teff, dtype=float)
    logg = np.asarray(logg, dtype=float)
    boundary = np.where(teff < 5200.0, 4.18, -6e-4 * teff + 7.3)
    with np.errstate(invalid="ignore"):
        return logg < boundary
