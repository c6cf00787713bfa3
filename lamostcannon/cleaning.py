"""The reference set: GALAH x LAMOST cross-match, quality cuts and derived labels (paper section 2).

The steps, in the order :func:`build_reference_set` applies them (each counted in the cut report):

1. ``crossmatch``: 1 arcsec sky match of the GALAH DR2.1 catalogue with the LAMOST DR4 v2
   catalogue (:func:`crossmatch`). LAMOST observes many stars more than once; of the observations
   within 1 arcsec of a GALAH star we keep the one with the highest ``snrz`` (ties: the nearest).
   A LAMOST observation matched by two GALAH entries stays with the nearer one.
2. ``lamost_snrz``: LAMOST z-band S/N ``snrz < 30`` removed.
3. ``galah_snr_c1``: GALAH blue-channel S/N ``snr_c1 < 30`` removed.
4. ``chi2_cannon``: GALAH ``chi2_cannon > 4`` removed (poor global fit).
5. ``flag_cannon``: GALAH ``flag_cannon != 0`` removed.
6. ``lamost_params``: stars without finite LAMOST ``teff`` and ``logg`` (LAMOST writes -9999 when
   it has none) cannot be put on either side of eq. 1 and are removed.
7. ``labels_missing``: stars lacking a finite value of a label their model needs
   (:data:`lamostcannon.labels.DWARF_LABELS` / ``GIANT_LABELS``) are removed. Following the paper
   we do *not* remove stars because of GALAH's ``flag_<x>_fe`` (the windowed chi2 rule does that
   job, and the flags would shrink the set too much); ``drop_flagged_abundances=True`` treats
   flagged values as missing instead.
8. ``window_spectrum``: stars absent from ``galah/window_spectra.fits`` cannot be checked.
9. ``window_chi2``: the per-element chi2 between the GALAH best-fit model and the observed GALAH
   spectrum inside the element's GALAH line windows (paper Table 2, :data:`GALAH_WINDOWS`);
   a star is removed when, for any element its model uses as a label, its chi2 lies above the
   85th percentile of that element (:func:`percentile_rule`).

Derived labels (:func:`add_derived_labels`): ``alpha_fe`` is the error-weighted mean of
[Mg/Fe], [Si/Fe], [Ca/Fe], [Ti/Fe] and ``s_fe`` that of [Ba/Fe], [Y/Fe] (GALAH's own ``alpha_fe``
column is kept as ``alpha_fe_galah``). The dwarf/giant split is eq. 1 on the LAMOST ``teff`` and
``logg`` (:func:`lamostcannon.labels.is_giant`), stored as the boolean column ``giant``.

Air and vacuum wavelengths use the IAU standard of Morton (2000, ApJS 130, 403; the Edlen 1966
dispersion formula as refit by Birch & Downs 1994), see :func:`vacuum_to_air`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import subprocess
from pathlib import Path

import numpy as np

from . import __version__, labels as _labels, paths

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# GALAH line windows (paper appendix C, Table 2), air wavelengths in Angstrom.
# ---------------------------------------------------------------------------------------------

#: GALAH DR2 line windows of every element in Table 2 of Wheeler et al. (2020), keyed by the
#: lower-case element symbol; each value is a list of ``(lo, hi)`` *air* wavelengths in Angstrom.
#: The table lists 21 elements (Al, Ba, Ca, Co, Cr, Cu, Eu, K, La, Li, Mg, Mn, Na, Ni, O, Sc, Si,
#: Ti, V, Y, Zn); Fe has no windows there, so ``fe_h`` gets no windowed chi2.
GALAH_WINDOWS: dict[str, list[tuple[float, float]]] = {
    "al": [(6695.78, 6696.17), (6698.41, 6698.92), (7834.95, 7835.47), (7835.84, 7836.43)],
    "ba": [(5853.53, 5853.86), (6496.68, 6497.19)],
    "ca": [(5857.22, 5857.60), (5867.28, 5867.72), (6493.48, 6493.99), (6499.37, 6499.94),
           (6508.52, 6509.03)],
    "co": [(6632.23, 6632.81), (7712.41, 7713.07), (7837.76, 7838.50)],
    "cr": [(4775.03, 4775.21), (4789.20, 4789.47), (4800.83, 4801.20), (4847.98, 4848.31),
           (5702.12, 5702.50), (5719.50, 5719.99), (5787.64, 5788.14), (5844.40, 5844.79),
           (6629.80, 6630.25)],
    "cu": [(5781.92, 5782.42)],
    "eu": [(5818.61, 5818.99), (6644.97, 6645.29)],
    "k": [(7698.57, 7699.31)],
    "la": [(4716.29, 4716.61), (4748.62, 4748.85), (4803.92, 4804.24), (5805.52, 5805.96)],
    "li": [(6707.37, 6708.26)],
    "mg": [(4729.90, 4730.22), (5710.86, 5711.30)],
    "mn": [(4739.01, 4739.29), (4761.37, 4761.64), (4765.69, 4766.06), (4783.17, 4783.58)],
    "na": [(4751.71, 4751.94), (5682.54, 5682.92), (5687.93, 5688.37)],
    "ni": [(5748.21, 5748.59), (5846.82, 5847.21), (6482.60, 6483.05), (6532.58, 6533.10),
           (6586.02, 6586.47), (6643.37, 6643.94), (7713.89, 7714.48), (7788.48, 7789.29)],
    "o": [(7771.53, 7772.27), (7773.75, 7774.57), (7775.08, 7775.75)],
    "sc": [(4743.56, 4743.98), (4752.99, 4753.41), (5657.68, 5658.12), (5666.92, 5667.30),
           (5671.59, 5672.09), (5684.02, 5684.30), (5686.72, 5687.21), (5717.02, 5717.52),
           (5723.90, 5724.28), (6604.39, 6604.97)],
    "si": [(5665.21, 5665.82), (5690.18, 5690.68), (5700.91, 5701.29), (5792.70, 5793.31)],
    "ti": [(4719.32, 4719.60), (4757.96, 4758.28), (4759.07, 4759.48), (4764.40, 4764.82),
           (4778.06, 4778.43), (4781.56, 4781.93), (4797.84, 4798.12), (4798.35, 4798.63),
           (4801.80, 4802.21), (4820.11, 4820.66), (4849.04, 4849.41), (4865.28, 4865.83),
           (4873.88, 4874.20), (5689.25, 5689.80), (5716.25, 5716.80), (5720.27, 5720.65),
           (5739.24, 5739.68), (5866.02, 5866.79), (6598.89, 6599.53), (6716.52, 6716.90),
           (7852.19, 7853.01)],
    "v": [(4746.51, 4746.78), (4784.32, 4784.60), (4796.74, 4796.97), (4831.52, 4831.75),
          (4875.26, 4875.72), (5657.07, 5657.68), (5668.13, 5668.62), (5670.60, 5671.10),
          (5702.78, 5703.88), (5725.27, 5725.82), (5726.87, 5727.36), (5727.42, 5727.97),
          (5730.99, 5731.49), (5736.82, 5737.26), (5743.20, 5743.70), (6531.18, 6531.62)],
    "y": [(4854.79, 4855.02), (4883.54, 4883.82), (5662.74, 5663.18), (5728.74, 5729.01)],
    "zn": [(4721.99, 4722.27), (4810.36, 4810.63)],
}

#: Spectral resolution of the LAMOST low-resolution survey, lambda / FWHM.
LAMOST_RESOLUTION = 1800.0

#: Elements averaged into the derived labels.
DERIVED_LABELS = {"alpha_fe": _labels.ALPHA_ELEMENTS, "s_fe": _labels.S_PROCESS_ELEMENTS}

# ---------------------------------------------------------------------------------------------
# Air and vacuum wavelengths
# ---------------------------------------------------------------------------------------------


def _refractive_index(wavelength_vacuum):
    """Refractive index of standard air at a *vacuum* wavelength (Angstrom), Morton (2000) eq. 8."""
    s2 = (1e4 / np.asarray(wavelength_vacuum, dtype=float)) ** 2
    return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)


def vacuum_to_air(wavelength_vacuum):
    """Air wavelength (Angstrom) of a vacuum wavelength (Angstrom), IAU standard.

    ``lambda_air = lambda_vac / n(lambda_vac)`` with the refractive index of dry air at 15 C and
    101325 Pa of Morton (2000, ApJS 130, 403, eq. 8), the convention of VALD, SDSS and GALAH.
    Valid above 2000 A (the IAU convention quotes vacuum wavelengths below 2000 A).
    """
    wavelength_vacuum = np.asarray(wavelength_vacuum, dtype=float)
    return wavelength_vacuum / _refractive_index(wavelength_vacuum)


def air_to_vacuum(wavelength_air):
    """Vacuum wavelength (Angstrom) of an air wavelength (Angstrom), the inverse of
    :func:`vacuum_to_air`.

    Solves ``lambda_vac = lambda_air * n(lambda_vac)`` by fixed-point iteration, so that
    ``vacuum_to_air(air_to_vacuum(x)) == x`` to ~1e-10 A. 5000 A in air is 5001.394 A in vacuum.
    """
    wavelength_air = np.asarray(wavelength_air, dtype=float)
    vac = wavelength_air * _refractive_index(wavelength_air)
    for _ in range(4):  # dn/dlambda is tiny: each step gains ~4 digits
        vac = wavelength_air * _refractive_index(vac)
    return vac


# ---------------------------------------------------------------------------------------------
# Window masks on a pixel grid
# ---------------------------------------------------------------------------------------------


def pixel_edges(wavelength):
    """Edges (P+1,) of the pixels centred on a sorted wavelength grid (P,): midpoints between
    centres, the outer edges mirrored. Works for linear and log-uniform grids alike."""
    w = np.asarray(wavelength, dtype=float)
    if w.ndim != 1 or w.size < 2:
        raise ValueError(f"wavelength must be a 1-D grid of >= 2 pixels, got shape {w.shape}")
    if np.any(np.diff(w) <= 0):
        raise ValueError("wavelength must increase strictly")
    mid = 0.5 * (w[1:] + w[:-1])
    return np.concatenate([[w[0] - (mid[0] - w[0])], mid, [w[-1] + (w[-1] - mid[-1])]])


def _intervals(element_or_intervals):
    if isinstance(element_or_intervals, str):
        name = element_or_intervals.lower()
        if name in DERIVED_LABELS:
            return [iv for el in DERIVED_LABELS[name] for iv in GALAH_WINDOWS[el]]
        key = name.removesuffix("_fe")
        if key not in GALAH_WINDOWS:
            raise KeyError(f"no GALAH windows for {element_or_intervals!r}; "
                           f"known: {sorted(GALAH_WINDOWS)} and {sorted(DERIVED_LABELS)}")
        return GALAH_WINDOWS[key]
    arr = np.asarray(element_or_intervals, dtype=float).reshape(-1, 2)
    if np.any(arr[:, 1] < arr[:, 0]):
        raise ValueError("each interval must be (lo, hi) with lo <= hi")
    return [tuple(r) for r in arr]


def window_mask(wavelength_vacuum, element_or_intervals, *, min_halfwidth=None,
                resolution=LAMOST_RESOLUTION, grid_in_air=False):
    """Boolean pixel mask (P,) of the pixels covered by an element's GALAH line windows.

    Parameters
    ----------
    wavelength_vacuum : array (P,)
        Pixel-centre wavelengths, Angstrom, vacuum (e.g. the common LAMOST grid); strictly
        increasing.
    element_or_intervals : str or sequence of (lo, hi)
        An element of :data:`GALAH_WINDOWS` (``"mn"`` or ``"mn_fe"``), a derived label
        (``"alpha_fe"``: the union of Mg, Si, Ca, Ti; ``"s_fe"``: Ba and Y), or explicit
        intervals, always in *air* Angstrom as in Table 2 of the paper.
    min_halfwidth : float, optional
        Each window is widened, about its centre, to a half-width of at least this many Angstrom
        before pixels are selected. Default: half a resolution element, ``lambda / (2 R)``, so
        that the window spans at least one FWHM of the line-spread function (2.2 A at 4000 A,
        4.3 A at 7800 A for R = 1800; ~2-3 pixels of the common grid): at R ~ 1800 a 0.3 A GALAH
        window lies inside one pixel, but the line it measures is spread over one FWHM. Pass 0
        to take only the pixel(s) the window itself overlaps (right for high-resolution grids).
    resolution : float
        lambda / FWHM used by the default ``min_halfwidth``.
    grid_in_air : bool
        ``True`` when ``wavelength_vacuum`` is in fact an air grid (the GALAH window spectra):
        then the windows are not converted.

    Returns
    -------
    mask : bool array (P,)
        ``True`` for every pixel whose extent (between midpoints to its neighbours) overlaps a
        widened window. A window always selects at least the pixel(s) containing it when it lies
        on the grid.
    """
    edges = pixel_edges(wavelength_vacuum)
    iv = np.asarray(_intervals(element_or_intervals), dtype=float).reshape(-1, 2)
    if not grid_in_air:
        iv = air_to_vacuum(iv)
    centre = iv.mean(axis=1)
    half = 0.5 * (iv[:, 1] - iv[:, 0])
    if min_halfwidth is None:
        min_half = centre / (2.0 * resolution)
    else:
        min_half = np.broadcast_to(np.asarray(min_halfwidth, dtype=float), centre.shape)
        if np.any(min_half < 0):
            raise ValueError(f"min_halfwidth must be >= 0, got {min_halfwidth}")
    half = np.maximum(half, min_half)
    lo, hi = centre - half, centre + half
    mask = np.zeros(edges.size - 1, dtype=bool)
    for a, b in zip(lo, hi):
        # pixel i spans [edges[i], edges[i+1]); it overlaps [a, b] when edges[i] <= b and
        # edges[i+1] > a
        i0 = np.searchsorted(edges, a, side="right") - 1
        i1 = np.searchsorted(edges, b, side="right") - 1
        i0, i1 = max(i0, 0), min(i1, mask.size - 1)
        if i1 >= i0:
            mask[i0:i1 + 1] = True
    return mask


def label_elements(label_names) -> list[str]:
    """Elements (lower-case symbols) behind a list of labels: ``x_fe`` -> ``x``; ``alpha_fe`` ->
    Mg, Si, Ca, Ti; ``s_fe`` -> Ba, Y; stellar parameters and ``fe_h`` -> none."""
    out: list[str] = []
    for name in label_names:
        if name in DERIVED_LABELS:
            els = DERIVED_LABELS[name]
        elif name.endswith("_fe") and name != "fe_h":
            els = (name.removesuffix("_fe"),)
        else:
            els = ()
        out.extend(e for e in els if e not in out)
    return out


def label_windows(wavelength_vacuum, label_names, **kwargs) -> dict[str, np.ndarray]:
    """``{label: pixel mask}`` for each abundance label that has GALAH windows (``x_fe``,
    ``alpha_fe``, ``s_fe``), as :meth:`CannonModel.test` takes for ``chi2_x_fe``. Keyword
    arguments go to :func:`window_mask`."""
    out = {}
    for name in label_names:
        if label_elements([name]):
            out[name] = window_mask(wavelength_vacuum, name, **kwargs)
    return out


# ---------------------------------------------------------------------------------------------
# Windowed chi2 of the GALAH fits and the percentile rule
# ---------------------------------------------------------------------------------------------


def windowed_chi2(wavelength_air, flux, sigma, model, elements, *, reduced=True):
    """Per-element chi2 of the GALAH best-fit model inside the element's GALAH windows.

    ``chi2_e = sum_{pixels in windows of e} ((flux - model) / sigma)^2``, over pixels with finite
    flux, model and ``sigma > 0``; divided by the number of such pixels when ``reduced`` (the
    default, so that stars with masked pixels compare fairly; the percentile rule does not depend
    on this when no pixel is masked).

    Parameters
    ----------
    wavelength_air : array (P,)
        Air wavelengths (Angstrom) of the high-resolution pixels (``WAVE`` of
        ``galah/window_spectra.fits``).
    flux, sigma, model : arrays (S, P)
        Observed normalised flux, its 1-sigma error and the GALAH best-fit model.
    elements : iterable of str
        Elements of :data:`GALAH_WINDOWS`.

    Returns
    -------
    dict element -> array (S,); NaN where the star has no valid pixel in the windows.
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=float))
    model = np.atleast_2d(np.asarray(model, dtype=float))
    wave = np.asarray(wavelength_air, dtype=float)
    if not (flux.shape == sigma.shape == model.shape) or flux.shape[1] != wave.size:
        raise ValueError(f"flux {flux.shape}, sigma {sigma.shape} and model {model.shape} must all "
                         f"be (S, P) with P = len(wavelength_air) = {wave.size}")
    with np.errstate(invalid="ignore", divide="ignore"):
        z2 = ((flux - model) / sigma) ** 2
    valid = np.isfinite(z2) & (sigma > 0)
    z2 = np.where(valid, z2, 0.0)
    out = {}
    for el in elements:
        m = window_mask(wave, el, min_halfwidth=0.0, grid_in_air=True)
        n = valid[:, m].sum(axis=1)
        chi2 = z2[:, m].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[el] = np.where(n > 0, chi2 / n if reduced else chi2, np.nan)
    return out


