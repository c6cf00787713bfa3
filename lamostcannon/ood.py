"""How unlike the training set is a spectrum? The out-of-distribution (OOD) score.

The Cannon labels every spectrum it is given; a quadratic model trained on FGK stars returns FGK
labels for an A star, an M dwarf or a galaxy. The whole-spectrum chi2 alone does not tell them
apart from an FGK star observed at lower S/N (AnniesLasso #41: "chi2 is not enough"). The score
here uses what the model already knows, each part *calibrated on held-out training spectra*
(the cross-validation of :func:`lamostcannon.validation.cross_validate`), never a fixed number:

Residual structure where the model has no support
    In each window of :data:`WINDOWS` (Balmer wings, cores and the Balmer jump, which grow far
    beyond the training range in A/B stars; the Paschen series; the TiO, CaH and MgH bands of
    M dwarfs; the forbidden emission lines of galaxies and nebulae) the normalised residuals
    ``z_p = (f_p - m_p) / sqrt(sigma_p^2 + s_p^2)`` of the best fit are summed in bins of
    :data:`BIN_PIXELS` neighbouring pixels, and the statistic is the mean over bins of
    ``(sum z)^2 / n``. White noise gives 1; a coherent mismatch over a line profile or a band adds
    ``n`` times its squared amplitude, so the statistic sees broad, correlated residuals that a
    pixel-by-pixel chi2 dilutes.
Label density
    The Gaussian KDE (Silverman bandwidth) of the training set's stellar parameters (teff, logg,
    [Fe/H], standardised) evaluated at the fitted labels: low where the fit lands in a corner the
    training set barely covers, even inside the per-label ranges.

Calibration (:func:`fit_calibration`)
    For every held-out training spectrum of the CV, each window statistic is compared with what
    spectra of that S/N get: ``log(stat) = a + b log(snr)`` with a robust spread ``sigma`` (an
    iteratively 4-sigma-clipped least-squares line); ``z = (log stat - a - b log snr) / sigma``,
    with ``snr`` raised to the lowest S/N of the calibration spectra (no extrapolation below it).
    The log density is standardised by its median and robust spread (``z`` positive when the
    density is low). The whole-spectrum chi2 per pixel is calibrated the same way (the ``POOR_FIT``
    bit of :mod:`lamostcannon.labelling`).
Score
    ``ood_score = sqrt(sum_k max(z_k, 0)^2)`` over the components: evidence adds up when several
    windows and the density all point away from the training set, which one maximum would miss.
    (Every second pixel of a window enters, :data:`PIXEL_STRIDE`.)
    The threshold is the ``quantile`` (0.98) of the held-out training spectra's scores, so about
    2% of spectra like the training set are flagged ``UNLIKE_TRAINING`` by construction; what it
    catches is measured on hot stars, M dwarfs, non-stars and degraded spectra (notebook 09).

S/N
    Everywhere in the package, ``snr`` is :func:`spectrum_snr`: the median over usable pixels of
    ``flux * sqrt(ivar)`` of the continuum-normalised spectrum on the common grid (every 8th
    pixel; computed from the data, so it exists for mock, real and user files alike; about 1.3 x
    LAMOST's ``snrg`` on DR10 spectra).

Files: ``ood_<name>.json`` beside ``model_<name>.fits`` (:func:`write_calibration`), with the
windows, the fitted lines, the KDE's training labels (at most :data:`KDE_MAX_POINTS`), the
thresholds and provenance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["WINDOWS", "BIN_PIXELS", "KDE_MAX_POINTS", "DENSITY_LABELS", "spectrum_snr",
           "window_masks", "residual_statistics", "LabelDensity", "OODCalibration",
           "fit_calibration", "write_calibration", "read_calibration", "STAT_COLUMNS"]

#: Windows (air wavelengths, Angstrom) where an FGK model has no support for what other kinds of
#: spectra show. Converted to vacuum on use (:func:`lamostcannon.cleaning.air_to_vacuum`).
WINDOWS = {
    "balmer_wings": [(6522.8, 6602.8), (4821.3, 4901.3), (4300.5, 4380.5), (4061.7, 4141.7)],
    "balmer_cores": [(c - 12.0, c + 12.0) for c in (6562.8, 4861.3, 4340.5, 4101.7, 3970.1,
                                                    3889.1, 3835.4)],
    "balmer_jump": [(3700.0, 3990.0)],
    "paschen": [(8450.0, 8900.0)],
    "paschen_cores": [(c - 10.0, c + 10.0) for c in (8502.5, 8598.4, 8665.0, 8750.5, 8862.8,
                                                     9014.9)],
    "molecular_bands": [(4950.0, 5000.0), (5160.0, 5220.0), (5440.0, 5520.0), (6150.0, 6260.0),
                        (6370.0, 6400.0), (6650.0, 6720.0), (6800.0, 6900.0), (7050.0, 7250.0)],
    "emission_lines": [(c - 8.0, c + 8.0) for c in (3727.1, 4958.9, 5006.8, 6300.3, 6548.1,
                                                   6583.5, 6716.4, 6730.8)],
}
#: Bins of the window statistic span this many grid pixels (~16-24 Angstrom on LAMOST's grid).
BIN_PIXELS = 16
#: Every ``PIXEL_STRIDE``-th pixel of a window enters the statistic: neighbouring pixels of the
#: resampled spectra are correlated, so half of them carry nearly all the information, for half
#: the cost (the statistic is part of every test step).
PIXEL_STRIDE = 2
#: The KDE keeps at most this many training labels (a seeded random subset beyond).
KDE_MAX_POINTS = 1000
#: Labels of the density component, those of them a model has.
DENSITY_LABELS = ("teff", "logg", "fe_h")
#: Columns written by :func:`residual_statistics` (and into CV tables): one per window.
STAT_COLUMNS = tuple(f"ood_{k}" for k in WINDOWS)


#: :func:`spectrum_snr` uses every ``SNR_STRIDE``-th pixel of the grid (489 of LAMOST's 3909).
SNR_STRIDE = 8


def spectrum_snr(flux, ivar, stride: int = SNR_STRIDE) -> np.ndarray:
    """The package's one S/N: median over usable pixels of ``flux * sqrt(ivar)``.

    Computed on every ``stride``-th pixel of the grid (a regular subsample spanning the whole
    spectrum; the median of 489 of LAMOST's 3909 pixels differs from that of all of them by a
    fraction of a percent and costs an eighth), so that it adds little to the test step.

    Parameters
    ----------
    flux, ivar : arrays (S, P)
        Continuum-normalised flux and inverse variance (pixels with ``ivar <= 0`` or non-finite
        values are not used).
    stride : int
        Pixel step of the subsample (1: every pixel).

    Returns
    -------
    float ndarray (S,); NaN for a spectrum without usable pixels in the subsample.
    """
    flux = np.atleast_2d(np.asarray(flux))[:, ::stride]
    ivar = np.atleast_2d(np.asarray(ivar))[:, ::stride]
    if flux.shape != ivar.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must have the same shape")
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
        s = np.where(ok, flux * np.sqrt(np.where(ok, ivar, 0.0)), np.inf).astype(np.float32)
    s.sort(axis=1)                                   # usable values first, +inf last
    n = ok.sum(axis=1)
    rows = np.arange(s.shape[0])
    lo, hi = np.maximum((n - 1) // 2, 0), np.maximum(n // 2, 0)
    with np.errstate(invalid="ignore"):
        out = 0.5 * (s[rows, lo].astype(np.float64) + s[rows, hi])
    out[n == 0] = np.nan
    return out


def window_masks(wavelength, windows=None) -> dict[str, np.ndarray]:
    """Boolean pixel masks ``{name: (P,)}`` of the windows on a vacuum wavelength grid."""
    from .cleaning import air_to_vacuum

    wavelength = np.asarray(wavelength, dtype=float)
    out = {}
    for name, ranges in (windows or WINDOWS).items():
        m = np.zeros(wavelength.shape, bool)
        for lo, hi in ranges:
            m |= (wavelength >= air_to_vacuum(lo)) & (wavelength < air_to_vacuum(hi))
        out[name] = m
    return out


class _Binner:
    """Pixel-to-bin sums of the window statistic for one model and one set of windows.

    The union of the windows' usable pixels is read as a few contiguous slices (no fancy
    indexing), and one matrix product sums the residuals of every bin of every window.
    """

    def __init__(self, model, masks, bin_pixels=BIN_PIXELS, stride=PIXEL_STRIDE):
        pixel_ok = np.asarray(model.pixel_ok, dtype=bool)
        union = np.zeros(pixel_ok.shape, bool)
        for m in masks.values():
            union |= m
        union &= pixel_ok
        union[np.arange(union.size) % stride != 0] = False
        self.cols = np.flatnonzero(union)
        self.stride = stride
        self.theta_t = np.ascontiguousarray(np.asarray(model.theta)[self.cols].T)
        self.s2 = np.asarray(model.s2, dtype=float)[self.cols].astype(np.float32)
        self.names = list(masks)
        # every (window, bin of BIN_PIXELS grid pixels) is a contiguous range [lo, hi) of the
        # union's columns (windows are intervals; the union lists usable pixels in order)
        lo, hi, self.window_bins = [], [], []
        for name in self.names:
            sel = np.flatnonzero(masks[name][self.cols])
            start = len(lo)
            if sel.size:
                block = self.cols[sel] // bin_pixels
                cut = np.flatnonzero((np.diff(block) != 0) | (np.diff(sel) != 1)) + 1
                for part in np.split(sel, cut):
                    lo.append(int(part[0]))
                    hi.append(int(part[-1]) + 1)
            self.window_bins.append(slice(start, len(lo)))
        self.lo = np.asarray(lo, np.int64)
        self.hi = np.asarray(hi, np.int64)
        # the bins' columns one after another (overlapping windows repeat theirs), for reduceat
        self.sizes = (self.hi - self.lo).astype(np.int16)
        self.order = np.concatenate([np.arange(a, b) for a, b in zip(self.lo, self.hi)]) \
            if len(lo) else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64) \
            if len(lo) else np.zeros(0, np.int64)

    def gather(self, a):
        """The union's columns of rows ``a`` (S, P) as float32 (S, W)."""
        return np.take(a, self.cols, axis=1).astype(np.float32, copy=False)


