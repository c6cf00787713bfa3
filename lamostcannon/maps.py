"""Binned abundance maps and the disk-halo transition samples (paper sections 5.3 and 5.4).

* Fig 10: mean label in ``(R, z)`` bins, ``7.5 < R < 15 kpc``, ``-4 < z < 4 kpc`` (giants).
* Fig 11: thin disk (``Jz < 30 kpc km/s``) mean labels in ``(X, Y)``.
* Fig 12: thin disk giants (``logg < 3``) in ``(R, v_phi)``.
* Figs 13, 14: ``[X/Fe]`` against ``[Fe/H]`` in ``(R, |z|)`` bins, at most 700 random stars per
  bin; for Ba only ``4800 < teff < 5000 K``.

Coordinates follow :mod:`lamostcannon.kinematics`: ``X, Y, R, z`` [kpc]; ``vphi`` [km/s] is
positive for prograde (disk) stars; ``Jz`` [kpc km/s]. A bin with fewer than ``min_count``
stars with a finite value of a label is NaN in that label's map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

#: Fig 10 extent [kpc].
RZ_RANGE = {"R": (7.5, 15.0), "z": (-4.0, 4.0)}
#: Thin-disk cut on the vertical action [kpc km/s] (Figs 11, 12).
THIN_DISK_JZ_MAX = 30.0
#: Giants-only cut of Fig 12.
RVPHI_LOGG_MAX = 3.0
#: Stars drawn per (R, |z|) bin in Figs 13, 14.
HALO_N_PER_BIN = 700
#: Default (R, |z|) bins of Figs 13, 14 [kpc] (the paper's text names 3-5 and 11-13 kpc in R and
#: 2-4 and 4-6 kpc in |z|).
HALO_R_BINS = ((3.0, 5.0), (7.0, 9.0), (11.0, 13.0))
HALO_ABSZ_BINS = ((0.0, 2.0), (2.0, 4.0), (4.0, 6.0))
#: teff window [K] per element for the halo-transition plots (Ba only, paper Fig 13).
HALO_TEFF_RANGE = {"ba_fe": (4800.0, 5000.0)}
#: The paper's working quality cut on the whole-spectrum chi^2 (section 5: "chi2 < 7000").
PAPER_CHI2_MAX = 7000.0


@dataclass
class LabelMaps:
    """Mean-label maps on one 2-d grid.

    ``x_edges`` (nx+1,), ``y_edges`` (ny+1,); ``mean[label]``, ``count[label]`` and
    ``std[label]`` are (nx, ny) arrays (index ``[i, j]`` is x bin i, y bin j; transpose for
    ``imshow``/``pcolormesh``). ``n_stars`` is the number of stars in the selection.
    """

    x: str
    y: str
    x_edges: np.ndarray
    y_edges: np.ndarray
    mean: dict = field(default_factory=dict)
    count: dict = field(default_factory=dict)
    std: dict = field(default_factory=dict)
    min_count: int = 1
    n_stars: int = 0

    @property
    def labels(self):
        return list(self.mean)

    @property
    def x_centers(self):
        return 0.5 * (self.x_edges[1:] + self.x_edges[:-1])

    @property
    def y_centers(self):
        return 0.5 * (self.y_edges[1:] + self.y_edges[:-1])

    def to_frame(self):
        """Long table: one row per (x bin, y bin) with ``<label>``, ``n_<label>`` columns."""
        import pandas as pd

        xc, yc = np.meshgrid(self.x_centers, self.y_centers, indexing="ij")
        data = {self.x: xc.ravel(), self.y: yc.ravel()}
        for lab in self.labels:
            data[lab] = self.mean[lab].ravel()
            data[f"n_{lab}"] = self.count[lab].ravel()
        return pd.DataFrame(data)


def add_cartesian(table):
    """Return a DataFrame copy of ``table`` with ``X``, ``Y`` [kpc] and ``vphi`` [km/s] added.

    The catalogue (paper Table 1) stores Galactocentric cylindrical ``R``, ``phi`` [rad] and
    ``vT``; in the right-handed frame of :mod:`lamostcannon.kinematics` (Sun at ``X = +8``,
    ``phi = atan2(Y, X)``) ``X = R cos(phi)``, ``Y = R sin(phi)`` and ``vphi = -vT`` (positive
    for prograde, disk stars). Columns already present are left as they are.
    """
    import pandas as pd

    df = (table if isinstance(table, pd.DataFrame) else table.to_pandas()).copy()
    R, phi = _col(df, "R"), _col(df, "phi")
    if "X" not in df.columns:
        df["X"] = R * np.cos(phi)
    if "Y" not in df.columns:
        df["Y"] = R * np.sin(phi)
    if "vphi" not in df.columns:
        df["vphi"] = -_col(df, "vT")
    return df


def quality_mask(table, chi2_max=PAPER_CHI2_MAX, *, flag_column=None, bad_flags=None,
                 labels=None):
    """Rows usable for science (True = use).

    * ``quality_flag == 0`` (:data:`lamostcannon.labelling.QUALITY_BITS`: no extrapolation of
      teff/logg/[Fe/H], inside the training range, no label at a test-step bound, converged, one
      minimum, a good fit, like the training set, pipeline parameters, enough S/N, a star); for a
      table without ``quality_flag`` (older catalogues), none of the ``bad_flags`` bits of
      ``flag_column`` (default ``flag`` and :data:`lamostcannon.catalog.BAD_FLAGS`);
    * finite ``chi2 < chi2_max`` (the paper's working cut; ``chi2_max=None`` skips it);
    * for each name in ``labels``: the label is finite and its ``<label>_extrap`` flag (KDE
      boundary of that label, for any combined observation) is not set.

    Returns a boolean array (S,).
    """
    cols = list(getattr(table, "colnames", None) or getattr(table, "columns", []))
    chi2 = _col(table, "chi2")
    ok = np.isfinite(chi2)
    if chi2_max is not None:
        with np.errstate(invalid="ignore"):
            ok &= chi2 < chi2_max
    if flag_column is None and "quality_flag" in cols and bad_flags is None:
        ok &= np.asarray(table["quality_flag"]).astype(np.int64) == 0
    else:
        flag_column = flag_column or "flag"
        if flag_column in cols:
            if bad_flags is None:
                from .catalog import BAD_FLAGS as bad_flags
            ok &= (np.asarray(table[flag_column]).astype(np.int64) & int(bad_flags)) == 0
    for lab in labels or ():
        ok &= np.isfinite(_col(table, lab))
        if f"{lab}_extrap" in cols:
            ok &= ~np.asarray(table[f"{lab}_extrap"], bool)
    return ok


def mask_extrapolated(table, labels):
    """A DataFrame copy with each label NaN where its ``<label>_extrap`` flag is set.

    Per-label maps (Figs 10-14) then leave out exactly the values beyond their KDE boundaries and
    keep the star's other labels. Returns ``(frame, removed)`` with ``removed`` a dict label ->
    number of values set to NaN.
    """
    import pandas as pd

    df = (table if isinstance(table, pd.DataFrame) else table.to_pandas()).copy()
    removed = {}
    for lab in labels:
        col = f"{lab}_extrap"
        if col not in df.columns or lab not in df.columns:
            removed[lab] = 0
            continue
        bad = df[col].to_numpy(bool) & np.isfinite(df[lab].to_numpy(float))
        removed[lab] = int(bad.sum())
        df.loc[bad, lab] = np.nan
    return df, removed


def _edges(lo, hi, step):
    n = max(int(round((hi - lo) / step)), 1)
    return np.linspace(lo, hi, n + 1)


def _bin_index(values, edges):
    """Bin index in [0, n) or -1 outside (right edge included in the last bin)."""
    v = np.asarray(values, float)
    idx = np.searchsorted(edges, v, side="right") - 1
    idx[v == edges[-1]] = len(edges) - 2
    idx[~np.isfinite(v) | (idx < 0) | (idx >= len(edges) - 1)] = -1
    return idx


def binned_maps(x, y, values, x_edges, y_edges, *, min_count=10, x_name="x", y_name="y"):
    """Mean of each label in 2-d bins.

    Parameters
    ----------
    x, y : arrays (S,) of the two coordinates.
    values : dict ``{label: array (S,)}`` (or a DataFrame: every column is a label).
    x_edges, y_edges : bin edges (nx+1,), (ny+1,); stars outside are ignored.
    min_count : bins with fewer finite values of a label are NaN in its map.

    Returns
    -------
    :class:`LabelMaps`.
    """
    x_edges, y_edges = np.asarray(x_edges, float), np.asarray(y_edges, float)
    nx, ny = len(x_edges) - 1, len(y_edges) - 1
    ix, iy = _bin_index(x, x_edges), _bin_index(y, y_edges)
    inside = (ix >= 0) & (iy >= 0)
    flat = ix * ny + iy
    out = LabelMaps(x_name, y_name, x_edges, y_edges, min_count=int(min_count),
                    n_stars=int(inside.sum()))
    items = values.items() if hasattr(values, "items") else None
    if items is None:
        raise TypeError("values must be a dict {label: array} or a DataFrame")
    for lab, v in items:
        v = np.asarray(v, float)
        if v.shape != np.shape(x):
            raise ValueError(f"label {lab!r} has shape {v.shape}, coordinates {np.shape(x)}")
        ok = inside & np.isfinite(v)
        n = np.bincount(flat[ok], minlength=nx * ny).astype(float)
        s1 = np.bincount(flat[ok], weights=v[ok], minlength=nx * ny)
        s2 = np.bincount(flat[ok], weights=v[ok] ** 2, minlength=nx * ny)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s1 / n
            var = (s2 - n * mean**2) / (n - 1)
        good = n >= max(min_count, 1)
        mean[~good] = np.nan
        std = np.sqrt(np.clip(var, 0, None))
        std[~good | (n < 2)] = np.nan
        out.mean[lab] = mean.reshape(nx, ny)
        out.std[lab] = std.reshape(nx, ny)
        out.count[lab] = n.astype(int).reshape(nx, ny)
    return out


def _col(table, name):
    try:
        return np.asarray(table[name], float)
    except KeyError:
        cols = list(getattr(table, "colnames", None) or getattr(table, "columns", []))
        raise KeyError(f"column {name!r} not in the table ({cols})") from None


def _select(table, mask):
    mask = np.asarray(mask, bool)
    if hasattr(table, "loc"):
        return table.loc[mask]
    return table[mask]


def rz_maps(table, labels, *, R_range=RZ_RANGE["R"], z_range=RZ_RANGE["z"], step=(0.25, 0.25),
            min_count=10):
    """Fig 10: mean labels in ``(R, z)`` bins of ``step`` kpc over the paper's extent.

    ``table`` holds ``R``, ``z`` and the labels (select giants and ``chi2 < 7000`` before)."""
    return binned_maps(_col(table, "R"), _col(table, "z"), {lab: _col(table, lab) for lab in labels},
                       _edges(*R_range, step[0]), _edges(*z_range, step[1]), min_count=min_count,
                       x_name="R", y_name="z")


def thin_disk(table, jz_max=THIN_DISK_JZ_MAX):
    """Rows with ``Jz < jz_max`` [kpc km/s] (kinematic thin disk); NaN ``Jz`` is excluded."""
    with np.errstate(invalid="ignore"):
        return _select(table, _col(table, "Jz") < jz_max)


def xy_maps(table, labels, *, X_range=(0.0, 20.0), Y_range=(-10.0, 10.0), step=(0.5, 0.5),
            min_count=10, jz_max=THIN_DISK_JZ_MAX):
    """Fig 11: thin-disk (``Jz < jz_max``) mean labels in ``(X, Y)`` (kinematics frame: Sun at
    ``X = 8, Y = 0``). ``jz_max=None`` skips the cut."""
    t = table if jz_max is None else thin_disk(table, jz_max)
    return binned_maps(_col(t, "X"), _col(t, "Y"), {lab: _col(t, lab) for lab in labels},
                       _edges(*X_range, step[0]), _edges(*Y_range, step[1]), min_count=min_count,
                       x_name="X", y_name="Y")


def rvphi_maps(table, labels, *, R_range=(5.0, 15.0), vphi_range=(100.0, 320.0),
               step=(0.1, 2.0), min_count=10, jz_max=THIN_DISK_JZ_MAX, logg_max=RVPHI_LOGG_MAX):
    """Fig 12: thin-disk giants (``Jz < jz_max``, ``logg < logg_max``) in ``(R, v_phi)``;
    ``vphi`` [km/s] is positive for prograde stars."""
    t = table if jz_max is None else thin_disk(table, jz_max)
    if logg_max is not None:
        with np.errstate(invalid="ignore"):
            t = _select(t, _col(t, "logg") < logg_max)
    return binned_maps(_col(t, "R"), _col(t, "vphi"), {lab: _col(t, lab) for lab in labels},
                       _edges(*R_range, step[0]), _edges(*vphi_range, step[1]),
                       min_count=min_count, x_name="R", y_name="vphi")


def halo_sample(table, element, *, R_bins=HALO_R_BINS, absz_bins=HALO_ABSZ_BINS,
                n_per_bin=HALO_N_PER_BIN, teff_range="auto", rng=None, seed=None):
    """Figs 13, 14: up to ``n_per_bin`` random stars with finite ``element`` and ``fe_h`` in each
    ``(R, |z|)`` bin.

    Parameters
    ----------
    table : DataFrame with ``R``, ``z``, ``fe_h``, ``teff``, ``element`` (and e.g. ``JR``,
        ``vphi`` for colours).
    element : label name, e.g. ``"ba_fe"``.
    R_bins, absz_bins : sequences of ``(lo, hi)`` [kpc] (bins may leave gaps; ``lo <= x < hi``).
    teff_range : ``(lo, hi)`` [K], ``None`` (no cut) or ``"auto"`` (``HALO_TEFF_RANGE`` of the
        element: 4800-5000 K for Ba, none otherwise).
    rng, seed : a ``numpy.random.Generator`` or a seed (one of them; default seed 0).

    Returns
    -------
    DataFrame: the selected rows (original index kept) plus ``R_bin``, ``absz_bin`` (integer
    positions in ``R_bins`` / ``absz_bins``), ordered by bin, then by the random draw.
    """
    import pandas as pd

    if rng is None:
        rng = np.random.default_rng(0 if seed is None else seed)
    elif seed is not None:
        raise ValueError("give rng or seed, not both")
    if teff_range == "auto":
        teff_range = HALO_TEFF_RANGE.get(element)
    df = table if isinstance(table, pd.DataFrame) else table.to_pandas()
    R, absz = _col(df, "R"), np.abs(_col(df, "z"))
    ok = np.isfinite(_col(df, element)) & np.isfinite(_col(df, "fe_h"))
    if teff_range is not None:
        teff = _col(df, "teff")
        with np.errstate(invalid="ignore"):
            ok &= (teff > teff_range[0]) & (teff < teff_range[1])
    parts = []
    for i, (rlo, rhi) in enumerate(R_bins):
        for j, (zlo, zhi) in enumerate(absz_bins):
            with np.errstate(invalid="ignore"):
                idx = np.flatnonzero(ok & (R >= rlo) & (R < rhi) & (absz >= zlo) & (absz < zhi))
            if idx.size > n_per_bin:
                idx = rng.choice(idx, size=n_per_bin, replace=False)
            part = df.iloc[idx].copy()
            part["R_bin"], part["absz_bin"] = i, j
            parts.append(part)
            log.debug("halo_sample %s: R %s-%s |z| %s-%s: %d stars", element, rlo, rhi, zlo, zhi, idx.size)
    return pd.concat(parts) if parts else df.iloc[:0].assign(R_bin=[], absz_bin=[])


# ----------------------------------------------------------------------------- gradients
@dataclass(frozen=True)
class Gradient:
    """Slope of a binned mean profile: ``slope`` [label unit per coordinate unit] with its
    standard error ``slope_err``, from a count-weighted straight-line fit to the bin means
    (``centers``, ``means``, ``counts``)."""

    slope: float
    slope_err: float
    intercept: float
    centers: np.ndarray
    means: np.ndarray
    counts: np.ndarray


def binned_profile(x, values, edges, *, min_count=10):
    """Mean of ``values`` in 1-d bins of ``x``: returns (centres, means, counts, stds) for the
    bins with at least ``min_count`` finite values."""
    edges = np.asarray(edges, float)
    ix = _bin_index(x, edges)
    v = np.asarray(values, float)
    ok = (ix >= 0) & np.isfinite(v)
    nb = len(edges) - 1
    n = np.bincount(ix[ok], minlength=nb)
    s1 = np.bincount(ix[ok], weights=v[ok], minlength=nb)
    s2 = np.bincount(ix[ok], weights=v[ok] ** 2, minlength=nb)
    good = n >= max(min_count, 2)
    mean = s1[good] / n[good]
    std = np.sqrt(np.clip((s2[good] - n[good] * mean**2) / (n[good] - 1), 0, None))
    centers = 0.5 * (edges[1:] + edges[:-1])
    return centers[good], mean, n[good], std


def gradient(x, values, edges, *, min_count=10):
    """Slope of the mean of ``values`` with ``x`` (e.g. d<[Fe/H]>/dR in dex/kpc).

    The mean is taken in bins (``edges``) so that the bins, not the stars, are weighted by the
    selection function; the line is fitted to the bin means with weights ``n / s^2`` (inverse
    squared standard error of each mean). Needs at least 3 populated bins.
    """
    c, m, n, s = binned_profile(x, values, edges, min_count=min_count)
    if c.size < 3:
        raise ValueError(f"need >= 3 bins with >= {min_count} stars, got {c.size}")
    se2 = np.where(s > 0, s**2, np.nanmedian(s[s > 0]) ** 2 if np.any(s > 0) else 1.0) / n
    w = 1.0 / se2
    A = np.column_stack([np.ones_like(c), c])
    Aw = A * w[:, None]
    cov = np.linalg.inv(A.T @ Aw)
    coef = cov @ (Aw.T @ m)
    resid = m - A @ coef
    # inflate by the reduced chi^2 when the bins scatter more than their errors say
    chi2r = max(float(resid @ (w * resid)) / max(c.size - 2, 1), 1.0)
    return Gradient(slope=float(coef[1]), slope_err=float(np.sqrt(cov[1, 1] * chi2r)),
                    intercept=float(coef[0]), centers=c, means=m, counts=n)


def radial_gradient(table, label, *, R_range=RZ_RANGE["R"], absz_max=0.5, step=0.5, min_count=10):
    """``d<label>/dR`` [unit/kpc] near the plane (``|z| < absz_max``)."""
    R, z, v = _col(table, "R"), _col(table, "z"), _col(table, label)
    with np.errstate(invalid="ignore"):
        sel = np.abs(z) < absz_max
    return gradient(R[sel], v[sel], _edges(*R_range, step), min_count=min_count)


def vertical_gradient(table, label, *, absz_range=(0.0, 3.0), R_range=(7.5, 9.0), step=0.25,
                      min_count=10):
    """``d<label>/d|z|`` [unit/kpc] in an annulus ``R_range``."""
    R, z, v = _col(table, "R"), _col(table, "z"), _col(table, label)
    with np.errstate(invalid="ignore"):
        sel = (R >= R_range[0]) & (R < R_range[1])
    return gradient(np.abs(z[sel]), v[sel], _edges(*absz_range, step), min_count=min_count)


def gradient_table(table, labels, *, truth=None, radial_kw=None, vertical_kw=None):
    """Radial and vertical gradients of several labels in one table.

    Parameters
    ----------
    table : DataFrame with ``R``, ``z`` [kpc] and the ``labels``.
    labels : label names, e.g. ``["fe_h", "o_fe"]``.
    truth : optional DataFrame row-aligned with ``table`` holding the true values of the labels
        (e.g. the mock's truth table joined on ``source_id``); the same gradients are then measured
        on the true labels *at the catalogue's positions* (so only the labels differ) and added
        as ``true_dR``, ``true_dz``.
    radial_kw, vertical_kw : keywords for :func:`radial_gradient` and :func:`vertical_gradient`.

    Returns
    -------
    DataFrame indexed by label: ``dR``, ``dR_err`` [unit/kpc] near the plane and ``dz``,
    ``dz_err`` [unit/kpc] with ``|z|`` (slopes and standard errors of :func:`gradient`).
    """
    import pandas as pd

    radial_kw, vertical_kw = dict(radial_kw or {}), dict(vertical_kw or {})
    if truth is not None and len(truth) != len(table):
        raise ValueError(f"truth has {len(truth)} rows, table {len(table)}; join them first")
    rows = []
    for lab in labels:
        g_R = radial_gradient(table, lab, **radial_kw)
        g_z = vertical_gradient(table, lab, **vertical_kw)
        row = dict(label=lab, dR=g_R.slope, dR_err=g_R.slope_err, dz=g_z.slope, dz_err=g_z.slope_err)
        if truth is not None:
            t = {"R": _col(table, "R"), "z": _col(table, "z"), lab: _col(truth, lab)}
            row["true_dR"] = radial_gradient(t, lab, **radial_kw).slope
            row["true_dz"] = vertical_gradient(t, lab, **vertical_kw).slope
        rows.append(row)
    return pd.DataFrame(rows).set_index("label")


def vertical_profile(table, label, *, R_range=(7.5, 8.5), absz_max=4.0, step=0.25,
                     min_count=20):
    """Mean ``label`` against ``|z|`` in an annulus: the column of Fig 10 at fixed R.

    Parameters
    ----------
    table : DataFrame or Table with ``R``, ``z`` [kpc] and ``label``
    R_range : (lo, hi) kpc
    absz_max, step : float, kpc
        The profile covers ``0 <= |z| < absz_max`` in bins of ``step``.
    min_count : int
        Bins with fewer finite values are NaN.

    Returns
    -------
    DataFrame, one row per |z| bin: ``absz`` (bin centre, kpc), ``n``, ``mean``, ``sem``
    (standard error of the mean).
    """
    import pandas as pd

    if not 0 < step < absz_max:
        raise ValueError(f"need 0 < step < absz_max, got step={step}, absz_max={absz_max}")
    R, z, v = _col(table, "R"), _col(table, "z"), _col(table, label)
    edges = np.arange(0.0, absz_max + 0.5 * step, step)
    sel = (R >= R_range[0]) & (R < R_range[1]) & np.isfinite(v) & np.isfinite(z)
    idx = np.digitize(np.abs(z[sel]), edges) - 1
    rows = []
    for i in range(len(edges) - 1):
        x = v[sel][idx == i]
        ok = x.size >= max(min_count, 2)
        rows.append({"absz": 0.5 * (edges[i] + edges[i + 1]), "n": int(x.size),
                     "mean": float(np.mean(x)) if ok else np.nan,
                     "sem": float(np.std(x, ddof=1) / np.sqrt(x.size)) if ok else np.nan})
    return pd.DataFrame(rows)


def transition_height(profile, *, plane=0.5, far=(3.0, 4.0)) -> float:
    """|z| [kpc] where a vertical profile (:func:`vertical_profile`) first crosses halfway from its
    mean near the plane (``|z| < plane``) to its mean at ``far`` heights: the centre of a smooth
    disk-halo change (paper sec. 5.3: at R = 8 kpc "centered on |z| ~ 2 kpc"). Linear
    interpolation between bin centres; NaN when the profile never crosses or a side is empty.
    """
    p = profile[np.isfinite(profile["mean"])]
    z, m = p["absz"].to_numpy(float), p["mean"].to_numpy(float)
    near, high = m[z < plane], m[(z >= far[0]) & (z < far[1])]
    if near.size == 0 or high.size == 0:
        return float("nan")
    mid = 0.5 * (near.mean() + high.mean())
    s = np.sign(m - mid)
    for i in range(1, len(z)):
        if s[i - 1] != 0 and s[i] != s[i - 1]:
            return float(z[i - 1] + (mid - m[i - 1]) * (z[i] - z[i - 1]) / (m[i] - m[i - 1]))
    return float("nan")


def peak_height(profile) -> float:
    """|z| [kpc] of the largest mean of a vertical profile (:func:`vertical_profile`); NaN when
    the profile is empty or peaks at its first or last filled bin (no interior maximum)."""
    p = profile[np.isfinite(profile["mean"])].reset_index(drop=True)
    if len(p) < 3:
        return float("nan")
    i = int(np.argmax(p["mean"].to_numpy()))
    if i in (0, len(p) - 1):
        return float("nan")
    return float(p.loc[i, "absz"])