def read_window_chi2(path, sobject_ids, elements, *, reduced=True):
    """Windowed chi2 (:func:`windowed_chi2`) for the stars ``sobject_ids`` from a
    ``galah/window_spectra.fits`` file (HDUs ``WAVE``, ``FLUX``, ``SIGMA``, ``MODEL``, ``OBJECTS``).

    Returns ``(chi2, found)``: dict element -> (S,) in the order of ``sobject_ids`` (NaN for stars
    not in the file) and a bool (S,) of the stars present.
    """
    from astropy.io import fits

    sobject_ids = np.asarray(sobject_ids)
    with fits.open(path, memmap=True) as hdul:
        ids = np.asarray(hdul["OBJECTS"].data["sobject_id"])
        wave = np.asarray(hdul["WAVE"].data, dtype=float)
        row_of = {v: i for i, v in enumerate(ids.tolist())}
        rows = np.array([row_of.get(v, -1) for v in sobject_ids.tolist()], dtype=int)
        found = rows >= 0
        take = rows[found]
        order = np.argsort(take)  # read rows in file order
        sel = take[order]
        data = {k: np.asarray(hdul[k].data[sel], dtype=float) for k in ("FLUX", "SIGMA", "MODEL")}
    part = windowed_chi2(wave, data["FLUX"], data["SIGMA"], data["MODEL"], elements,
                         reduced=reduced)
    out = {}
    for el, vals in part.items():
        full = np.full(sobject_ids.size, np.nan)
        idx = np.flatnonzero(found)[order]
        full[idx] = vals
        out[el] = full
    return out, found