def residual_statistics(model, labels, flux, ivar, masks, *, chunk_size: int = 2048,
                        binner=None) -> dict[str, np.ndarray]:
    """The window statistics of the best fits (see the module docstring).

    Parameters
    ----------
    model : CannonModel
        Trained (``theta``, ``s2``, ``pixel_ok``, ``scaler``).
    labels : array (S, L)
        Fitted labels, physical units (rows with a non-finite label give NaN).
    flux, ivar : arrays (S, P)
        The spectra that were fitted (non-finite values and ``ivar <= 0`` are not used).
    masks : dict name -> bool (P,)
        :func:`window_masks` on the model's grid (ignored when ``binner`` is given).
    chunk_size : int
        Spectra per block (memory ~ ``chunk_size`` x window pixels x 4 bytes x a few).

    Returns
    -------
    dict ``ood_<name>`` -> float ndarray (S,): the binned residual statistic per window (NaN
    where the window has no usable pixel or the fit failed).
    """
    from .cannon import vectorize

    binner = binner or _Binner(model, masks)
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    S = labels.shape[0]
    out = {f"ood_{n}": np.full(S, np.nan) for n in binner.names}
    if S == 0 or binner.cols.size == 0:
        return out
    fin = np.all(np.isfinite(labels), axis=1)
    for a in range(0, S, chunk_size):
        b = min(S, a + chunk_size)
        x = model.scaler.transform(np.where(fin[a:b, None], labels[a:b], model.scaler.mean))
        pred = (vectorize(x) @ binner.theta_t).astype(np.float32)
        f = binner.gather(flux[a:b])
        iv = binner.gather(ivar[a:b])
        with np.errstate(invalid="ignore", over="ignore"):
            ok = (iv > 0) & np.isfinite(f) & np.isfinite(iv)
            iv = np.where(ok, iv, np.float32(0.0))
            iv /= 1.0 + iv * binner.s2                      # 1 / (sigma^2 + s^2)
            np.sqrt(iv, out=iv)
            f -= pred
            f *= iv
            f[~ok] = 0.0                                    # z of the usable pixels, 0 else
        zs = np.add.reduceat(np.take(f, binner.order, axis=1), binner.starts, axis=1)
        if ok.all():
            nn = np.broadcast_to(binner.sizes, zs.shape)
        else:
            nn = np.add.reduceat(np.take(ok, binner.order, axis=1).astype(np.int16),
                                 binner.starts, axis=1)
        has = nn > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            term = np.where(has, zs * zs / np.where(has, nn, 1.0), 0.0)
        for name, bins in zip(binner.names, binner.window_bins):
            hb = has[:, bins]
            nb = hb.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                stat = term[:, bins].sum(axis=1) / nb
            out[f"ood_{name}"][a:b] = np.where(fin[a:b] & (nb > 0), stat, np.nan)
    return out