def percentile_rule(chi2, use=None, q=85.0):
    """The paper's cut: drop a star whose windowed chi2 is above the ``q``-th percentile of that
    element, for any element it is judged on.

    Parameters
    ----------
    chi2 : dict element -> array (S,)
        Windowed chi2 per element (:func:`windowed_chi2`).
    use : dict element -> bool array (S,), optional
        Which stars are judged on each element (a dwarf is not judged on Al, which only the giant
        model uses). The percentile of an element is taken over the stars judged on it. Default:
        every star on every element.
    q : float
        Percentile, 85 in the paper (75 gave no gain in cross-validation).

    Returns
    -------
    keep : bool array (S,)
        ``False`` for stars above a threshold, or with a non-finite chi2 for an element they are
        judged on.
    thresholds : dict element -> float
    """
    if not chi2:
        raise ValueError("chi2 is empty: give at least one element")
    n = len(next(iter(chi2.values())))
    keep = np.ones(n, dtype=bool)
    thresholds = {}
    for el, values in chi2.items():
        values = np.asarray(values, dtype=float)
        if values.shape != (n,):
            raise ValueError(f"chi2[{el!r}] has shape {values.shape}, expected ({n},)")
        judged = np.ones(n, bool) if use is None else np.asarray(use[el], dtype=bool)
        finite = judged & np.isfinite(values)
        if not finite.any():
            thresholds[el] = np.nan
            keep &= ~judged
            continue
        thr = float(np.percentile(values[finite], q))
        thresholds[el] = thr
        with np.errstate(invalid="ignore"):
            bad = judged & ~(values <= thr)
        keep &= ~bad
    return keep, thresholds


# ---------------------------------------------------------------------------------------------
# Derived labels
# ---------------------------------------------------------------------------------------------


def error_weighted_mean(values, errors, axis=-1):
    """Inverse-variance weighted mean and its error.

    ``mean = sum(x_i / e_i^2) / sum(1 / e_i^2)``, ``error = (sum 1 / e_i^2)^(-1/2)``, over the
    entries with finite value and finite positive error. NaN where no entry is usable.

    Parameters
    ----------
    values, errors : arrays of the same shape (e.g. (S, K) for K elements per star)
    """
    x = np.asarray(values, dtype=float)
    e = np.asarray(errors, dtype=float)
    if x.shape != e.shape:
        raise ValueError(f"values {x.shape} and errors {e.shape} must have the same shape")
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(x) & np.isfinite(e) & (e > 0)
        w = np.where(ok, 1.0 / np.where(ok, e, 1.0) ** 2, 0.0)
        sw = w.sum(axis=axis)
        mean = np.where(sw > 0, (w * np.where(ok, x, 0.0)).sum(axis=axis) / sw, np.nan)
        err = np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan)
    return mean, err


def add_derived_labels(table, *, drop_flagged_abundances=False):
    """Add ``alpha_fe``/``e_alpha_fe`` (Mg, Si, Ca, Ti) and ``s_fe``/``e_s_fe`` (Ba, Y) in place.

    Error-weighted means (:func:`error_weighted_mean`) of the finite components with positive
    errors. A pre-existing ``alpha_fe`` column (GALAH's own) is renamed ``alpha_fe_galah``. With
    ``drop_flagged_abundances`` components whose ``flag_<x>_fe != 0`` are left out.
    """
    if "alpha_fe" in table.colnames and "alpha_fe_galah" not in table.colnames:
        table.rename_column("alpha_fe", "alpha_fe_galah")
        if "e_alpha_fe" in table.colnames:
            table.rename_column("e_alpha_fe", "e_alpha_fe_galah")
    for name, elements in DERIVED_LABELS.items():
        vals, errs = [], []
        for el in elements:
            v = np.asarray(_as_float(table[f"{el}_fe"]))
            e = np.asarray(_as_float(table[f"e_{el}_fe"]))
            if drop_flagged_abundances and f"flag_{el}_fe" in table.colnames:
                v = np.where(np.asarray(table[f"flag_{el}_fe"]) != 0, np.nan, v)
            vals.append(v)
            errs.append(e)
        mean, err = error_weighted_mean(np.stack(vals, -1), np.stack(errs, -1))
        table[name] = mean
        table[f"e_{name}"] = err
        what = "[alpha/Fe]: Mg, Si, Ca, Ti" if name == "alpha_fe" else "[s/Fe]: Ba, Y"
        table[name].description = f"Error-weighted mean {what} (GALAH DR2.1)"
        table[f"e_{name}"].description = f"Error of the error-weighted mean {what}"
        table[name].unit = table[f"e_{name}"].unit = "dex"
    return table


def _as_float(col):
    """A column as a float array with masked entries as NaN."""
    return np.ma.filled(np.ma.asarray(col, dtype=float), np.nan)


# ---------------------------------------------------------------------------------------------
# Cross-match
# ---------------------------------------------------------------------------------------------

#: LAMOST catalogue columns that keep their names in the reference set (others get ``lamost_``).
_LAMOST_KEEP = ("obsid", "designation", "filename")