@dataclass
class LabelDensity:
    """Gaussian KDE of a training set's labels (standardised; Silverman bandwidth).

    Attributes
    ----------
    label_names : tuple of str
    points : array (N, D)
        Training labels (physical), at most :data:`KDE_MAX_POINTS`.
    mean, std : arrays (D,)
        Standardisation (of all training labels).
    """

    label_names: tuple
    points: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    _kde: object = field(default=None, repr=False)

    @classmethod
    def from_labels(cls, labels, label_names, *, seed: int = 0):
        """KDE of the columns of ``labels`` (S, L) named in :data:`DENSITY_LABELS`."""
        names = list(label_names)
        use = [n for n in DENSITY_LABELS if n in names] or names
        idx = [names.index(n) for n in use]
        y = np.asarray(labels, dtype=float)[:, idx]
        y = y[np.all(np.isfinite(y), axis=1)]
        if len(y) < len(use) + 2:
            raise ValueError(f"need at least {len(use) + 2} finite training labels for the KDE, "
                             f"got {len(y)}")
        mean, std = y.mean(axis=0), y.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        if len(y) > KDE_MAX_POINTS:
            y = y[np.random.default_rng(seed).choice(len(y), KDE_MAX_POINTS, replace=False)]
        return cls(tuple(use), y, mean, std)

    #: Grid of the tabulated log density: nodes per dimension and half-width (standard
    #: deviations of the training labels); outside it the density is that of the grid's edge
    #: minus the squared distance beyond it (in kernel widths), i.e. it keeps falling.
    GRID_NODES = 48
    GRID_HALF_WIDTH = 5.0
    #: Lowest tabulated log density, below the grid's peak: the FFT's rounding (~1e-16 of the
    #: peak) is as large as densities e^-36 below it, so lower values are rounding, not density
    #: (two FFT implementations agree to 5e-4 down to 30 below the peak, and differ by tens
    #: further down).
    GRID_FLOOR = 30.0

    def log_density(self, labels, label_names) -> np.ndarray:
        """Log KDE density at labels (S, L) in the standardised space; NaN where non-finite.

        The KDE is tabulated once on a regular grid (:attr:`GRID_NODES` per dimension over
        +-:attr:`GRID_HALF_WIDTH` standard deviations; the points binned to the nearest node and
        convolved with the kernel) and interpolated linearly: within ~0.1 of the exact log
        density where the training set has stars, at most :attr:`GRID_FLOOR` below its peak
        elsewhere on the grid, and ~200 times cheaper per star than summing the kernels (it is
        part of every test step).
        """
        names = list(label_names)
        missing = [n for n in self.label_names if n not in names]
        if missing:
            raise KeyError(f"labels {missing} of the density are not among {names}")
        x = np.atleast_2d(np.asarray(labels, dtype=float))[:, [names.index(n) for n in
                                                              self.label_names]]
        out = np.full(x.shape[0], np.nan)
        ok = np.all(np.isfinite(x), axis=1)
        if ok.any():
            interp, bw = self._grid()
            u = (x[ok] - self.mean) / self.std
            inside = np.clip(u, -self.GRID_HALF_WIDTH, self.GRID_HALF_WIDTH)
            beyond = np.sum((u - inside) ** 2, axis=1) / (2 * bw ** 2)
            out[ok] = interp(inside) - beyond
        return out

    def exact_log_density(self, labels, label_names) -> np.ndarray:
        """The KDE summed over its kernels (the reference of :meth:`log_density`)."""
        names = list(label_names)
        x = np.atleast_2d(np.asarray(labels, dtype=float))[:, [names.index(n) for n in
                                                              self.label_names]]
        out = np.full(x.shape[0], np.nan)
        ok = np.all(np.isfinite(x), axis=1)
        if ok.any():
            out[ok] = self._kde_object().logpdf(((x[ok] - self.mean) / self.std).T)
        return out

    def _kde_object(self):
        from scipy.stats import gaussian_kde

        if self._kde is None:
            self._kde = gaussian_kde(((self.points - self.mean) / self.std).T,
                                     bw_method="silverman")
        return self._kde

    def _grid(self):
        """The KDE on the grid, by binning the points onto it and convolving with the kernel
        (FFT): milliseconds, where summing the kernels at every node would take seconds.

        numpy only (the kernel's covariance is :class:`scipy.stats.gaussian_kde`'s, Silverman's
        factor times the unbiased covariance of the points): a labelling worker that builds it
        does not import ``scipy.stats``, ``scipy.signal`` and ``scipy.interpolate``, ~1.3 s of
        CPU per process (measured by hand; ``bench_e2e.py`` reports the label stage's whole
        start-up, ``fixed_cpu_seconds``).
        """
        if getattr(self, "_interp", None) is None:
            D, G, W = len(self.label_names), self.GRID_NODES, self.GRID_HALF_WIDTH
            axes = [np.linspace(-W, W, G) for _ in range(D)]
            step = axes[0][1] - axes[0][0]
            u = (self.points - self.mean) / self.std
            n = len(u)
            factor = (n * (D + 2) / 4.0) ** (-1.0 / (D + 4))        # Silverman's rule
            cov = np.atleast_2d(np.cov(u.T)) * factor ** 2
            edges = [np.concatenate([a - step / 2, [a[-1] + step / 2]]) for a in axes]
            hist, _ = np.histogramdd(u, bins=edges)
            half = int(np.ceil(4.5 * np.sqrt(np.max(np.diag(cov))) / step))
            off = np.arange(-half, half + 1) * step
            grid = np.stack(np.meshgrid(*([off] * D), indexing="ij"), axis=-1)
            icov = np.linalg.inv(cov)
            q = np.einsum("...i,ij,...j->...", grid, icov, grid)
            kernel = np.exp(-0.5 * q) / np.sqrt((2 * np.pi) ** D * np.linalg.det(cov))
            dens = _convolve_same(hist, kernel) / n
            values = np.log(np.clip(dens, 1e-300, None))
            values = np.maximum(values, np.log(max(float(dens.max()), 1e-300)) - self.GRID_FLOOR)
            bw = float(np.sqrt(np.min(np.diag(cov))))
            self._interp = (_GridInterpolator(-W, step, values), bw)
        return self._interp

    def to_dict(self) -> dict:
        return {"label_names": list(self.label_names), "mean": self.mean.tolist(),
                "std": self.std.tolist(), "points": self.points.tolist()}

    @classmethod
    def from_dict(cls, d) -> "LabelDensity":
        return cls(tuple(d["label_names"]), np.asarray(d["points"], float).reshape(
            -1, len(d["label_names"])), np.asarray(d["mean"], float), np.asarray(d["std"], float))