def crossmatch(galah, lamost, radius_arcsec=1.0):
    """1 arcsec sky cross-match of GALAH stars with LAMOST observations.

    For each GALAH star, of the LAMOST observations within ``radius_arcsec`` the one with the
    highest ``snrz`` is kept (ties: the nearest); a LAMOST observation claimed by two GALAH entries
    goes to the nearer. Positions are compared as given (both catalogues are at epoch ~J2000 and
    LAMOST's input positions come from the same astrometric catalogues).

    Parameters
    ----------
    galah, lamost : astropy Tables with ``ra``, ``dec`` (deg); ``lamost`` also ``snrz``.

    Returns
    -------
    astropy Table, one row per matched GALAH star: the GALAH columns, the LAMOST columns prefixed
    ``lamost_`` (except ``obsid``, ``designation``, ``filename``), ``sep_arcsec`` and
    ``n_lamost_obs`` (observations within the radius).
    """
    import astropy.units as u
    from astropy.coordinates import SkyCoord, search_around_sky
    from astropy.table import Table, hstack

    for name, t, cols in (("galah", galah, ("ra", "dec")), ("lamost", lamost, ("ra", "dec", "snrz"))):
        missing = [c for c in cols if c not in t.colnames]
        if missing:
            raise KeyError(f"{name} table lacks columns {missing}")
    cg = SkyCoord(_as_float(galah["ra"]) * u.deg, _as_float(galah["dec"]) * u.deg)
    cl = SkyCoord(_as_float(lamost["ra"]) * u.deg, _as_float(lamost["dec"]) * u.deg)
    ig, il, sep, _ = search_around_sky(cg, cl, radius_arcsec * u.arcsec)
    sep = sep.to_value(u.arcsec)
    within = sep <= radius_arcsec
    ig, il, sep = ig[within], il[within], sep[within]
    n_obs = np.bincount(ig, minlength=len(galah))
    snr = np.nan_to_num(_as_float(lamost["snrz"])[il], nan=-np.inf)
    # best observation per GALAH star: highest snrz, then smallest separation
    order = np.lexsort((sep, -snr, ig))
    ig, il, sep = ig[order], il[order], sep[order]
    first = np.r_[True, ig[1:] != ig[:-1]]
    ig, il, sep = ig[first], il[first], sep[first]
    # one GALAH star per LAMOST observation: the nearest
    order = np.lexsort((sep, il))
    ig, il, sep = ig[order], il[order], sep[order]
    first = np.r_[True, il[1:] != il[:-1]]
    ig, il, sep = ig[first], il[first], sep[first]
    order = np.argsort(ig, kind="stable")
    ig, il, sep = ig[order], il[order], sep[order]

    left = Table(galah[ig], copy=True)
    right = Table(lamost[il], copy=True)
    for c in right.colnames:
        if c not in _LAMOST_KEEP:
            right.rename_column(c, f"lamost_{c}")
    for c in _LAMOST_KEEP:
        if c in right.colnames and c in left.colnames:
            right.rename_column(c, f"lamost_{c}")
    out = hstack([left, right], join_type="exact", metadata_conflicts="silent")
    out["sep_arcsec"] = sep
    out["sep_arcsec"].unit = "arcsec"
    out["sep_arcsec"].description = "GALAH - LAMOST separation"
    out["n_lamost_obs"] = n_obs[ig]
    out["n_lamost_obs"].description = "LAMOST observations within the match radius"
    out.meta = {}
    log.info("cross-match within %.2f arcsec: %d of %d GALAH stars matched (%d LAMOST obs)",
             radius_arcsec, len(out), len(galah), len(lamost))
    return out


# ---------------------------------------------------------------------------------------------
# The whole reference set
# ---------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "sobject_id": "GALAH DR2.1 spectrum identifier",
    "star_id": "GALAH (2MASS) star identifier",
    "ra": "Right ascension (GALAH)", "dec": "Declination (GALAH)",
    "teff": "Effective temperature (GALAH DR2.1)", "logg": "Surface gravity (GALAH DR2.1)",
    "vmic": "Microturbulence (GALAH DR2.1)", "fe_h": "[Fe/H] (GALAH DR2.1)",
    "obsid": "LAMOST observation identifier", "designation": "LAMOST designation",
    "filename": "LAMOST spectrum file name",
    "lamost_teff": "LAMOST pipeline effective temperature (used for the split, eq. 1)",
    "lamost_logg": "LAMOST pipeline surface gravity (used for the split, eq. 1)",
    "lamost_snrz": "LAMOST z-band signal-to-noise ratio",
    "lamost_z": "LAMOST redshift",
    "giant": "Giant model (eq. 1 on LAMOST teff, logg); False: dwarf model",
}