def _convolve_same(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """N-d convolution of ``a`` with an odd-sized ``kernel`` by FFT, cropped to ``a``'s shape
    and centred (``scipy.signal.fftconvolve(a, kernel, mode="same")``)."""
    shape = [_fast_length(n + k - 1) for n, k in zip(a.shape, kernel.shape)]
    axes = list(range(a.ndim))
    full = np.fft.irfftn(np.fft.rfftn(a, shape, axes=axes) * np.fft.rfftn(kernel, shape, axes=axes),
                         shape, axes=axes)
    return full[tuple(slice((k - 1) // 2, (k - 1) // 2 + n) for n, k in zip(a.shape, kernel.shape))]


def _fast_length(n: int) -> int:
    """The smallest 5-smooth integer >= n (a length the FFT does fast, as scipy's
    ``next_fast_len(n, real=True)``)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


class _GridInterpolator:
    """Multilinear interpolation of ``values`` (G, ..., G) tabulated at ``start + i step`` along
    every axis, at points (S, D) inside the grid (``scipy.interpolate.RegularGridInterpolator``
    with ``method="linear"`` on a regular grid)."""

    def __init__(self, start: float, step: float, values: np.ndarray):
        self.start, self.step, self.values = float(start), float(step), values

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=float))
        G = np.asarray(self.values.shape)
        pos = (x - self.start) / self.step
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, G - 2)
        t = np.clip(pos - i0, 0.0, 1.0)
        out = np.zeros(len(x))
        D = x.shape[1]
        for corner in range(1 << D):
            bits = [(corner >> d) & 1 for d in range(D)]
            weight = np.ones(len(x))
            for d, b in enumerate(bits):
                weight *= t[:, d] if b else 1.0 - t[:, d]
            out += weight * self.values[tuple(i0[:, d] + bits[d] for d in range(D))]
        return out


def _robust_line(x, y, clip: float = 4.0, n_iter: int = 10):
    """``y = a + b x`` by least squares with iterative ``clip``-sigma clipping (robust sigma)."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 5:
        raise ValueError(f"need at least 5 finite points for the calibration line, got {ok.sum()}")
    a = b = s = np.nan
    for _ in range(n_iter):
        if np.ptp(x[ok]) > 0:
            b, a = np.polyfit(x[ok], y[ok], 1)
        else:
            a, b = float(np.median(y[ok])), 0.0
        r = y - (a + b * x)
        s = 1.4826 * float(np.median(np.abs(r[ok] - np.median(r[ok]))))
        s = s if s > 0 else float(np.std(r[ok])) or 1e-3
        new = np.isfinite(r) & (np.abs(r) < clip * s)
        if new.sum() < 5 or np.array_equal(new, ok):
            break
        ok = new
    return float(a), float(b), float(s)


@dataclass
class OODCalibration:
    """What a spectrum like the training set looks like, as a function of S/N.

    Attributes
    ----------
    lines : dict component -> (a, b, sigma)
        ``log(stat) = a + b log(snr)`` with robust spread ``sigma`` for ``ood_<window>`` and
        ``chi2_per_pixel``; for ``ood_log_density`` ``a`` is the median, ``b = 0``.
    components : list of str
        The components of the score (window statistics and ``ood_log_density``).
    threshold : float
        ``ood_score`` above this sets ``UNLIKE_TRAINING``.
    poor_fit_threshold : float
        ``z_chi2`` (the standardised log chi2 per pixel) above this sets ``POOR_FIT``.
    windows : dict
        The windows (air Angstrom) the statistics were computed in.
    density : LabelDensity or None
    meta : dict
        Quantiles used, number of spectra, provenance.
    """

    lines: dict
    components: list
    threshold: float
    poor_fit_threshold: float
    windows: dict = field(default_factory=lambda: dict(WINDOWS))
    density: LabelDensity | None = None
    meta: dict = field(default_factory=dict)
    snr_min: float = 0.0
    _masks: dict = field(default_factory=dict, repr=False)

    def z(self, name, values, snr) -> np.ndarray:
        """Standardised component ``name`` (positive = less like the training set).

        Below ``snr_min`` (the lowest S/N of the calibration spectra) the lines are not
        extrapolated: a spectrum is compared with the calibration spectra of that lowest S/N,
        whose statistics are at least as large as its own would be (they fall with S/N)."""
        a, b, s = self.lines[name]
        v = np.asarray(values, dtype=float)
        if name == "ood_log_density":
            return (a - v) / s
        sn = np.clip(np.asarray(snr, float), max(self.snr_min, 1e-3), None)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (np.log(np.clip(v, 1e-6, None)) - a - b * np.log(sn)) / s

    def score(self, stats: dict, snr) -> np.ndarray:
        """``ood_score = sqrt(sum_k max(z_k, 0)^2)`` (NaN where every component is NaN)."""
        zs = np.column_stack([self.z(k, stats[k], snr) for k in self.components])
        pos = np.clip(zs, 0, None)
        with np.errstate(invalid="ignore"):
            out = np.sqrt(np.nansum(pos ** 2, axis=1))
        out[~np.isfinite(zs).any(axis=1)] = np.nan
        return out

    def masks(self, wavelength) -> dict:
        key = (len(wavelength), float(wavelength[0]), float(wavelength[-1]))
        if key not in self._masks:
            self._masks[key] = window_masks(wavelength, self.windows)
        return self._masks[key]

    def to_dict(self) -> dict:
        return {"method": "binned residual statistics in windows + KDE label density, "
                          "standardised against held-out training spectra at their S/N; "
                          "ood_score = sqrt(sum max(z, 0)^2)",
                "bin_pixels": BIN_PIXELS, "windows": self.windows,
                "lines": {k: list(v) for k, v in self.lines.items()},
                "components": list(self.components), "threshold": self.threshold,
                "poor_fit_threshold": self.poor_fit_threshold, "snr_min": self.snr_min,
                "density": None if self.density is None else self.density.to_dict(),
                **self.meta}

    @classmethod
    def from_dict(cls, d) -> "OODCalibration":
        known = {"method", "bin_pixels", "windows", "lines", "components", "threshold",
                 "poor_fit_threshold", "density", "snr_min"}
        return cls(lines={k: tuple(float(x) for x in v) for k, v in d["lines"].items()},
                   components=list(d["components"]), threshold=float(d["threshold"]),
                   poor_fit_threshold=float(d["poor_fit_threshold"]),
                   windows={k: [tuple(r) for r in v] for k, v in d["windows"].items()},
                   density=None if d.get("density") is None else
                   LabelDensity.from_dict(d["density"]),
                   meta={k: v for k, v in d.items() if k not in known},
                   snr_min=float(d.get("snr_min", 0.0)))


def fit_calibration(cv, train_labels, label_names, *, quantile: float = 0.98,
                    poor_fit_quantile: float = 0.995, rows=None, meta=None) -> OODCalibration:
    """Calibrate the OOD score on held-out training spectra.

    Parameters
    ----------
    cv : DataFrame
        A :func:`lamostcannon.validation.cross_validate` table with the diagnostic columns
        (``snr``, ``chi2_per_pixel``, ``ood_<window>``, ``ood_log_density``).
    train_labels : array (S, L)
        The whole training set's labels (for the shipped KDE).
    label_names : sequence of str
    quantile, poor_fit_quantile : float
        Fractions of the calibration spectra below the ``UNLIKE_TRAINING`` and ``POOR_FIT``
        thresholds.
    rows : bool array, optional
        The CV rows to calibrate on (e.g. even folds; the rest stays held out).
    meta : dict, optional
        Extra provenance.

    Returns
    -------
    OODCalibration
    """
    from .cleaning import provenance

    if not 0.5 < quantile < 1 or not 0.5 < poor_fit_quantile < 1:
        raise ValueError(f"quantiles must lie in (0.5, 1), got {quantile}, {poor_fit_quantile}")
    need = ["snr", "chi2_per_pixel", "ood_log_density", *STAT_COLUMNS]
    missing = [c for c in need if c not in cv.columns]
    if missing:
        raise KeyError(f"the CV table lacks {missing}; run cross_validate with diagnostics=True")
    t = cv if rows is None else cv[np.asarray(rows, bool)]
    ok = np.isfinite(t["snr"].to_numpy(float)) & (t["snr"].to_numpy(float) > 0)
    t = t[ok]
    logsnr = np.log(t["snr"].to_numpy(float))
    lines = {}
    for col in STAT_COLUMNS + ("chi2_per_pixel",):
        v = t[col].to_numpy(float)
        good = np.isfinite(v)
        if good.sum() < 20:
            log.warning("OOD calibration: %s has %d finite values; left out", col, good.sum())
            continue
        lines[col] = _robust_line(logsnr[good], np.log(np.clip(v[good], 1e-6, None)))
    ld = t["ood_log_density"].to_numpy(float)
    ld = ld[np.isfinite(ld)]
    med = float(np.median(ld))
    lines["ood_log_density"] = (med, 0.0, float(1.4826 * np.median(np.abs(ld - med))) or 1.0)
    components = [c for c in STAT_COLUMNS if c in lines] + ["ood_log_density"]
    snr = t["snr"].to_numpy(float)
    cal = OODCalibration(lines=lines, components=components, threshold=np.inf,
                         poor_fit_threshold=np.inf, windows=dict(WINDOWS),
                         density=LabelDensity.from_labels(train_labels, label_names),
                         snr_min=float(np.nanmin(snr)))
    scores = cal.score({c: t[c].to_numpy(float) for c in components}, snr)
    cal.threshold = float(np.nanquantile(scores, quantile))
    zc = cal.z("chi2_per_pixel", t["chi2_per_pixel"].to_numpy(float), snr)
    cal.poor_fit_threshold = float(np.nanquantile(zc, poor_fit_quantile))
    cal.meta = {"quantile": quantile, "poor_fit_quantile": poor_fit_quantile,
                "n_calibration": int(len(t)),
                "snr_range": [float(np.nanmin(snr)), float(np.nanmax(snr))],
                "provenance": {**provenance(), **(meta or {})}}
    log.info("OOD calibration on %d held-out spectra: threshold %.2f, poor-fit z %.2f",
             len(t), cal.threshold, cal.poor_fit_threshold)
    return cal


def write_calibration(cal: OODCalibration, path) -> Path:
    """Write ``ood_<name>.json`` (temporary name, then renamed into place)."""
    from . import paths

    path = paths.write_json(path, cal.to_dict())
    log.info("wrote %s", path)
    return path


def read_calibration(path) -> OODCalibration:
    """Read :func:`write_calibration` output; a clear error for a broken file."""
    from . import paths

    data = paths.read_json(path, "an OOD calibration")
    try:
        return OODCalibration.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not an OOD calibration file: {exc}") from exc