def _finalise_columns(table):
    for name in table.colnames:
        col = table[name]
        base = name.removeprefix("e_")
        if name in _DESCRIPTIONS and not col.description:
            col.description = _DESCRIPTIONS[name]
        if name.startswith("chi2w_"):
            col.description = (f"Reduced chi2 of the GALAH fit in the {name[6:].capitalize()} "
                               "windows (paper Table 2)")
        if col.unit is None and col.dtype.kind == "f":
            if base in ("teff", "lamost_teff", "lamost_teff_err"):
                col.unit = "K"
            elif base in ("vmic", "vsini"):
                col.unit = "km/s"
            elif base in ("ra", "dec"):
                col.unit = "deg"
            elif base in ("logg", "fe_h", "lamost_logg", "lamost_feh") or (
                    base.endswith("_fe") and not name.startswith("flag_")):
                col.unit = "dex"
        if name.startswith("e_") and not col.description:
            col.description = f"Error of {base}"
    return table


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=paths.ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(inputs: dict[str, Path] | None = None) -> dict:
    """Provenance record: package version, git commit, UTC date, sha256 of each input file."""
    rec = {"lamostcannon_version": __version__, "git_commit": _git_commit(),
           "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    for key, p in (inputs or {}).items():
        rec[f"sha256_{key}"] = _sha256(Path(p))
    return rec


def build_reference_set(raw_dir=None, *, radius_arcsec=1.0, min_snrz=30.0, min_snr_c1=30.0,
                        max_chi2_cannon=4.0, percentile=85.0, drop_flagged_abundances=False):
    """Build the reference (training) set from the raw GALAH and LAMOST files (paper section 2).

    Reads ``galah/catalog.fits``, ``lamost/catalog.fits`` and ``galah/window_spectra.fits`` under
    ``raw_dir`` (default :func:`lamostcannon.paths.raw_dir`) and applies the steps listed in the
    module docstring.

    Returns
    -------
    reference : astropy Table
        One row per reference star: GALAH labels and errors, derived ``alpha_fe``, ``s_fe``,
        LAMOST columns (``lamost_*``, ``obsid``, ``filename``), the per-element windowed chi2
        ``chi2w_<x>``, and ``giant``. ``meta`` holds the provenance (see :func:`provenance`) and
        the percentile thresholds.
    cut_report : pandas DataFrame
        One row per step: ``step``, ``description``, ``removed``, ``remaining``,
        ``fraction_removed`` (of what reached the step); then rows ``dwarfs`` and ``giants``.
    """
    import pandas as pd
    from astropy.table import Table

    raw_dir = Path(raw_dir) if raw_dir is not None else paths.raw_dir()
    files = {"galah_catalog": raw_dir / "galah" / "catalog.fits",
             "lamost_catalog": raw_dir / "lamost" / "catalog.fits",
             "galah_window_spectra": raw_dir / "galah" / "window_spectra.fits"}
    for key, p in files.items():
        if not p.is_file():
            raise FileNotFoundError(f"{key}: {p} is missing; run notebook 01 (download or mock) first")
    galah = Table.read(files["galah_catalog"])
    lamost = Table.read(files["lamost_catalog"])

    rows = []

    def record(step, description, before, after):
        removed = before - after
        rows.append({"step": step, "description": description, "removed": int(removed),
                     "remaining": int(after),
                     "fraction_removed": float(removed / before) if before else float("nan")})
        log.info("%-16s removed %6d, %6d left", step, removed, after)

    t = crossmatch(galah, lamost, radius_arcsec=radius_arcsec)
    rows.append({"step": "galah_catalog", "description": "GALAH DR2.1 stars", "removed": 0,
                 "remaining": len(galah), "fraction_removed": 0.0})
    record("crossmatch", f"no LAMOST observation within {radius_arcsec:g} arcsec",
           len(galah), len(t))

    def cut(step, description, keep):
        nonlocal t
        before = len(t)
        t = t[np.asarray(keep, dtype=bool)]
        record(step, description, before, len(t))

    with np.errstate(invalid="ignore"):
        cut("lamost_snrz", f"LAMOST snrz < {min_snrz:g}", _as_float(t["lamost_snrz"]) >= min_snrz)
        cut("galah_snr_c1", f"GALAH snr_c1 < {min_snr_c1:g}", _as_float(t["snr_c1"]) >= min_snr_c1)
        cut("chi2_cannon", f"GALAH chi2_cannon > {max_chi2_cannon:g}",
            _as_float(t["chi2_cannon"]) <= max_chi2_cannon)
    cut("flag_cannon", "GALAH flag_cannon != 0", np.asarray(t["flag_cannon"]) == 0)

    lteff, llogg = _as_float(t["lamost_teff"]), _as_float(t["lamost_logg"])
    has_params = _labels.pipeline_known(lteff, llogg)  # LAMOST's -9999 etc. count as missing
    cut("lamost_params", "no LAMOST teff/logg for the dwarf/giant split (eq. 1)", has_params)

    add_derived_labels(t, drop_flagged_abundances=drop_flagged_abundances)
    t["giant"] = _labels.is_giant(_as_float(t["lamost_teff"]), _as_float(t["lamost_logg"]))
    has_labels = np.zeros(len(t), dtype=bool)
    for giant in (False, True):
        sel = np.asarray(t["giant"]) == giant
        ok = np.ones(len(t), dtype=bool)
        for name in _labels.model_labels(giant):
            v = _as_float(t[name])
            if drop_flagged_abundances and f"flag_{name}" in t.colnames:
                v = np.where(np.asarray(t[f"flag_{name}"]) != 0, np.nan, v)
            ok &= np.isfinite(v)
        has_labels |= sel & ok
    cut("labels_missing", "a label of the star's model is missing"
        + (" or flagged" if drop_flagged_abundances else ""), has_labels)

    elements = label_elements(_labels.DWARF_LABELS + _labels.GIANT_LABELS)
    chi2, found = read_window_chi2(files["galah_window_spectra"], np.asarray(t["sobject_id"]),
                                   elements)
    for el in elements:
        t[f"chi2w_{el}"] = chi2[el]
    cut("window_spectrum", "no GALAH window spectrum to check", found)

    giant = np.asarray(t["giant"])
    dwarf_els, giant_els = (set(label_elements(_labels.model_labels(g))) for g in (False, True))
    chi2 = {el: _as_float(t[f"chi2w_{el}"]) for el in elements}
    use = {el: np.where(giant, el in giant_els, el in dwarf_els) for el in elements}
    keep, thresholds = percentile_rule(chi2, use, q=percentile)
    cut("window_chi2", f"windowed chi2 above the {percentile:g}th percentile for any label element",
        keep)

    n_giant = int(np.sum(t["giant"]))
    rows.append({"step": "dwarfs", "description": "reference dwarfs (eq. 1)", "removed": 0,
                 "remaining": len(t) - n_giant, "fraction_removed": float("nan")})
    rows.append({"step": "giants", "description": "reference giants (eq. 1)", "removed": 0,
                 "remaining": n_giant, "fraction_removed": float("nan")})
    report = pd.DataFrame(rows, columns=["step", "description", "removed", "remaining",
                                         "fraction_removed"])

    _finalise_columns(t)
    t.meta = provenance(files)
    t.meta.update({f"chi2w_p{percentile:g}_{el}": float(v) for el, v in thresholds.items()})
    t.meta["cuts"] = json.dumps({"radius_arcsec": radius_arcsec, "min_snrz": min_snrz,
                                 "min_snr_c1": min_snr_c1, "max_chi2_cannon": max_chi2_cannon,
                                 "percentile": percentile,
                                 "drop_flagged_abundances": drop_flagged_abundances})
    return t, report


# ---------------------------------------------------------------------------------------------
# FITS I/O that keeps 'dex' units and descriptions readable by any FITS reader
# ---------------------------------------------------------------------------------------------


def write_table_fits(table, path, overwrite=True):
    """Write an astropy Table to FITS keeping units (``dex`` too, which FITS does not know),
    column descriptions (``TCOMMn``) and ``meta`` (HIERARCH cards; non-scalar values as JSON).
    Written to a temporary name and renamed into place."""
    from astropy.io import fits

    path = Path(path)
    t = table.copy(copy_data=False)
    units = {}
    for name in t.colnames:
        if t[name].unit is not None:
            units[name] = t[name].unit.to_string()
            t[name].unit = None
        if t[name].dtype.kind == "O":
            t[name] = np.asarray(t[name], dtype=str)
    t.meta = {}
    hdu = fits.table_to_hdu(t)
    for i, name in enumerate(t.colnames, start=1):
        if name in units:
            hdu.header[f"TUNIT{i}"] = units[name]
        if table[name].description:
            hdu.header[f"TCOMM{i}"] = str(table[name].description)[:68]
    for key, value in table.meta.items():
        if not isinstance(value, (str, int, float, bool, np.integer, np.floating, np.bool_)):
            value = json.dumps(value)
        hdu.header[f"HIERARCH {key}"] = value
    hdu.name = "REFSET" if "giant" in table.colnames else hdu.name
    paths.ensure(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp, overwrite=True)
    if path.exists() and not overwrite:
        tmp.unlink()
        raise FileExistsError(f"{path} exists; pass overwrite=True")
    tmp.replace(path)
    log.info("wrote %s (%d rows)", path, len(table))
    return path


_SKIP_META = ("XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "TFIELDS", "EXTNAME")


def read_table_fits(path):
    """Read a table written by :func:`write_table_fits` (units, descriptions and meta restored)."""
    import astropy.units as u
    from astropy.io import fits
    from astropy.table import Table

    with fits.open(path) as hdul:
        hdu = hdul[1]
        header = hdu.header
        t = Table(hdu.data)  # no unit parsing here; done below
        t = Table(t, copy=True)
    for i, name in enumerate(t.colnames, start=1):
        if t[name].dtype.kind == "S":
            t[name] = np.char.decode(t[name], "ascii")
        elif t[name].dtype.byteorder == ">":  # FITS is big-endian; pandas/arrow want native
            t[name] = t[name].astype(t[name].dtype.newbyteorder("="))
        unit = header.get(f"TUNIT{i}")
        if unit:
            t[name].unit = u.Unit(unit, parse_strict="silent")
        if header.get(f"TCOMM{i}"):
            t[name].description = header[f"TCOMM{i}"]
    for key in header:
        if key.startswith(_SKIP_META) or key[:5] in ("TTYPE", "TFORM", "TUNIT", "TCOMM", "TDIM"):
            continue
        t.meta[key.lower() if key.isupper() and " " not in key else key] = header[key]
    return t


def write_reference_set(table, path=None, overwrite=True):
    """Write the reference set, default ``interim/reference_set.fits``."""
    path = Path(path) if path is not None else paths.interim_dir() / "reference_set.fits"
    return write_table_fits(table, path, overwrite=overwrite)


def read_reference_set(path=None):
    """Read ``interim/reference_set.fits`` (or ``path``) with units and descriptions."""
    path = Path(path) if path is not None else paths.interim_dir() / "reference_set.fits"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run notebook 02_cleaning first")
    return read_table_fits(path)


# ---------------------------------------------------------------------------------------------
# Spectra of the reference stars
# ---------------------------------------------------------------------------------------------


def reference_spectra_files(reference, raw_dir=None) -> list[Path]:
    """Paths ``raw_dir/lamost/spectra/<filename>`` of the reference stars' LAMOST spectra."""
    raw_dir = Path(raw_dir) if raw_dir is not None else paths.raw_dir()
    return [raw_dir / "lamost" / "spectra" / str(f).strip() for f in reference["filename"]]


def ingest_reference_spectra(reference, raw_dir=None, store_path=None, **kwargs):
    """Preprocess and store the reference stars' spectra in ``interim/reference_spectra.zarr``
    with :func:`lamostcannon.spectra.ingest` (keyword arguments are passed on). Returns its
    report."""
    from . import spectra

    store_path = Path(store_path) if store_path is not None else (
        paths.interim_dir() / "reference_spectra.zarr")
    paths.ensure(store_path.parent)
    files = reference_spectra_files(reference, raw_dir)
    missing = [f for f in files if not f.is_file()]
    if missing:
        log.warning("%d reference spectra are missing, e.g. %s", len(missing), missing[0])
    return spectra.ingest(files, store_path, **kwargs)


def load_training_set(giant: bool, reference=None, store_path=None):
    """Labels and spectra of one model's reference stars, row-aligned.

    Parameters
    ----------
    giant : bool
        ``True`` for the giant model, ``False`` for the dwarf model (column ``giant``).
    reference : astropy Table, optional
        Default :func:`read_reference_set`.
    store_path : path, optional
        Default ``interim/reference_spectra.zarr``.

    Returns
    -------
    table : astropy Table (S rows) of the group's reference stars that have a stored spectrum
    flux, ivar : float32 arrays (S, P) from the store, in the order of ``table``
    wavelength : array (P,), the common grid
    """
    from .spectra import SpectraStore

    reference = read_reference_set() if reference is None else reference
    store_path = Path(store_path) if store_path is not None else (
        paths.interim_dir() / "reference_spectra.zarr")
    if not Path(store_path).exists():
        raise FileNotFoundError(f"{store_path} is missing; run notebook 02_cleaning first")
    group = reference[np.asarray(reference["giant"], dtype=bool) == bool(giant)]
    with SpectraStore.open(store_path, "r") as store:
        rows = store.rows_for(np.asarray(group["obsid"], dtype=np.int64))
        have = rows >= 0
        if not have.all():
            log.warning("%d of %d %s reference stars have no stored spectrum; left out",
                        int((~have).sum()), len(group), "giant" if giant else "dwarf")
        group = group[have]
        flux, ivar = store.read(rows[have])
        wavelength = np.asarray(store.wavelength)
    return group, np.asarray(flux), np.asarray(ivar), wavelength


def training_label_errors(table, label_names) -> np.ndarray:
    """The training-label errors the notebooks' dwarf model corrects for: the ``[X/Fe]`` labels'.

    Returns the (S, L) array for ``CannonModel.train(label_errors=...)`` and
    ``validation.cross_validate(label_errors=...)``: ``e_<x>_fe`` for every abundance ratio
    (``fe_h`` excluded) and 0 for teff, logg, vmic and [Fe/H], which then enter training as
    given. A missing ``e_`` column or a NaN error also gives 0 (that label of that star is not
    corrected).

    Why the abundances only: GALAH's abundance errors are as large as much of the labels'
    spread, so a model fitted to them as given learns attenuated derivatives and infers
    abundances stretched away from the mean, by a factor that changes with teff; a group of
    stars of one composition then shows a teff trend that depends on its composition, which no
    correction in (teff, logg) can remove. Fitted instead to the abundances' regression
    calibration (:func:`lamostcannon.cannon.regression_calibrate`, linear in all labels), the
    mock's dwarf abundances move 1.3-3x closer to the truth (3000 field dwarfs of the ``large``
    mock: [O/Fe] 0.37 -> 0.16 dex rms, [Eu/Fe] 0.50 -> 0.20, [alpha/Fe] 0.14 -> 0.07, [Sc/Fe]
    0.27 -> 0.09, [s/Fe] 0.25 -> 0.20; teff 126 -> 125 K) and the clusters' teff trends agree
    2-4x better (``benchmarks/study_abundance_errors.py``). The giant model is not corrected:
    with its abundances corrected the quadratic model's coefficients grow to several units of
    normalised flux per standard deviation of a label and its [Fe/H] gets worse (the same study,
    ``--group giant``). Correcting teff and logg too is worse for the dwarfs: their logg error is as large as the main sequence's logg spread, the calibrated
    logg then follows teff and teff triples (``benchmarks/study_label_noise.py``).
    """
    names = [str(n) for n in label_names]
    cols = list(table.colnames) if hasattr(table, "colnames") else list(table.keys())
    if not cols:
        raise ValueError("the training table has no columns")
    n = len(np.asarray(table[cols[0]]))
    out = np.zeros((n, len(names)))
    for k, name in enumerate(names):
        if name.endswith("_fe") and name != "fe_h" and f"e_{name}" in cols:
            e = np.asarray(table[f"e_{name}"], dtype=float)
            out[:, k] = np.where(np.isfinite(e) & (e > 0), e, 0.0)
    return out


def read_window_spectrum(path, sobject_id) -> dict[str, np.ndarray]:
    """The GALAH high-resolution pixels of one star from a ``galah/window_spectra.fits`` file
    (HDUs ``WAVE``, ``FLUX``, ``SIGMA``, ``MODEL``, ``OBJECTS``), as used by paper Fig. 2.

    The file holds only the pixels in and around the Table 2 line windows, so ``wave`` has gaps.

    Parameters
    ----------
    path : path-like
        The window-spectra file.
    sobject_id : int
        GALAH DR2.1 spectrum identifier (column ``sobject_id`` of ``OBJECTS``).

    Returns
    -------
    dict with float arrays (P,): ``wave`` (air, Angstrom, as stored), ``wave_vacuum``
    (:func:`air_to_vacuum` of it), ``flux`` (normalised), ``sigma`` (its 1-sigma error) and
    ``model`` (GALAH's best-fit synthetic spectrum).

    Raises
    ------
    KeyError
        When the star is not in the file.
    """
    from astropy.io import fits

    with fits.open(path, memmap=True) as hdul:
        ids = np.asarray(hdul["OBJECTS"].data["sobject_id"])
        hit = np.flatnonzero(ids == int(sobject_id))
        if hit.size == 0:
            raise KeyError(f"sobject_id {sobject_id} is not among the {ids.size} stars of {path}")
        row = int(hit[0])
        wave = np.asarray(hdul["WAVE"].data, dtype=float)
        out = {k.lower(): np.asarray(hdul[k].data[row], dtype=float)
               for k in ("FLUX", "SIGMA", "MODEL")}
    return {"wave": wave, "wave_vacuum": air_to_vacuum(wave), **out}


def with_true_labels(reference, truth, key: str = "sobject_id"):
    """A copy of the reference set whose labels are the mock universe's true ones.

    The stellar parameters and every ``<x>_fe`` are taken from ``truth`` (rows matched on
    ``key``); the derived ``alpha_fe`` and ``s_fe`` are then recomputed with the reference set's
    own GALAH errors as weights, so that they mean the same thing as the labels the models were
    trained on. Used only to compare with the truth, never by the pipeline.

    Parameters
    ----------
    reference : astropy Table
        The reference set (:func:`read_reference_set`).
    truth : astropy Table
        ``truth/truth.fits`` of the mock universe, with ``key`` and the label columns.
    key : str
        Identifier shared by both tables.

    Raises
    ------
    KeyError
        A reference star is missing from ``truth``.
    """
    row_of = {k: i for i, k in enumerate(np.asarray(truth[key]).tolist())}
    missing = [k for k in np.asarray(reference[key]).tolist() if k not in row_of]
    if missing:
        raise KeyError(f"{len(missing)} reference stars have no row in the truth table "
                       f"(first: {missing[0]!r})")
    rows = np.array([row_of[k] for k in np.asarray(reference[key]).tolist()], dtype=np.int64)
    out = reference.copy()
    for name in _labels.STELLAR + tuple(f"{x}_fe" for x in _labels.ELEMENTS):
        out[name] = np.asarray(_as_float(truth[name]))[rows]
    return add_derived_labels(out)
