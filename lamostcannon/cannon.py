"""The quadratic *Cannon* (Ness et al. 2015; Wheeler et al. 2020, ApJ 898, 58, section 3).

The model
---------
Labels ``l`` (``L`` of them: teff, logg, vmic, fe_h, x_fe, ...) are standardised with the training
mean and standard deviation (:class:`LabelScaler`), ``x = (l - mean) / std``. The flux of star
``n`` at pixel ``lambda`` is Gaussian around a quadratic polynomial of the labels (paper eq. 3)::

    F_nl ~ N(theta_l . eta(x_n), sigma_nl^2 + s_l^2)

with ``eta`` the quadratic expansion of paper eq. 4 (:func:`vectorize`), of length
``T = (L^2 + 3L)/2 + 1``, in the fixed order

    ``1, x_0, ..., x_{L-1}, x_0 x_0, x_0 x_1, ..., x_0 x_{L-1}, x_1 x_1, ..., x_{L-1} x_{L-1}``

(constant, linear terms in label order, then the products ``x_i x_j`` with ``i <= j`` in row-major
order). :func:`term_names` spells it out, e.g. ``["1", "teff", "logg", "teff*teff", ...]``.

Training (paper eqs. 3 and 5)
-----------------------------
For each pixel the coefficients ``theta`` and the intrinsic scatter ``s^2`` maximise the exact
likelihood of eq. 3 over the training set. At fixed ``s^2`` the maximum in ``theta`` is weighted
least squares with weights ``w_n = 1 / (sigma_n^2 + s^2)``; at fixed ``theta`` the maximum in
``s^2`` is a 1-D root of ``d log L / d s^2 = 1/2 sum_n (w_n^2 r_n^2 - w_n)``, found here by a
bracketed (safeguarded) Newton search for every pixel at once. The two steps alternate
(coordinate ascent; each step can only raise eq. 5) until ``s^2`` changes by less than a relative
``s2_rtol``. Since ``theta`` is always refreshed after ``s^2``, the stored pair is consistent, and
at convergence ``s^2`` is a stationary point of the profile likelihood of eq. 5 (the derivative of
the profile equals the partial derivative at the best ``theta``). Data with zero inverse variance
count as missing. The normal equations of all pixels are formed with one matrix product: every
entry of ``eta^T W eta`` is a monomial of degree <= 4 of the labels, so the Gram matrices of all
pixels are ``W^T M4`` with ``M4`` the ``C(L+4, 4)`` distinct monomials (1001 for ``L = 10``,
instead of ``T^2 = 4356`` products). Each Gram matrix is Jacobi-scaled and given a small ridge
(``ridge``, default 1e-8 of the scaled unit diagonal, non-constant terms only) before a batched
solve; this only guards against singular label sets and leaves well-posed fits unchanged at the
1e-8 level.

Label masks (paper section 3; TheCannon.jl) restrict a label to chosen pixels: at a pixel where a
label is masked out, every term that contains it is fixed to zero in training.

Test step
---------
With ``w_p = 1 / (sigma_p^2 + s_p^2)`` the chi-square of one spectrum is a quadratic form in
``eta``, ``chi2(x) = eta^T A eta - 2 b^T eta + c`` with ``A = Theta^T W Theta``,
``b = Theta^T W f`` and ``c = f^T W f``, i.e. a polynomial of degree 4 in ``x``. Its ``C(L+4, 4)``
coefficients come for a whole chunk of spectra from one matrix product ``W (S x P) @ Q (P x K4)``
(``Q`` holds the per-pixel products ``theta_i theta_j`` summed per monomial, precomputed once;
the constant ``theta_0`` is subtracted from the flux first, which keeps the coefficients small).
After that, the maximum-likelihood labels cost nothing per pixel: chi2, its gradient and its
exact Hessian come from the polynomial, and a bounded Newton iteration with a trust radius
(saddle-free steps where the Hessian is indefinite), vectorised over spectra, runs from the best
of a fixed set of starting points (the training mean and k-means centres of the training labels,
ranked by evaluating chi2 at all of them with one more product); ``n_starts - 1`` further runs
(:data:`N_STARTS` in all by default) start at the next-ranked points and stop early when they fall
into a basin already found. Labels
are kept inside ``[min - bound, max + bound]`` of the training labels in standardised units (a
label on its bound whose gradient points outward is held there and the Newton step solves for the
others, so a fit on a bound is the minimum over the free labels). The
formal covariance is the inverse Hessian of ``chi2 / 2`` at the best fit, in physical units.
The degree 2-4 coefficients come from that product in float32 (twice as fast; the linear ones in
float64), which moves the polynomial's minimum by ~1e-5 of a formal error (at most ~1e-3); each
converged fit off the bounds is then polished by one Newton step on the exact float64 gradient
(from the weights: two thin products), which lands on the exact chi2's minimum to ~1e-8 of a
formal error. The reported chi2 is the exact chi2 at the best fit; chi2 in pixel windows is
recomputed from the explicit residuals there. Memory is bounded by ``chunk_size`` spectra per thread.

Flag bits of :attr:`TestResult.flag` (see :data:`FLAG_BITS`)
--------------------------------------------------------------
==  =====================  ======================================================================
1   ``NO_PIXELS``          no usable pixel: labels, errors and chi2 are NaN
2   ``NOT_CONVERGED``      the Newton iteration reached ``max_iter``
4   ``AT_BOUND``           a label sits on its extrapolation bound
8   ``BAD_INPUT``          NaN/inf/negative ivar, or non-finite flux with ivar > 0 (masked)
16  ``COV_NOT_PD``         the chi2 Hessian is not positive definite at the fit; covariance NaN
32  ``FEW_PIXELS``         fewer usable pixels than model terms ``T``
64  ``MULTIPLE_MINIMA``    another start reached a minimum within delta chi2 < 1 that lies more
                           than :data:`MULTIPLE_MINIMA_SIGMA` formal errors away in some label
==  =====================  ======================================================================

Files
-----
:meth:`CannonModel.write` stores one FITS file (HDUs ``THETA``, ``S2``, ``PIXOK``, ``SCALING``,
``STARTS``, optionally ``WAVELENGTH`` and ``LABELMASK``; provenance in the primary header; FITS
checksums). :meth:`CannonModel.read` checks everything and raises :class:`ModelFileError`
(a ``ValueError``) naming what it expected.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import itertools
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import kernels

logger = logging.getLogger(__name__)

__all__ = [
    "FLAG_BITS",
    "FLAG_NO_PIXELS",
    "FLAG_NOT_CONVERGED",
    "FLAG_AT_BOUND",
    "FLAG_BAD_INPUT",
    "FLAG_COV_NOT_PD",
    "FLAG_FEW_PIXELS",
    "FLAG_MULTIPLE_MINIMA",
    "ModelFileError",
    "n_terms",
    "term_names",
    "vectorize",
    "vectorize_jacobian",
    "LabelScaler",
    "TestResult",
    "CannonModel",
]

FLAG_NO_PIXELS = 1
FLAG_NOT_CONVERGED = 2
FLAG_AT_BOUND = 4
FLAG_BAD_INPUT = 8
FLAG_COV_NOT_PD = 16
FLAG_FEW_PIXELS = 32
FLAG_MULTIPLE_MINIMA = 64

#: Flag bit -> (name, meaning), for documentation and table metadata.
FLAG_BITS = {
    FLAG_NO_PIXELS: ("NO_PIXELS", "no usable pixel; labels, errors and chi2 are NaN"),
    FLAG_NOT_CONVERGED: ("NOT_CONVERGED", "Newton iteration reached max_iter"),
    FLAG_AT_BOUND: ("AT_BOUND", "a label sits on its extrapolation bound"),
    FLAG_BAD_INPUT: ("BAD_INPUT", "NaN/inf/negative ivar or non-finite flux with ivar>0 (masked)"),
    FLAG_COV_NOT_PD: ("COV_NOT_PD", "chi2 Hessian not positive definite at the fit; cov is NaN"),
    FLAG_FEW_PIXELS: ("FEW_PIXELS", "fewer usable pixels than model terms"),
    FLAG_MULTIPLE_MINIMA: ("MULTIPLE_MINIMA",
                           "another start found a distinct minimum, dchi2<1, >2 sigma away"),
}

#: Newton runs per spectrum in :meth:`CannonModel.test` by default. On the small mock's survey
#: spectra (4,000 random observations per model), the fit from 2 starts sat in a basin whose chi2
#: exceeds the one 16 starts find by more than 1 for 5.7% of the dwarfs and 2.6% of the giants;
#: from 4 starts for 1.5% and 0.6%, at 1.2x (dwarfs) and 1.26x (giants) the CPU time of 2 starts;
#: 8 starts leave 0.03% and 0.15% there but cost 1.6-1.8x. Spectra made by the dwarf model itself
#: at known labels (S/N > 100) came back from 2 starts more than 300 K from their teff for 12% of
#: them, from 4 for 0.6% (``benchmarks/study_newton_starts.py``). More k-means candidates (256
#: or 1,024 instead of 64) did not help (by hand).
#: More starts find more minima, most of them inside the best fit's error bars: counted as
#: ``MULTIPLE_MINIMA`` as before, 6.8% of the dwarfs (5.6% of the giants) would carry it from 4
#: starts against 0.6% (0.3%) from 2; counted only beyond 2 formal errors
#: (:data:`MULTIPLE_MINIMA_SIGMA`), 1.05% (0.5%).
N_STARTS = 4

#: ``MULTIPLE_MINIMA`` needs the other minimum (delta chi2 < 1) to lie more than this many formal
#: errors (of the best fit, in some label) away; 0 counts every distinct minimum.
MULTIPLE_MINIMA_SIGMA = 2.0

FILE_FORMAT = "lamostcannon-model"
FILE_FORMAT_VERSION = 1
#: training settings kept in the model file header: meta key -> (card, comment)
_META_CARDS = {
    "ridge": ("TRIDGE", "ridge on Jacobi-scaled normal equations"),
    "min_stars": ("TMINSTAR", "min usable stars per pixel (-1: 2 x terms)"),
    "s2_rtol": ("TS2RTOL", "relative tolerance of s2"),
    "n_outer": ("TNOUTER", "theta/s2 alternations done"),
    "s2_unconverged": ("TS2UNCV", "pixels whose s2 did not converge"),
    "errors_in_variables": ("TEIV", "trained correcting for training-label errors"),
}


class ModelFileError(ValueError):
    """A model file is missing parts, truncated, corrupt or inconsistent."""


# --------------------------------------------------------------------------------------------
# The quadratic vectorizer (paper eq. 4)
# --------------------------------------------------------------------------------------------

def n_terms(n_labels: int) -> int:
    """Number of terms ``T = (L^2 + 3L)/2 + 1`` of the quadratic expansion of ``L`` labels.

    The paper (below eq. 4) counts ``(L^2 + 3L)/2`` without the constant term.
    """
    n_labels = int(n_labels)
    if n_labels < 1:
        raise ValueError(f"need at least one label, got {n_labels}")
    return (n_labels * n_labels + 3 * n_labels) // 2 + 1


def term_names(label_names) -> list[str]:
    """Names of the terms of eta in their fixed order.

    Parameters
    ----------
    label_names : sequence of str, length L

    Returns
    -------
    list of str, length T
        ``["1", a, b, ..., "a*a", "a*b", ..., "b*b", ...]``: the constant, the linear terms in
        label order, then the products ``i <= j`` in row-major order.
    """
    names = [str(n) for n in label_names]
    out = ["1", *names]
    out += [f"{names[i]}*{names[j]}" for i, j in zip(*np.triu_indices(len(names)))]
    return out


def _as_2d_labels(x, name="x"):
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (S, L) or (L,), got shape {x.shape}")
    return x


def vectorize(x) -> np.ndarray:
    """The quadratic expansion eta of standardised labels (paper eq. 4).

    Parameters
    ----------
    x : array_like, shape (S, L) or (L,)
        Standardised labels (training mean subtracted, divided by training std).

    Returns
    -------
    eta : ndarray, shape (S, T)
        ``[1, x_0, ..., x_{L-1}, x_0 x_0, x_0 x_1, ..., x_{L-1} x_{L-1}]`` per row, with
        ``T = (L^2 + 3L)/2 + 1``. A 1-D input still gives a 2-D ``(1, T)`` result.

    Examples
    --------
    >>> vectorize([1.0, 2.0, 3.0])
    array([[1., 1., 2., 3., 1., 2., 3., 4., 6., 9.]])
    """
    x = _as_2d_labels(x)
    i, j = np.triu_indices(x.shape[1])
    return np.hstack([np.ones((x.shape[0], 1)), x, x[:, i] * x[:, j]])


def vectorize_jacobian(x) -> np.ndarray:
    """Derivatives of eta with respect to the standardised labels.

    Parameters
    ----------
    x : array_like, shape (S, L) or (L,)

    Returns
    -------
    jac : ndarray, shape (S, T, L)
        ``jac[s, t, k] = d eta_t / d x_k`` at ``x[s]``: 0 for the constant, the identity for the
        linear terms, ``delta_ik x_j + delta_jk x_i`` for the product ``x_i x_j``.
    """
    x = _as_2d_labels(x)
    s, n = x.shape
    t = n_terms(n)
    jac = np.zeros((s, t, n))
    jac[:, 1:1 + n, :] = np.eye(n)
    i, j = np.triu_indices(n)
    rows = 1 + n + np.arange(i.size)
    jac[:, rows, i] += x[:, j]
    jac[:, rows, j] += x[:, i]
    return jac


@functools.lru_cache(maxsize=16)
def _tables(n_labels: int):
    """Index tables for monomials of degree <= 4 in ``n_labels`` variables (cached).

    Monomials are multisets of label indices, ordered by degree, then lexicographically; the
    first T of them are exactly the terms of eta, the first K3 those of degree <= 3.
    """
    L = n_labels
    monos = [()]
    for d in range(1, 5):
        monos += list(itertools.combinations_with_replacement(range(L), d))
    index = {m: k for k, m in enumerate(monos)}
    T = n_terms(L)
    K3 = sum(1 for m in monos if len(m) <= 3)
    K4 = len(monos)
    terms = monos[:T]
    # M4 = eta[:, a] * eta[:, b]: split every monomial into two terms.
    a = np.array([index[m[:2]] for m in monos])
    b = np.array([index[m[2:]] for m in monos])
    # Ordered pair of terms -> monomial of their product.
    pair = np.array([[index[tuple(sorted(tu + tv))] for tv in terms] for tu in terms])
    # Hessian (k <= l): sum_{m2} p[h_idx[q, m2]] * h_fac[q, m2] * M_m2
    hk, hl = np.triu_indices(L)
    h_idx = np.zeros((hk.size, T), dtype=np.intp)
    h_fac = np.zeros((hk.size, T))
    for q, (k, l_) in enumerate(zip(hk, hl)):
        for j, m in enumerate(terms):
            tgt = tuple(sorted(m + (k, l_)))
            h_idx[q, j] = index[tgt]
            ek, el = tgt.count(k), tgt.count(l_)
            h_fac[q, j] = ek * (ek - 1) if k == l_ else ek * el
    # Sparse map from ordered term pairs (t, u) flattened to monomials, for Q and Gram gathers.
    term_labels = [set(m) for m in terms]
    qi, qj = np.triu_indices(L)
    # full L x L matrix entry (k, l) -> its upper-triangle index q of (hk, hl)
    h_full = np.zeros((L, L), dtype=np.intp)
    h_full[hk, hl] = np.arange(hk.size)
    h_full[hl, hk] = np.arange(hk.size)
    h_full = h_full.ravel()
    return dict(L=L, T=T, K3=K3, K4=K4, monos=monos, a=a, b=b, pair=pair, hk=hk, hl=hl,
                h_idx=h_idx, h_fac=h_fac, qi=qi, qj=qj, terms=terms, term_labels=term_labels,
                h_full=h_full, q_mult=np.where(qi == qj, 1.0, 2.0))


def _monomials4(x: np.ndarray, tab) -> np.ndarray:
    """All monomials of degree <= 4, shape (S, K4), of standardised labels x (S, L)."""
    eta = vectorize(x)
    out = np.take(eta, tab["a"], axis=1)
    out *= np.take(eta, tab["b"], axis=1)
    return out


# --------------------------------------------------------------------------------------------
# Label scaling
# --------------------------------------------------------------------------------------------

class LabelScaler:
    """Standardise labels with the training mean and standard deviation (paper section 3).

    ``x = (l - mean) / std``; undone by :meth:`inverse_transform` after inference.

    Parameters
    ----------
    mean, std : array_like, shape (L,)
        Physical units of each label. ``std`` must be positive.
    """

    def __init__(self, mean, std):
        self.mean = np.atleast_1d(np.asarray(mean, dtype=float)).copy()
        self.std = np.atleast_1d(np.asarray(std, dtype=float)).copy()
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(f"mean and std must both have shape (L,), got {self.mean.shape} "
                             f"and {self.std.shape}")
        if not (np.all(np.isfinite(self.std)) and np.all(self.std > 0)):
            raise ValueError(f"label std must be finite and > 0, got {self.std}")
        if not np.all(np.isfinite(self.mean)):
            raise ValueError(f"label mean must be finite, got {self.mean}")

    @classmethod
    def fit(cls, labels) -> "LabelScaler":
        """Scaler from training labels (S, L): their mean and (population) standard deviation."""
        labels = _as_2d_labels(labels, "labels")
        std = labels.std(axis=0)
        if np.any(~(std > 0)):
            bad = np.flatnonzero(~(std > 0)).tolist()
            raise ValueError(f"labels at columns {bad} have zero spread in the training set; "
                             "a constant label cannot be standardised")
        return cls(labels.mean(axis=0), std)

    @property
    def n_labels(self) -> int:
        return self.mean.size

    def _check(self, a):
        a = np.asarray(a, dtype=float)
        if a.shape[-1] != self.n_labels:
            raise ValueError(f"expected {self.n_labels} labels in the last axis, got shape "
                             f"{a.shape}")
        return a

    def transform(self, labels) -> np.ndarray:
        """Physical labels (..., L) -> standardised ``(l - mean) / std``."""
        return (self._check(labels) - self.mean) / self.std

    def inverse_transform(self, x) -> np.ndarray:
        """Standardised labels (..., L) -> physical ``x * std + mean``."""
        return self._check(x) * self.std + self.mean

    def inverse_transform_cov(self, cov) -> np.ndarray:
        """Covariance (..., L, L) in standardised units -> physical units."""
        cov = np.asarray(cov, dtype=float)
        return cov * self.std[:, None] * self.std[None, :]

    def __repr__(self):
        return f"LabelScaler(mean={self.mean!r}, std={self.std!r})"


# --------------------------------------------------------------------------------------------
# Small vectorised linear algebra
# --------------------------------------------------------------------------------------------

def _batched_cholesky_solve(a: np.ndarray, b: np.ndarray):
    """Solve ``a x = b`` for a batch of small symmetric matrices by Cholesky.

    Vectorised over the batch with a loop over the (small) matrix size, so thousands of 10 x 10
    systems cost a few dozen numpy calls. Returns ``(x, ok)``; ``ok`` is False where ``a`` is not
    (numerically) positive definite, and ``x`` is meaningless there.
    """
    n, m = b.shape
    low = np.zeros_like(a)
    ok = np.ones(n, dtype=bool)
    scale = np.abs(np.einsum("nii->n", a)) / m + 1e-300
    for j in range(m):
        s = a[:, j, j] - np.einsum("nk,nk->n", low[:, j, :j], low[:, j, :j])
        good = s > 1e-13 * scale
        ok &= good
        d = np.sqrt(np.where(s > 0, s, 1.0))
        low[:, j, j] = d
        if j + 1 < m:
            low[:, j + 1:, j] = (a[:, j + 1:, j]
                                 - np.einsum("nik,nk->ni", low[:, j + 1:, :j], low[:, j, :j])
                                 ) / d[:, None]
    y = np.zeros_like(b)
    for j in range(m):
        y[:, j] = (b[:, j] - np.einsum("nk,nk->n", low[:, j, :j], y[:, :j])) / low[:, j, j]
    x = np.zeros_like(b)
    for j in range(m - 1, -1, -1):
        x[:, j] = (y[:, j] - np.einsum("nk,nk->n", low[:, j + 1:, j], x[:, j + 1:])) / low[:, j, j]
    return x, ok


try:  # LAPACK Cholesky over a stack, NaN (not an exception) where a matrix is not PD
    from numpy.linalg import _umath_linalg as _np_umath_linalg

    _cholesky_lo_gufunc = _np_umath_linalg.cholesky_lo
except (ImportError, AttributeError):  # pragma: no cover - numpy internals moved
    _cholesky_lo_gufunc = None


def _newton_step(h: np.ndarray, g: np.ndarray):
    """Newton step ``-h^-1 g`` for a batch of small symmetric matrices (n, m, m), (n, m).

    Returns ``(step, ok)``; ``ok`` is False where ``h`` is not (numerically) positive definite
    (a Cholesky pivot ``<= 1e-13`` times the mean absolute diagonal, as in
    :func:`_batched_cholesky_solve`), and ``step`` is 0 there. LAPACK's batched Cholesky
    decides definiteness and a batched LU solve gives the step (a few calls, not a loop over
    the matrix size).
    """
    n, m = g.shape
    if _cholesky_lo_gufunc is None:  # pragma: no cover
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            st, ok = _batched_cholesky_solve(h, -g)
        st[~ok] = 0.0
        return st, ok
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        low = _cholesky_lo_gufunc(h, signature="d->d")
        piv = np.einsum("nii->ni", low)
        piv = piv * piv
        scale = np.abs(np.einsum("nii->n", h)) / m + 1e-300
        ok = np.all(piv > 1e-13 * scale[:, None], axis=1)      # NaN pivots are False
    step = np.zeros_like(g)
    if ok.all():
        step = -np.linalg.solve(h, g[:, :, None])[:, :, 0]
    elif ok.any():
        step[ok] = -np.linalg.solve(h[ok], g[ok][:, :, None])[:, :, 0]
    return step, ok


# --------------------------------------------------------------------------------------------
# Test-step results
# --------------------------------------------------------------------------------------------

@dataclass
class TestResult:
    """Labels and diagnostics of the test step for S spectra.

    Attributes
    ----------
    label_names : tuple of str, length L
    labels : ndarray (S, L)
        Maximum-likelihood labels in physical units (NaN where ``flag & FLAG_NO_PIXELS``).
    cov : ndarray (S, L, L)
        Formal covariance, the inverse Hessian of ``chi2/2`` at the fit, physical units.
    chi2 : ndarray (S,)
        ``sum_p (f_p - theta_p . eta)^2 / (sigma_p^2 + s_p^2)`` over the usable pixels.
    chi2_windows : dict name -> ndarray (S,)
        The same sum restricted to each window mask.
    n_pixels : ndarray (S,) int
        Usable pixels (ivar > 0, finite, trained pixel).
    n_iter : ndarray (S,) int
        Newton iterations of the start that gave the best fit.
    converged : ndarray (S,) bool
    flag : ndarray (S,) int
        Bitmask, see :data:`FLAG_BITS`.
    """

    __test__ = False  # not a pytest test class despite the name

    label_names: tuple
    labels: np.ndarray
    cov: np.ndarray
    chi2: np.ndarray
    chi2_windows: dict = field(default_factory=dict)
    n_pixels: np.ndarray = None
    n_iter: np.ndarray = None
    converged: np.ndarray = None
    flag: np.ndarray = None
    #: With ``residual_bins``: name -> (S,) binned residual statistic (see :meth:`CannonModel.test`).
    binned: dict = field(default_factory=dict)

    @property
    def errors(self) -> np.ndarray:
        """Formal 1-sigma errors (S, L), physical units: square roots of the covariance diagonal."""
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.einsum("sii->si", self.cov))

    def __len__(self):
        return self.labels.shape[0]

    def to_table(self):
        """The results as an :class:`astropy.table.Table`.

        Columns: one per label (with unit), ``e_<label>``, ``chi2``, ``chi2_<window>``,
        ``n_pixels``, ``n_iter``, ``converged``, ``flag``. Flag bits are described in the
        table meta under ``flag_bits``.
        """
        from astropy.table import Table

        from .labels import unit

        t = Table()
        err = self.errors
        for k, name in enumerate(self.label_names):
            t[name] = self.labels[:, k]
            t[name].unit = unit(name)
            t[name].description = f"maximum-likelihood {name} from the Cannon test step"
        for k, name in enumerate(self.label_names):
            t[f"e_{name}"] = err[:, k]
            t[f"e_{name}"].unit = unit(name)
            t[f"e_{name}"].description = f"formal 1-sigma error of {name} (inverse Hessian)"
        t["chi2"] = self.chi2
        t["chi2"].description = "chi2 of the best-fit model over all usable pixels"
        for name, val in self.chi2_windows.items():
            t[f"chi2_{name}"] = val
            t[f"chi2_{name}"].description = f"chi2 of the best-fit model in the {name} windows"
        t["n_pixels"] = self.n_pixels
        t["n_pixels"].description = "usable pixels in the fit"
        t["n_iter"] = self.n_iter
        t["n_iter"].description = "Newton iterations"
        t["converged"] = self.converged
        t["converged"].description = "the Newton iteration converged"
        t["flag"] = self.flag
        t["flag"].description = "bitmask: " + ", ".join(
            f"{bit}={name}" for bit, (name, _) in FLAG_BITS.items())
        t.meta["flag_bits"] = {name: bit for bit, (name, _) in FLAG_BITS.items()}
        return t


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def _labels_array(labels, label_names) -> np.ndarray:
    """Labels from an ndarray (S, L) or a table/DataFrame/dict with the named columns."""
    names = list(label_names)
    if hasattr(labels, "colnames") or hasattr(labels, "columns") or isinstance(labels, dict):
        cols = labels.colnames if hasattr(labels, "colnames") else list(
            labels.columns if hasattr(labels, "columns") else labels.keys())
        missing = [n for n in names if n not in cols]
        if missing:
            raise ValueError(f"labels table lacks columns {missing}; expected {names}")
        return np.column_stack([np.asarray(labels[n], dtype=float) for n in names])
    if getattr(labels, "dtype", None) is not None and labels.dtype.names:
        missing = [n for n in names if n not in labels.dtype.names]
        if missing:
            raise ValueError(f"labels array lacks fields {missing}; expected {names}")
        return np.column_stack([np.asarray(labels[n], dtype=float) for n in names])
    arr = np.asarray(labels, dtype=float)
    if arr.ndim == 1 and arr.size == len(names):
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise ValueError(f"labels must have shape (S, {len(names)}) for labels {names}, "
                         f"got shape {arr.shape}")
    return arr


def _check_spectra(flux, ivar, n_pix, what):
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    if flux.ndim == 1:
        flux = flux[None, :]
    if ivar.ndim == 1:
        ivar = ivar[None, :]
    if flux.ndim != 2 or ivar.ndim != 2:
        raise ValueError(f"{what}: flux and ivar must have shape (S, P), got {flux.shape} and "
                         f"{ivar.shape}")
    if flux.shape != ivar.shape:
        raise ValueError(f"{what}: flux and ivar must have the same shape, got flux "
                         f"{flux.shape} and ivar {ivar.shape}")
    if n_pix is not None and flux.shape[1] != n_pix:
        raise ValueError(f"{what}: expected {n_pix} pixels per spectrum, got shape {flux.shape}")
    return flux, ivar


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class CannonModel:
    """The quadratic Cannon: train on labelled spectra, infer labels of new ones.

    Parameters
    ----------
    label_names : sequence of str, length L
        Label names in model order (e.g. :data:`lamostcannon.labels.GIANT_LABELS`).
    wavelength : array_like (P,), optional
        Rest-frame vacuum wavelengths in Angstrom (stored with the model, fixes P).
    label_mask : dict str -> bool array (P,), optional
        ``label_mask[name][p]`` is True where label ``name`` may act. At pixels where it is
        False, every term of eta containing that label is fixed to zero (paper section 3).
        Labels not in the dict act everywhere.

    Attributes (after :meth:`train` or :meth:`read`)
    ------------------------------------------------
    theta : ndarray (P, T)
        Coefficients theta_lambda of paper eq. 3 in standardised label units.
    s2 : ndarray (P,)
        Intrinsic variance s_lambda^2 (normalised flux units squared); ``inf`` at pixels that
        could not be trained.
    pixel_ok : ndarray (P,) bool
        Pixels trained on enough data; the others have ``theta = (1, 0, ..., 0)``, ``s2 = inf``
        and are ignored by the test step.
    scaler : LabelScaler
    label_range : ndarray (2, L)
        Training minimum and maximum of each label, physical units.
    training_hash : str
        sha256 of the training labels, flux and inverse variances (float64 bytes + shapes).
    starts : ndarray (K, L)
        Standardised starting points of the test step (training mean + k-means centres).
    """

    def __init__(self, label_names, wavelength=None, label_mask=None):
        names = tuple(str(n) for n in label_names)
        if len(names) == 0:
            raise ValueError("need at least one label name")
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be unique, got {names}")
        self.label_names = names
        self.wavelength = None
        if wavelength is not None:
            wl = np.asarray(wavelength, dtype=float)
            if wl.ndim != 1 or wl.size == 0:
                raise ValueError(f"wavelength must have shape (P,), got {wl.shape}")
            self.wavelength = wl
        self.label_mask = None
        if label_mask:
            self.label_mask = {}
            for name, m in label_mask.items():
                if name not in names:
                    raise ValueError(f"label_mask names unknown label {name!r}; labels are "
                                     f"{list(names)}")
                m = np.asarray(m)
                if m.ndim != 1 or m.dtype != bool:
                    raise ValueError(f"label_mask[{name!r}] must be a bool array of shape (P,), "
                                     f"got dtype {m.dtype} shape {m.shape}")
                if self.wavelength is not None and m.size != self.wavelength.size:
                    raise ValueError(f"label_mask[{name!r}] has {m.size} pixels, wavelength "
                                     f"has {self.wavelength.size}")
                self.label_mask[name] = m.copy()
            sizes = {m.size for m in self.label_mask.values()}
            if len(sizes) > 1:
                raise ValueError(f"label masks have different lengths {sorted(sizes)}")
        self.theta = None
        self.s2 = None
        self.pixel_ok = None
        self.scaler = None
        self.label_range = None
        self.training_hash = None
        self.starts = None
        self.n_train = 0
        self.meta = {}
        self._q = None

    # ---- basic properties -----------------------------------------------------------------
    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_terms(self) -> int:
        return n_terms(self.n_labels)

    @property
    def term_names(self) -> list[str]:
        return term_names(self.label_names)

    @property
    def n_pixels(self):
        if self.theta is not None:
            return self.theta.shape[0]
        if self.wavelength is not None:
            return self.wavelength.size
        if self.label_mask:
            return next(iter(self.label_mask.values())).size
        return None

    @property
    def is_trained(self) -> bool:
        return self.theta is not None

    def _require_trained(self):
        if not self.is_trained:
            raise RuntimeError("the model is not trained; call train() or CannonModel.read()")

    def __repr__(self):
        state = (f"trained on {self.n_train} spectra, {int(self.pixel_ok.sum())}/{self.n_pixels} "
                 "pixels ok" if self.is_trained else "untrained")
        return f"<CannonModel labels={list(self.label_names)} {state}>"

    def active_terms(self) -> np.ndarray:
        """Bool (P, T): term t may be non-zero at pixel p (all its labels act there)."""
        P = self.n_pixels
        tab = _tables(self.n_labels)
        act = np.ones((P, self.n_terms), dtype=bool)
        if self.label_mask:
            for name, m in self.label_mask.items():
                k = self.label_names.index(name)
                has = np.array([k in s for s in tab["term_labels"]])
                act[np.ix_(~m, has)] = False
        return act

    # ---- training -------------------------------------------------------------------------
    def train(self, labels, flux, ivar, *, ridge: float = 1e-8, min_stars=None,
              s2_rtol: float = 1e-5, max_outer: int = 50, pixel_chunk: int = 512,
              n_starts_kmeans: int = 64, label_errors=None):
        """Fit theta and s^2 at every pixel (paper eqs. 3 and 5).

        Parameters
        ----------
        labels : ndarray (S, L), or a table/DataFrame/dict with columns ``label_names``
            Training labels in physical units; all finite.
        flux : array_like (S, P)
            Continuum-normalised flux.
        ivar : array_like (S, P)
            Inverse variances ``1/sigma^2``; zero marks missing data. Must be finite and >= 0,
            and flux must be finite wherever ivar > 0.
        ridge : float
            Ridge added to the Jacobi-scaled normal equations of the non-constant terms.
        min_stars : int, optional
            Pixels with fewer usable training spectra are not trained (``pixel_ok = False``).
            Default: twice the number of free terms at the pixel.
        s2_rtol : float
            Relative change of s^2 that ends the alternation.
        max_outer : int
            Most theta / s^2 alternations.
        pixel_chunk : int
            Pixels per batch of normal equations (bounds memory).
        n_starts_kmeans : int
            k-means centres of the training labels kept as test-step starting points.
        label_errors : ndarray (S, L) or table with ``e_<label>`` columns, optional
            1-sigma errors of the training labels (physical units; NaN, 0 or a missing column:
            none). Given, the model is fitted to the labels' regression calibration
            (:func:`regression_calibrate`), the expected true labels given the noisy ones,
            instead of the noisy labels themselves (errors in variables): a model fitted to
            noisy labels learns derivatives attenuated by the noise and reports labels
            stretched away from the mean, and more training stars do not cure it. The scatter
            ``s^2`` is fitted to the residuals at the calibrated labels. ``label_range`` and
            the test step's starting points stay those of the labels as given. With errors for
            every label, on the ``large`` mock it halves the held-out giants' teff error
            against the truth (115 -> 59 K with 7,200 training giants) but triples the dwarfs'
            (64 -> 216 K), whose logg errors are as large as its spread along the main sequence
            (reliability 0.24), so the calibrated logg follows teff and the model can no longer
            tell the two apart (``benchmarks/study_label_noise.py``). The notebooks give the
            dwarf model the errors of its ``[X/Fe]`` labels only
            (:func:`lamostcannon.cleaning.training_label_errors`, which says why).

        Returns
        -------
        self

        Notes
        -----
        Alternates the exact weighted least squares for theta at fixed s^2 with the exact 1-D
        maximisation of eq. 5 in s^2 at fixed theta, for all pixels at once, until s^2 moves
        by less than ``s2_rtol * (s^2 + sigma^2)`` (sigma^2 the pixel's harmonic-mean noise
        variance); see the module docstring. Sets ``theta``, ``s2``, ``pixel_ok``, ``scaler``,
        ``label_range``, ``starts``, ``training_hash`` and ``meta`` (settings and counts).
        """
        t0 = time.perf_counter()
        lab = _labels_array(labels, self.label_names)
        if not np.all(np.isfinite(lab)):
            bad = {self.label_names[k]: int(np.sum(~np.isfinite(lab[:, k])))
                   for k in range(lab.shape[1]) if not np.all(np.isfinite(lab[:, k]))}
            raise ValueError(f"training labels must be finite; non-finite values per label: {bad}")
        flux, ivar = _check_spectra(flux, ivar, self.n_pixels, "train")
        S, P = flux.shape
        if lab.shape[0] != S:
            raise ValueError(f"labels have {lab.shape[0]} rows but flux has {S} spectra "
                             f"(shape {flux.shape})")
        T = self.n_terms
        if S <= T:
            raise ValueError(f"need more training spectra than model terms: {S} spectra for "
                             f"T={T} terms ({self.n_labels} labels)")
        flux = np.asarray(flux, dtype=np.float64)
        ivar = np.asarray(ivar, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            nan_ivar = int(np.sum(np.isnan(ivar)))
            neg_ivar = int(np.sum(ivar < 0))
            inf_ivar = int(np.sum(np.isinf(ivar)))
        if nan_ivar or neg_ivar or inf_ivar:
            raise ValueError(f"training ivar must be finite and >= 0 (0 marks missing data); got "
                             f"{nan_ivar} NaN, {inf_ivar} inf and {neg_ivar} negative values")
        use = ivar > 0
        bad_flux = int(np.sum(use & ~np.isfinite(flux)))
        if bad_flux:
            raise ValueError(f"training flux is NaN/inf at {bad_flux} pixels where ivar > 0; "
                             "set ivar = 0 there to mark them missing")

        err = None
        if label_errors is not None:
            err = _label_errors_array(label_errors, self.label_names, lab.shape)
        self.training_hash = _training_hash(lab, flux, ivar) if err is None else \
            _training_hash(np.hstack([lab, err]), flux, ivar)
        self.scaler = LabelScaler.fit(lab)
        self.label_range = np.vstack([lab.min(axis=0), lab.max(axis=0)])
        given = self.scaler.transform(lab)
        # errors in variables: fit to the expected true labels given the noisy ones
        x = given if err is None else self.scaler.transform(regression_calibrate(lab, err))
        tab = _tables(self.n_labels)
        eta = vectorize(x)
        m4 = _monomials4(x, tab)
        # pixel-major copies: every per-pixel operation below reads contiguous rows
        ivT = np.ascontiguousarray(ivar.T)                       # (P, S)
        fT = np.ascontiguousarray(np.where(use, flux, 0.0).T)    # (P, S), 0 where missing
        act = self.active_terms() if self.label_mask else None
        n_act = act.sum(axis=1) if act is not None else np.full(P, T)
        need = 2 * n_act if min_stars is None else np.full(P, int(min_stars))
        n_use = (ivT > 0).sum(axis=1)
        ok = n_use >= need
        if not ok.any():  # nothing to fit: a model of no pixel would fail only at test time
            raise ValueError(f"no pixel has enough training spectra with ivar > 0 (need "
                             f"{int(need.min())}; at most {int(n_use.max())} at any pixel)")
        # harmonic-mean noise variance per pixel: the scale of the absolute s2 tolerance
        sig2_typ = n_use / np.maximum(ivT.sum(axis=1), 1e-300)

        theta = np.zeros((P, T))
        theta[:, 0] = 1.0
        s2 = np.zeros(P)
        idx = np.flatnonzero(ok)
        solver = _ThetaSolver(eta, m4, fT, ivT, tab, act, ridge, pixel_chunk)
        th, good = solver.solve(idx, s2[idx])
        theta[idx] = th
        ok[idx[~good]] = False
        todo = idx[good]
        n_outer = 0
        while todo.size and n_outer < max_outer:
            n_outer += 1
            new = np.empty(todo.size)
            for a in range(0, todo.size, pixel_chunk):
                rows = todo[a:a + pixel_chunk]
                resid = fT[rows] - theta[rows] @ eta.T           # (n, S)
                new[a:a + pixel_chunk] = _ml_s2(resid, ivT[rows], s2[rows])
            moved = np.abs(new - s2[todo]) > s2_rtol * (new + sig2_typ[todo])
            s2[todo] = new
            th, good = solver.solve(todo, new)
            theta[todo] = th
            ok[todo[~good]] = False
            todo = todo[moved & good]
            logger.debug("training alternation %d: %d pixels still moving", n_outer, todo.size)
        if todo.size:
            logger.warning("s2 not converged to rtol=%g at %d pixels after %d alternations",
                           s2_rtol, todo.size, max_outer)
        theta[~ok] = 0.0
        theta[~ok, 0] = 1.0
        s2[~ok] = np.inf
        self.theta, self.s2, self.pixel_ok = theta, s2, ok
        self.n_train = S
        self.starts = _starting_points(given, n_starts_kmeans)
        self._q = None
        self.meta = dict(ridge=float(ridge), min_stars=-1 if min_stars is None else int(min_stars),
                         errors_in_variables=err is not None,
                         n_outer=int(n_outer), s2_rtol=float(s2_rtol),
                         s2_unconverged=int(todo.size), train_seconds=time.perf_counter() - t0)
        logger.info("trained on %d spectra x %d pixels, %d labels: %d pixels ok, %d alternations, "
                    "%.2f s", S, P, self.n_labels, int(ok.sum()), n_outer, self.meta["train_seconds"])
        return self

    # ---- prediction -----------------------------------------------------------------------
    def predict(self, labels) -> np.ndarray:
        """Model flux ``theta . eta(x)`` for physical labels.

        Parameters
        ----------
        labels : array_like (S, L) or (L,), or a table with the label columns

        Returns
        -------
        flux : ndarray (S, P), or (P,) for a single 1-D label vector
        """
        self._require_trained()
        single = np.ndim(labels) == 1 and not hasattr(labels, "colnames")
        lab = _labels_array(labels, self.label_names)
        out = vectorize(self.scaler.transform(lab)) @ self.theta.T
        return out[0] if single else out

    # ---- test step ------------------------------------------------------------------------
    def _test_arrays(self):
        """Cached test-step arrays over the trained pixels.

        ``q`` (P_ok, K4): for each pixel, ``theta_t theta_u`` summed over the ordered term pairs
        of every monomial, with the constant coefficient moved to the data side (the fit uses
        ``f - theta_0`` and ``theta`` without its constant term, which keeps the polynomial's
        coefficients small and its evaluation well conditioned).
        """
        if self._q is None:
            tab = _tables(self.n_labels)
            T, K4 = tab["T"], tab["K4"]
            ok = self.pixel_ok
            th = self.theta[ok].copy()
            th0 = th[:, 0].copy()
            th[:, 0] = 0.0
            pair = tab["pair"].ravel()
            q = np.zeros((th.shape[0], K4))
            for start in range(0, th.shape[0], 1024):
                blk = th[start:start + 1024]
                prod = (blk[:, :, None] * blk[:, None, :]).reshape(blk.shape[0], T * T)
                q[start:start + 1024] = _scatter_columns(prod, pair, K4)
            # contiguous runs of trained pixels (start, stop, position among trained pixels)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
            runs = [(int(i0), int(i1), int(np.count_nonzero(ok[:i0])))
                    for i0, i1 in zip(edges[::2], edges[1::2])]
            L = self.n_labels
            self._q = dict(q=q, q32=np.ascontiguousarray(q[:, L + 1:], dtype=np.float32),
                           theta_c=np.ascontiguousarray(th), theta_ct=np.ascontiguousarray(th.T),
                           theta0=th0,
                           ok_runs=runs if len(runs) <= 64 else None,
                           theta=np.ascontiguousarray(self.theta[ok]), s2=self.s2[ok].copy(),
                           all_ok=bool(ok.all()))
        return self._q

    def _bounds(self, bound):
        lo = self.scaler.transform(self.label_range[0]) - bound
        hi = self.scaler.transform(self.label_range[1]) + bound
        return lo, hi

    def test(self, flux, ivar, *, windows=None, chunk_size: int = 512, n_starts: int = N_STARTS,
             max_iter: int = 50, bound: float = 1.0, init=None, n_threads=None,
             residual_bins=None, compiled=None) -> TestResult:
        """Maximum-likelihood labels of many spectra (the test step of paper section 3).

        Parameters
        ----------
        flux, ivar : array_like (S, P)
            Continuum-normalised flux and inverse variance on the model's pixel grid. Pixels
            with ivar = 0 are missing; NaN/inf/negative ivar and non-finite flux with ivar > 0
            are masked too and set ``FLAG_BAD_INPUT``. float32 input is fine.
        windows : dict str -> bool (P,), optional
            Pixel masks; chi2 is also reported inside each (``chi2_windows``).
        chunk_size : int
            Spectra per batch; memory is about ``chunk_size * (8 P + 60 T) * 8`` bytes,
            independent of S.
        n_starts : int
            Newton runs per spectrum, from the best of the stored starting points (plus ``init``);
            default :data:`N_STARTS`.
        max_iter : int
            Most Newton iterations per start.
        bound : float
            Labels stay within ``[min - bound, max + bound]`` of the training labels, in units of
            the training standard deviation.
        init : array_like (S, L), optional
            Extra physical starting labels per spectrum (e.g. survey pipeline values).
        n_threads : int, optional
            Threads to use. Default: the current BLAS thread limit (so ``threadpoolctl``
            limits are respected). With more than one, chunks run concurrently in worker threads
            with single-threaded BLAS each (memory grows to ``n_threads`` chunks).
        residual_bins : object, optional
            Bins of pixels for residual statistics computed at the best fit from the same explicit
            residuals as the window chi2 (cheaply, inside the batched step): attributes ``cols``
            (grid pixels, trained), ``order``/``starts`` (the bins' positions in ``cols``, for
            ``numpy.add.reduceat``), ``sizes``, ``names`` and ``window_bins`` (a slice of bins
            per name), as :class:`lamostcannon.ood._Binner` builds them. For each name
            ``binned[name]`` is the mean over its bins of ``(sum_p z_p)^2 / n`` with
            ``z = (f - model) / sqrt(sigma^2 + s^2)`` (NaN without a fit or usable pixel).
        compiled : bool, optional
            Run the Newton iteration compiled (:mod:`lamostcannon.kernels`, where numba works)
            or in numpy; the same steps, labels equal to rounding. Default: compiled for calls
            of at least :data:`lamostcannon.kernels.NEWTON_MIN_SPECTRA` spectra (loading numba
            costs ~0.5 s per process).

        Returns
        -------
        TestResult
        """
        self._require_trained()
        if not np.any(self.pixel_ok):
            raise ValueError("the model has no trained pixel (pixel_ok is all False); it cannot "
                             "label spectra")
        flux, ivar = _check_spectra(flux, ivar, self.n_pixels, "test")
        S, P = flux.shape
        win_names, win_mat = [], None
        if windows:
            cols = []
            for name, m in windows.items():
                m = np.asarray(m)
                if m.shape != (P,) or m.dtype != bool:
                    raise ValueError(f"windows[{name!r}] must be a bool mask of shape ({P},), got "
                                     f"dtype {m.dtype} shape {m.shape}")
                win_names.append(str(name))
                cols.append(m[self.pixel_ok])
            win_mat = np.column_stack(cols).astype(np.float64)
        x_init = None
        if init is not None:
            x_init = self.scaler.transform(_labels_array(init, self.label_names))
            if x_init.shape[0] != S:
                raise ValueError(f"init has {x_init.shape[0]} rows, expected {S} (one per "
                                 "spectrum)")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        L = self.n_labels
        res = TestResult(
            label_names=self.label_names, labels=np.full((S, L), np.nan),
            cov=np.full((S, L, L), np.nan), chi2=np.full(S, np.nan),
            chi2_windows={n: np.full(S, np.nan) for n in win_names},
            n_pixels=np.zeros(S, dtype=np.int64), n_iter=np.zeros(S, dtype=np.int64),
            converged=np.zeros(S, dtype=bool), flag=np.zeros(S, dtype=np.int64))
        from threadpoolctl import threadpool_limits

        workers = _blas_threads() if n_threads is None else int(n_threads)
        n_chunks = -(-S // chunk_size)
        workers = max(1, min(workers, n_chunks))
        t0 = time.perf_counter()
        arrs = dict(self._test_arrays())                # per-call additions stay local
        lo, hi = self._bounds(bound)
        arrs["starts"] = np.clip(self.starts, lo, hi)
        arrs["starts_m4"] = _monomials4(arrs["starts"], _tables(L))
        arrs["timing"] = {}
        arrs["buffers"] = threading.local()
        # the compiled Newton iteration pays for loading numba (~0.5 s per process) from a few
        # thousand spectra on; decided per call, so equal calls take the same path in any process
        if compiled is None:
            compiled = S >= kernels.NEWTON_MIN_SPECTRA
        arrs["compiled"] = bool(compiled) and kernels.ENABLED and kernels.ready()
        if win_names or residual_bins is not None:
            # columns (positions among the trained pixels) with explicit residuals: the windows'
            # and the residual bins' together, so that both share one prediction
            use = win_mat.any(axis=1) if win_names else np.zeros(int(self.pixel_ok.sum()), bool)
            if residual_bins is not None:
                pos = np.cumsum(self.pixel_ok) - 1
                bcols = np.asarray(residual_bins.cols, dtype=np.int64)
                if not self.pixel_ok[bcols].all():
                    raise ValueError("residual_bins.cols must be trained pixels")
                use[pos[bcols]] = True
            arrs["win_cols"] = np.flatnonzero(use)
            arrs["win_theta_t"] = np.ascontiguousarray(arrs["theta_c"][arrs["win_cols"]].T)
            if win_names:
                arrs["win_mat"] = np.ascontiguousarray(win_mat[arrs["win_cols"]])
            if residual_bins is not None:
                where = np.searchsorted(arrs["win_cols"], pos[bcols])
                arrs["bin_cols"] = where[np.asarray(residual_bins.order, np.int64)]
                arrs["bins"] = residual_bins
                res.binned = {n: np.full(S, np.nan) for n in residual_bins.names}

        def run(start):
            sl = slice(start, min(S, start + chunk_size))
            self._test_chunk(flux[sl], ivar[sl], sl, res, arrs, lo, hi, win_names, win_mat,
                             None if x_init is None else x_init[sl], n_starts, max_iter)
            logger.debug("test step: spectra %d-%d done", sl.start, sl.stop)

        starts = range(0, S, chunk_size)
        if workers == 1:
            limit = (contextlib.nullcontext() if n_threads is None else
                     threadpool_limits(limits=1, user_api="blas"))
            with limit:
                for start in starts:
                    run(start)
        else:
            # one chunk per worker thread, each with single-threaded BLAS: numpy releases the
            # GIL in its loops, so the element-wise and Newton work runs in parallel too
            from concurrent.futures import ThreadPoolExecutor

            with threadpool_limits(limits=1, user_api="blas"), \
                    ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(run, starts):
                    pass
        dt = time.perf_counter() - t0
        timing = arrs.pop("timing", {})
        logger.debug("test step time per phase (s): %s",
                     {k: round(v, 3) for k, v in timing.items()})
        logger.info("test step: %d spectra in %.2f s (%.3f ms/spectrum); %d flagged", S, dt,
                    1e3 * dt / max(S, 1), int(np.sum(res.flag != 0)))
        return res

    def _test_chunk(self, flux, ivar, sl, res, arrs, lo, hi, win_names, win_mat, x_init,
                    n_starts, max_iter):
        tab = _tables(self.n_labels)
        T = tab["T"]
        ok = self.pixel_ok
        clock = [time.perf_counter()]
        timing = arrs["timing"]

        def lap(name):
            now = time.perf_counter()
            timing[name] = timing.get(name, 0.0) + now - clock[0]
            clock[0] = now

        # Inputs: ivar must be finite and >= 0, flux finite where ivar > 0; anything else is
        # masked and flagged. Cheap row reductions find the rare rows that need the slow path.
        # Done in blocks of rows small enough to stay in cache; only the weights w, the weighted
        # centred flux w (f - theta_0) and the windows' pixels are kept for the whole chunk.
        n = flux.shape[0]
        all_ok, ok_runs = arrs["all_ok"], arrs["ok_runs"]
        s2, theta0 = arrs["s2"], arrs["theta0"]
        n_ok = s2.size
        flag = np.zeros(n, dtype=np.int64)
        # reused between the chunks of one call (per thread): fresh pages cost page faults
        w = _work_buffer(arrs, "w", (n, n_ok))
        wf = _work_buffer(arrs, "wf", (n, n_ok))
        w32 = _work_buffer(arrs, "w32", (n, n_ok), np.float32) if POLY_FLOAT32 else None
        c = np.empty(n)
        n_pix = np.empty(n, dtype=np.int64)
        cols = arrs.get("win_cols")
        explicit = cols is not None
        if explicit:
            f_win = np.empty((n, cols.size))
            w_win = np.empty((n, cols.size))
        blk = max(1, min(n, _WEIGHT_BLOCK))
        f_buf = np.empty((blk, n_ok))
        t_buf = np.empty((blk, n_ok))
        with np.errstate(invalid="ignore", over="ignore"):
            for a in range(0, n, blk):
                b = min(n, a + blk)
                fb, tb, wb, wfb = f_buf[:b - a], t_buf[:b - a], w[a:b], wf[a:b]
                if all_ok:
                    np.copyto(fb, flux[a:b], casting="unsafe")
                    np.copyto(wb, ivar[a:b], casting="unsafe")
                elif ok_runs is not None:                # trained pixels as a few slices
                    for i0, i1, j0 in ok_runs:
                        np.copyto(fb[:, j0:j0 + i1 - i0], flux[a:b, i0:i1], casting="unsafe")
                        np.copyto(wb[:, j0:j0 + i1 - i0], ivar[a:b, i0:i1], casting="unsafe")
                else:
                    np.copyto(fb, flux[a:b][:, ok], casting="unsafe")
                    np.copyto(wb, ivar[a:b][:, ok], casting="unsafe")
                rows = np.flatnonzero(~(np.isfinite(wb.sum(axis=1)) & (wb.min(axis=1) >= 0)))
                if rows.size:
                    sub = wb[rows]
                    sub[~np.isfinite(sub) | (sub < 0)] = 0.0
                    wb[rows] = sub
                    flag[a + rows] |= FLAG_BAD_INPUT
                np.multiply(wb, s2, out=tb)
                tb += 1.0
                np.divide(wb, tb, out=wb)                # 1 / (sigma^2 + s^2); 0 if ivar = 0
                fb -= theta0                             # centred flux f - theta_0
                np.copyto(fb, 0.0, where=wb == 0.0)      # missing data (often NaN) -> 0
                rows = np.flatnonzero(~np.isfinite(fb.sum(axis=1)))
                if rows.size:
                    sub_f, sub_w = fb[rows], wb[rows]
                    bad = ~np.isfinite(sub_f)
                    sub_f[bad] = 0.0
                    sub_w[bad] = 0.0
                    fb[rows], wb[rows] = sub_f, sub_w
                    flag[a + rows] |= FLAG_BAD_INPUT
                n_pix[a:b] = np.count_nonzero(wb, axis=1)
                if w32 is not None:
                    np.copyto(w32[a:b], wb, casting="same_kind")
                np.multiply(wb, fb, out=wfb)
                c[a:b] = np.einsum("sp,sp->s", wfb, fb)
                if explicit:
                    np.take(fb, cols, axis=1, out=f_win[a:b])
                    np.take(wb, cols, axis=1, out=w_win[a:b])
        del f_buf, t_buf
        lap("weights")
        # chi2(x) = sum_m poly_m M4_m(x): the whole spectrum's likelihood in K4 numbers. The
        # columns of q of degree <= 1 are zero (theta_0 is on the data side), so they are skipped.
        # The degree 2-4 coefficients (the bulk of the work) come from a float32 product (twice
        # as fast); the linear ones, b = Theta^T W f, in float64. Their rounding (~1e-6 relative)
        # only shapes the path of the Newton iteration: its result is then polished with one
        # Newton step on the exact float64 gradient and chi2 (_polish_exact).
        L = self.n_labels
        poly = _work_buffer(arrs, "poly", (n, tab["K4"]))
        if w32 is not None:
            p32 = _work_buffer(arrs, "p32", (n, tab["K4"] - L - 1), np.float32)
            np.matmul(w32, arrs["q32"], out=p32)
            poly[:, L + 1:] = p32
        else:
            np.matmul(w, arrs["q"][:, L + 1:], out=poly[:, L + 1:])
        poly[:, :L + 1] = 0.0
        lin = wf @ arrs["theta_c"]                       # (n, T): Theta^T W (f - theta_0)
        poly[:, :T] -= 2.0 * lin
        poly[:, 0] += c
        lap("polynomial")
        fit = n_pix > 0
        out_x = np.full((n, L), np.nan)
        out_cov = np.full((n, L, L), np.nan)
        out_chi2 = np.full(n, np.nan)
        n_iter = np.zeros(n, dtype=np.int64)
        conv = np.zeros(n, dtype=bool)
        flag |= np.where(fit, 0, FLAG_NO_PIXELS) | np.where(fit & (n_pix < T), FLAG_FEW_PIXELS, 0)
        if fit.any():
            fi = np.flatnonzero(fit)
            pf = poly if fi.size == n else poly[fi]
            exact = _ExactChi2(w if fi.size == n else w[fi], lin[fi], c[fi], arrs,
                               _work_buffer(arrs, "pred", (fi.size, n_ok)))
            xs, chi, it, cv, fl, hess = _fit_labels(
                pf, arrs["starts_m4"], arrs["starts"], lo, hi, tab, n_starts, max_iter,
                None if x_init is None else x_init[fi], exact=exact, compiled=arrs["compiled"])
            out_x[fi] = xs
            out_chi2[fi] = chi
            n_iter[fi] = it
            conv[fi] = cv
            flag[fi] |= fl
            cov_std, pd = _inverse_spd(0.5 * hess)      # inverse Hessian of chi2 / 2
            flag[fi[~pd]] |= FLAG_COV_NOT_PD
            cov_std[~pd] = np.nan
            out_cov[fi] = cov_std
        lap("newton")
        # chi2 at the best fit from the polynomial (the minimised objective itself); chi2 in
        # the windows from explicit residuals on the windows' pixels
        res.labels[sl] = self.scaler.inverse_transform(out_x)
        res.cov[sl] = self.scaler.inverse_transform_cov(out_cov)
        res.chi2[sl] = out_chi2
        if explicit:
            x_eval = np.where(np.isfinite(out_x), out_x, 0.0)
            r = vectorize(x_eval) @ arrs["win_theta_t"]
            np.subtract(f_win, r, out=r)
            if "bins" in arrs and len(arrs["bins"].starts):
                self._binned_statistics(r, w_win, arrs, fit & np.all(np.isfinite(out_x), axis=1),
                                        res, sl)
        if win_names:
            r *= r
            r *= w_win
            cw = r @ arrs["win_mat"]
            cw[~fit] = np.nan
            for k, name in enumerate(win_names):
                res.chi2_windows[name][sl] = cw[:, k]
        res.n_pixels[sl] = n_pix
        res.n_iter[sl] = n_iter
        res.converged[sl] = conv
        res.flag[sl] = flag
        lap("chi2")

    @staticmethod
    def _binned_statistics(r, w_win, arrs, ok_rows, res, sl):
        """Residual statistics of ``residual_bins`` from the explicit residuals ``r`` (f - model,
        window columns) and weights ``w_win`` (1 / (sigma^2 + s^2), 0 where missing)."""
        bins, idx = arrs["bins"], arrs["bin_cols"]
        wz = np.take(w_win, idx, axis=1)
        z = np.take(r, idx, axis=1)
        z *= np.sqrt(wz)
        zs = np.add.reduceat(z, bins.starts, axis=1)
        usable = wz > 0
        if usable.all():
            nn = np.broadcast_to(np.asarray(bins.sizes, float), zs.shape)
        else:
            nn = np.add.reduceat(usable.astype(np.int16), bins.starts, axis=1).astype(float)
        has = nn > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            term = np.where(has, zs * zs / np.where(has, nn, 1.0), 0.0)
            for name, b in zip(bins.names, bins.window_bins):
                nb = has[:, b].sum(axis=1)
                stat = term[:, b].sum(axis=1) / nb
                res.binned[name][sl] = np.where(ok_rows & (nb > 0), stat, np.nan)

    # ---- slow reference --------------------------------------------------------------------
    def test_reference(self, flux, ivar, *, bound: float = 1.0, init=None):
        """Slow per-spectrum reference fit with :func:`scipy.optimize.least_squares`.

        Minimises the same chi2 as :meth:`test` (same weights, same bounds) one spectrum at a
        time, from the best stored starting point (or ``init``), with the analytic Jacobian
        ``-sqrt(w) Theta J_eta`` and tight tolerances. For checks and benchmarks only.

        Returns
        -------
        labels : ndarray (S, L), physical units
        chi2 : ndarray (S,)
        """
        from scipy.optimize import least_squares

        self._require_trained()
        flux, ivar = _check_spectra(flux, ivar, self.n_pixels, "test_reference")
        S = flux.shape[0]
        lo, hi = self._bounds(bound)
        x_init = None
        if init is not None:
            x_init = self.scaler.transform(_labels_array(init, self.label_names))
        out = np.full((S, self.n_labels), np.nan)
        chi2 = np.full(S, np.nan)
        ok = self.pixel_ok
        for s in range(S):
            f = np.asarray(flux[s], dtype=float)
            iv = np.asarray(ivar[s], dtype=float)
            with np.errstate(invalid="ignore"):
                use = ok & np.isfinite(iv) & (iv > 0) & np.isfinite(f)
            if not use.any():
                continue
            th = self.theta[use]
            sw = np.sqrt(iv[use] / (1.0 + iv[use] * self.s2[use]))
            fu = f[use]
            etas = vectorize(self.starts)
            c_st = ((sw[None, :] * (fu[None, :] - etas @ th.T)) ** 2).sum(axis=1)
            x0 = self.starts[int(np.argmin(c_st))]
            if x_init is not None:
                ci = ((sw * (fu - vectorize(x_init[s])[0] @ th.T)) ** 2).sum()
                if ci < c_st.min():
                    x0 = x_init[s]
            x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)

            def fun(x):
                return sw * (fu - th @ vectorize(x)[0])

            def jac(x):
                return -sw[:, None] * (th @ vectorize_jacobian(x)[0])

            sol = least_squares(fun, x0, jac=jac, bounds=(lo, hi), method="trf", xtol=1e-12,
                                ftol=1e-12, gtol=1e-12, max_nfev=500)
            out[s] = sol.x
            chi2[s] = 2.0 * sol.cost
        return self.scaler.inverse_transform(out), chi2

    # ---- files -------------------------------------------------------------------------------
    def write(self, path, overwrite: bool = False):
        """Write the model to one FITS file (written to a temporary name, then renamed).

        HDUs: primary (provenance header: ``FORMAT``, ``FMTVERS``, ``LCVERS`` package version,
        ``DATE``, ``NLABEL``, ``LABELnn``, ``NTERM``, ``NPIX``, ``NTRAIN``, ``TRNHASH`` sha256 of
        the training set, training settings), ``THETA`` (P, T) float64 with ``TERMnnn`` names,
        ``S2`` (P,), ``PIXOK`` (P,) uint8, ``SCALING`` table (label, mean, std, min, max),
        ``STARTS`` (K, L), and when present ``WAVELENGTH`` (P,) Angstrom and ``LABELMASK``
        (L, P) uint8. Every HDU carries FITS checksums.
        """
        from astropy.io import fits
        from astropy.table import Table

        from . import __version__

        self._require_trained()
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        hdr = fits.Header()
        hdr["FORMAT"] = (FILE_FORMAT, "file format")
        hdr["FMTVERS"] = (FILE_FORMAT_VERSION, "file format version")
        hdr["LCVERS"] = (__version__, "lamostcannon version that trained the model")
        hdr["DATE"] = (_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                       "UTC date of writing")
        hdr["NLABEL"] = (self.n_labels, "number of labels L")
        for k, name in enumerate(self.label_names):
            hdr[f"LABEL{k:02d}"] = (name, f"label {k}")
        hdr["NTERM"] = (self.n_terms, "quadratic terms T = (L^2+3L)/2+1")
        hdr["NPIX"] = (self.n_pixels, "pixels P")
        hdr["NTRAIN"] = (int(self.n_train), "training spectra")
        hdr["TRNHASH"] = self.training_hash or ""      # sha256 of training labels+flux+ivar
        for key, (card, comment) in _META_CARDS.items():
            if key in self.meta:
                hdr[card] = (self.meta[key], comment)
        hdr["HASWAVE"] = (self.wavelength is not None, "WAVELENGTH HDU present")
        hdr["HASMASK"] = (self.label_mask is not None, "LABELMASK HDU present")
        hdus = [fits.PrimaryHDU(header=hdr)]
        th = fits.ImageHDU(self.theta.astype(np.float64), name="THETA")
        for k, name in enumerate(self.term_names):
            th.header[f"TERM{k:03d}"] = name
        hdus.append(th)
        hdus.append(fits.ImageHDU(self.s2.astype(np.float64), name="S2"))
        hdus.append(fits.ImageHDU(self.pixel_ok.astype(np.uint8), name="PIXOK"))
        scal = Table({"label": np.array(self.label_names), "mean": self.scaler.mean,
                      "std": self.scaler.std, "min": self.label_range[0],
                      "max": self.label_range[1]})
        hdus.append(fits.BinTableHDU(scal, name="SCALING"))
        hdus.append(fits.ImageHDU(self.starts.astype(np.float64), name="STARTS"))
        if self.wavelength is not None:
            wh = fits.ImageHDU(self.wavelength.astype(np.float64), name="WAVELENGTH")
            wh.header["BUNIT"] = "Angstrom"
            hdus.append(wh)
        if self.label_mask is not None:
            mask = np.ones((self.n_labels, self.n_pixels), dtype=np.uint8)
            for name, m in self.label_mask.items():
                mask[self.label_names.index(name)] = m
            mh = fits.ImageHDU(mask, name="LABELMASK")
            for k, name in enumerate(self.label_names):
                mh.header[f"MASKED{k:02d}"] = name in self.label_mask
            hdus.append(mh)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fits.HDUList(hdus).writeto(tmp, overwrite=True, checksum=True)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        logger.info("wrote model to %s", path)
        return path

    @classmethod
    def read(cls, path) -> "CannonModel":
        """Read a model written by :meth:`write`, checking its structure and checksums.

        Raises
        ------
        FileNotFoundError
            The file does not exist.
        ModelFileError
            The file is truncated, corrupt, misses an HDU or has inconsistent shapes; the message
            names what was expected.
        """
        from astropy.io import fits
        from astropy.utils.exceptions import AstropyWarning

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", AstropyWarning)
                with fits.open(path, memmap=False, checksum=True) as hdul:
                    hdul.verify("exception")
                    parts = {h.name: (h.header.copy(), None if h.data is None else
                                      (h.data.copy() if h.name != "SCALING" else h.data))
                             for h in hdul}
                    if "SCALING" in parts:
                        sc = parts["SCALING"][1]
                        parts["SCALING"] = (parts["SCALING"][0], None if sc is None else {
                            n: np.array(sc[n]) for n in sc.names})
        except ModelFileError:
            raise
        except Exception as exc:  # astropy raises OSError, ValueError, warnings-as-errors ...
            raise ModelFileError(f"{path} is not a readable lamostcannon model FITS file "
                                 f"(truncated or corrupt?): {type(exc).__name__}: {exc}") from exc
        model = cls._from_parts(parts, path)
        # a model written by another major.minor version may not mean the same: say so
        from . import __version__

        written = str(model.meta.get("version") or "unknown")
        if written.split(".")[:2] != __version__.split(".")[:2]:
            text = (f"{path} was written by lamostcannon {written}, this is {__version__}: "
                    "the model may differ in meaning (labels, preprocessing); retrain it or use "
                    "the version that wrote it")
            logger.warning(text)
            warnings.warn(text, UserWarning, stacklevel=2)
        return model

    @classmethod
    def _from_parts(cls, parts, path):
        def need(name):
            if name not in parts or parts[name][1] is None:
                raise ModelFileError(f"{path}: missing HDU {name!r}; a model file has HDUs "
                                     "PRIMARY, THETA, S2, PIXOK, SCALING, STARTS "
                                     f"(found {sorted(parts)})")
            return parts[name][1]

        hdr = parts.get("PRIMARY", (None, None))[0]
        if hdr is None or hdr.get("FORMAT") != FILE_FORMAT:
            raise ModelFileError(f"{path}: primary header FORMAT is "
                                 f"{None if hdr is None else hdr.get('FORMAT')!r}, expected "
                                 f"{FILE_FORMAT!r}")
        if int(hdr.get("FMTVERS", -1)) > FILE_FORMAT_VERSION:
            raise ModelFileError(f"{path}: format version {hdr.get('FMTVERS')} is newer than "
                                 f"this package reads ({FILE_FORMAT_VERSION})")
        try:
            L = int(hdr["NLABEL"])
            names = [str(hdr[f"LABEL{k:02d}"]) for k in range(L)]
        except KeyError as exc:
            raise ModelFileError(f"{path}: primary header lacks {exc}") from exc
        T = n_terms(L)
        theta = np.asarray(need("THETA"), dtype=float)
        P = int(hdr.get("NPIX", theta.shape[0] if theta.ndim == 2 else -1))
        if theta.shape != (P, T):
            raise ModelFileError(f"{path}: THETA has shape {theta.shape}, expected ({P}, {T}) for "
                                 f"{L} labels and {P} pixels")
        s2 = np.asarray(need("S2"), dtype=float)
        if s2.shape != (P,):
            raise ModelFileError(f"{path}: S2 has shape {s2.shape}, expected ({P},)")
        pix = np.asarray(need("PIXOK"))
        if pix.shape != (P,):
            raise ModelFileError(f"{path}: PIXOK has shape {pix.shape}, expected ({P},)")
        sc = need("SCALING")
        for col in ("label", "mean", "std", "min", "max"):
            if col not in sc or sc[col].shape != (L,):
                raise ModelFileError(f"{path}: SCALING needs column {col!r} with {L} rows")
        if [str(v).strip() for v in sc["label"]] != names:
            raise ModelFileError(f"{path}: SCALING labels {list(sc['label'])} differ from header "
                                 f"labels {names}")
        starts = np.asarray(need("STARTS"), dtype=float)
        if starts.ndim != 2 or starts.shape[1] != L:
            raise ModelFileError(f"{path}: STARTS has shape {starts.shape}, expected (K, {L})")
        wl = None
        if hdr.get("HASWAVE", False):
            wl = np.asarray(need("WAVELENGTH"), dtype=float)
            if wl.shape != (P,):
                raise ModelFileError(f"{path}: WAVELENGTH has shape {wl.shape}, expected ({P},)")
        mask = None
        if hdr.get("HASMASK", False):
            mk = np.asarray(need("LABELMASK"))
            if mk.shape != (L, P):
                raise ModelFileError(f"{path}: LABELMASK has shape {mk.shape}, expected ({L}, {P})")
            mh = parts["LABELMASK"][0]
            mask = {names[k]: mk[k].astype(bool) for k in range(L) if mh.get(f"MASKED{k:02d}")}
        model = cls(names, wavelength=wl, label_mask=mask)
        model.theta = theta
        model.s2 = s2
        model.pixel_ok = pix.astype(bool)
        model.scaler = LabelScaler(sc["mean"], sc["std"])
        model.label_range = np.vstack([sc["min"], sc["max"]]).astype(float)
        model.starts = starts
        model.training_hash = str(hdr.get("TRNHASH", "")) or None
        model.n_train = int(hdr.get("NTRAIN", 0))
        model.meta = {"version": hdr.get("LCVERS"), "date": hdr.get("DATE")}
        for key, (card, _) in _META_CARDS.items():
            if card in hdr:
                model.meta[key] = hdr[card]
        logger.info("read model %s (%d labels, %d pixels, trained with lamostcannon %s)", path,
                    L, P, hdr.get("LCVERS"))
        return model


# --------------------------------------------------------------------------------------------
# Training internals
# --------------------------------------------------------------------------------------------

def regression_calibrate(labels, errors) -> np.ndarray:
    """Expected true labels given noisy ones: the regression calibration of errors in variables.

    For a population with mean ``mu`` and covariance ``C`` of the noisy labels and label errors
    of mean variance ``D = diag(mean(errors^2))``, the linear (Gaussian) estimate of the true
    labels is ``mu + (x - mu) (C - D) C^-1``: each label shrinks towards the mean by its
    reliability, and along the labels' correlations (a giant's teff and logg move together).
    Labels without errors (0) that are uncorrelated with the noisy ones do not move. Where the
    errors are as large as the spread (``C - D`` not positive semi-definite, as for an abundance
    with little real spread in a small training set), the negative eigenvalues of ``C - D`` are
    set to 0: nothing of the true labels is left along those directions, which shrink to the
    mean.

    Parameters
    ----------
    labels : ndarray (S, L), physical units
    errors : ndarray (S, L), 1-sigma, >= 0

    Returns
    -------
    ndarray (S, L)

    Raises
    ------
    ValueError
        Fewer than two stars, or shapes that differ.
    """
    lab = np.asarray(labels, float)
    err = np.asarray(errors, float)
    if lab.ndim != 2 or lab.shape != err.shape or lab.shape[0] < 2:
        raise ValueError(f"labels and errors must both be (S >= 2, L); got {lab.shape} and "
                         f"{err.shape}")
    mu = lab.mean(axis=0)
    cov = np.atleast_2d(np.cov(lab, rowvar=False))
    d = np.diag(np.mean(err ** 2, axis=0))
    w, v = np.linalg.eigh((cov - d + (cov - d).T) / 2)
    if np.any(w < 0):
        logger.warning("regression calibration: %d of %d directions of the labels are noise "
                       "only (errors as large as the spread); they shrink to the mean",
                       int(np.sum(w < 0)), w.size)
    signal = (v * np.clip(w, 0.0, None)) @ v.T
    gain = signal @ np.linalg.pinv(cov)
    return mu + (lab - mu) @ gain.T


def _label_errors_array(errors, names, shape) -> np.ndarray:
    """Training-label errors (S, L) from an array or a table with ``e_<label>`` columns; NaN and
    missing columns become 0 (no correction), negative or infinite values are refused."""
    if hasattr(errors, "colnames") or hasattr(errors, "columns") or isinstance(errors, dict):
        cols = list(errors.colnames) if hasattr(errors, "colnames") else list(errors.keys())
        n = shape[0]
        err = np.column_stack([np.asarray(errors[f"e_{name}"], float) if f"e_{name}" in cols
                               else np.zeros(n) for name in names])
    else:
        err = np.array(errors, dtype=float)
    if err.shape != tuple(shape):
        raise ValueError(f"label_errors must have shape {tuple(shape)}, got {err.shape}")
    err = np.where(np.isnan(err), 0.0, err)
    if not np.all(np.isfinite(err)) or np.any(err < 0):
        raise ValueError("label_errors must be finite and >= 0 (NaN: no error given)")
    return err


def _training_hash(labels, flux, ivar) -> str:
    h = hashlib.sha256()
    for arr in (labels, flux, ivar):
        a = np.ascontiguousarray(arr, dtype="<f8")
        h.update(str(a.shape).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _scatter_columns(prod: np.ndarray, target: np.ndarray, n_out: int) -> np.ndarray:
    """Sum columns of prod (n, m) into n_out columns by ``target`` (m,) (a sparse product)."""
    from scipy import sparse

    m = target.size
    sel = sparse.csr_matrix((np.ones(m), (target, np.arange(m))), shape=(n_out, m))
    return np.asarray(sel @ prod.T).T


class _ThetaSolver:
    """Batched weighted least squares for theta at fixed s^2 (the inner step of paper eq. 5).

    ``fT``, ``ivT`` are pixel-major (P, S); ``m4`` (S, K4) the label monomials of degree <= 4,
    so that the Gram matrices of n pixels are one product ``W (n, S) @ m4`` and a gather.
    """

    def __init__(self, eta, m4, fT, ivT, tab, act, ridge, pixel_chunk):
        self.eta, self.m4, self.fT, self.ivT = eta, m4, fT, ivT
        self.tab, self.act, self.ridge, self.chunk = tab, act, ridge, max(1, int(pixel_chunk))

    def solve(self, idx, s2):
        T = self.tab["T"]
        out = np.zeros((idx.size, T))
        good = np.ones(idx.size, dtype=bool)
        pair = self.tab["pair"]
        diag = np.arange(T)
        ridge = np.full(T, self.ridge)
        ridge[0] = 0.0
        for a in range(0, idx.size, self.chunk):
            rows = idx[a:a + self.chunk]
            iv = self.ivT[rows]
            w = iv / (1.0 + iv * s2[a:a + self.chunk, None])    # 0 where ivar = 0
            gram = (w @ self.m4)[:, pair]                        # (n, T, T)
            rhs = (w * self.fT[rows]) @ self.eta                 # (n, T)
            if self.act is not None:
                act = self.act[rows]
                gram *= act[:, :, None] & act[:, None, :]
                gram[:, diag, diag] = np.where(act, gram[:, diag, diag], 1.0)
                rhs *= act
            d = np.sqrt(gram[:, diag, diag])
            d = np.where(d > 0, d, 1.0)
            gram /= d[:, :, None]
            gram /= d[:, None, :]
            gram[:, diag, diag] += ridge
            rhs /= d
            try:
                sol = np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                sol = np.zeros_like(rhs)
                for k in range(gram.shape[0]):
                    try:
                        sol[k] = np.linalg.solve(gram[k], rhs[k])
                    except np.linalg.LinAlgError:
                        sol[k] = np.nan
            sol /= d
            fin = np.all(np.isfinite(sol), axis=1)
            sol[~fin] = 0.0
            out[a:a + self.chunk] = sol
            good[a:a + self.chunk] = fin
        return out, good


def _ml_s2(resid, ivar, start, max_iter: int = 60):
    """Maximum-likelihood s^2 of eq. 5 at fixed residuals, for n pixels at once.

    Parameters
    ----------
    resid, ivar : ndarray (n, S)
        Residuals ``f - theta . eta`` and inverse variances (0 = missing) per pixel and star.
    start : ndarray (n,)
        Starting values (the previous s^2).

    Solves ``g(v) = 1/2 sum_n (w_n^2 r_n^2 - w_n) = 0`` with ``w_n = ivar_n / (1 + ivar_n v)``
    by Newton steps kept inside a bracket ``[lo, hi]`` (geometric bisection when Newton leaves
    it). ``g(0) <= 0`` gives ``v = 0``; ``g(v) < 0`` for ``v >= max r^2``, which closes the
    bracket.
    """
    rr = np.where(ivar > 0, resid * resid, 0.0)
    n = rr.shape[0]
    v = np.zeros(n)
    g0 = 0.5 * (np.einsum("ps,ps,ps->p", ivar, ivar, rr) - ivar.sum(axis=1))
    act = np.flatnonzero(g0 > 0)
    if act.size == 0:
        return v
    iv, rr = ivar[act], rr[act]
    lo = np.zeros(act.size)
    hi = rr.max(axis=1)
    x = np.clip(np.where(start[act] > 0, start[act], 0.1 * hi), 1e-4 * hi, hi)
    live = np.ones(act.size, dtype=bool)
    for _ in range(max_iter):
        w = iv / (1.0 + iv * x[:, None])
        w2 = w * w
        wrr = w2 * rr
        g = 0.5 * (wrr.sum(axis=1) - w.sum(axis=1))
        dg = 0.5 * w2.sum(axis=1) - np.einsum("ps,ps->p", wrr, w)
        lo = np.where(g > 0, x, lo)
        hi = np.where(g <= 0, x, hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = x - g / dg
        inside = (dg < 0) & (newton > lo) & (newton < hi)
        mid = np.where(lo > 0, np.sqrt(lo * hi), 0.5 * hi)
        x_new = np.where(inside, newton, mid)
        done = (np.abs(x_new - x) <= 1e-10 * x_new) | (hi - lo <= 1e-12 * hi)
        x = x_new
        live &= ~done
        if not live.any():
            break
        if live.sum() <= 0.5 * live.size:      # compact the work arrays
            v[act[~live]] = x[~live]
            act, iv, rr = act[live], iv[live], rr[live]
            x, lo, hi = x[live], lo[live], hi[live]
            live = np.ones(act.size, dtype=bool)
    v[act] = x
    return v


def _starting_points(x: np.ndarray, k: int) -> np.ndarray:
    """Training mean (0) and up to k k-means centres of standardised training labels x (S, L).

    Deterministic: farthest-point initialisation from the origin, then Lloyd iterations.
    """
    S = x.shape[0]
    k = int(min(k, S))
    if k <= 0:
        return np.zeros((1, x.shape[1]))
    chosen = [int(np.argmin((x * x).sum(axis=1)))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(k - 1):
        j = int(np.argmax(d2))
        chosen.append(j)
        d2 = np.minimum(d2, ((x - x[j]) ** 2).sum(axis=1))
    cent = x[chosen].copy()
    for _ in range(25):
        dist = (x * x).sum(1)[:, None] - 2 * x @ cent.T + (cent * cent).sum(1)[None, :]
        lab = np.argmin(dist, axis=1)
        counts = np.bincount(lab, minlength=k)
        sums = np.zeros_like(cent)
        np.add.at(sums, lab, x)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], cent)
        if np.allclose(new, cent):
            break
        cent = new
    return np.vstack([np.zeros((1, x.shape[1])), cent])


# --------------------------------------------------------------------------------------------
# Test-step internals
# --------------------------------------------------------------------------------------------

def _blas_threads() -> int:
    """The BLAS thread limit in force (threadpoolctl), 1 if unknown."""
    try:
        from threadpoolctl import threadpool_info

        counts = [i.get("num_threads", 1) for i in threadpool_info()
                  if i.get("user_api") == "blas"]
        return max(1, int(min(counts))) if counts else 1
    except Exception:  # pragma: no cover - threadpoolctl missing or broken
        return 1


def _work_buffer(arrs, name, shape, dtype=np.float64):
    """An uninitialised array of ``shape`` reused by the calling thread within one call."""
    store = arrs["buffers"].__dict__
    size = int(np.prod(shape))
    buf = store.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = store[name] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def _inverse_spd(h: np.ndarray):
    """Inverse of a batch of symmetric matrices (n, L, L); ``ok`` False where not PD (NaN there)."""
    n, L, _ = h.shape
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        _, ok = _batched_cholesky_solve(np.nan_to_num(h), np.ones((n, L)))
    inv = np.full_like(h, np.nan)
    if ok.any():
        inv[ok] = np.linalg.inv(h[ok])
        inv[ok] = 0.5 * (inv[ok] + np.swapaxes(inv[ok], 1, 2))
    return inv, ok


class _Quartic:
    """chi2(x) = sum_m p_m M_m(x) for a batch of spectra, with gradient and exact Hessian.

    Only the Hessian is contracted from a coefficient tensor: every entry ``H_kl(x)`` is a
    quadratic polynomial, ``H(x) = H0 + H1(x) + H2(x)`` split by degree (constant, linear,
    quadratic in x). Along the ray ``t x`` the gradient and the value follow by integration,
    exactly for a quartic: ``grad(x) = g0 + (H0 + H1(x)/2 + H2(x)/3) x`` and
    ``chi2(x) = p0 + g0.x + x^T (H0/2 + H1(x)/6 + H2(x)/12) x``, with ``p0``, ``g0`` the
    constant and linear coefficients. This reads one (L(L+1)/2 x T) tensor per spectrum
    instead of separate gradient and Hessian tensors.
    """

    def __init__(self, poly, tab):
        self.tab = tab
        L, T = tab["L"], tab["T"]
        self.p0 = poly[:, 0].copy()
        self.g0 = poly[:, 1:L + 1].copy()
        h_idx, h_fac = tab["h_idx"], tab["h_fac"]
        self.h0 = poly[:, h_idx[:, 0]] * h_fac[:, 0]                      # (n, Q)
        self.h1 = np.take(poly, h_idx[:, 1:L + 1], axis=1)                 # (n, Q, L)
        self.h1 *= h_fac[:, 1:L + 1]
        self.h2 = np.take(poly, h_idx[:, L + 1:T], axis=1)                 # (n, Q, Q)
        self.h2 *= h_fac[:, L + 1:T]

    def subset(self, keep):
        new = object.__new__(_Quartic)
        new.tab = self.tab
        new.p0, new.g0, new.h0 = self.p0[keep], self.g0[keep], self.h0[keep]
        new.h1, new.h2 = self.h1[keep], self.h2[keep]
        return new

    def all(self, x):
        """Value (n,), gradient (n, L) and Hessian (n, L, L) at x (n, L)."""
        tab = self.tab
        L = tab["L"]
        n = x.shape[0]
        quad = x[:, tab["qi"]] * x[:, tab["qj"]]                          # (n, Q)
        h1x = np.matmul(self.h1, x[:, :, None])[:, :, 0]                    # H1(x), flat
        h2x = np.matmul(self.h2, quad[:, :, None])[:, :, 0]                 # H2(x), flat
        flat = np.empty((2, n, h1x.shape[1]))
        np.add(self.h0, h1x, out=flat[0])
        flat[0] += h2x                                                      # Hessian
        np.multiply(h1x, 0.5, out=flat[1])
        flat[1] += self.h0
        flat[1] += h2x / 3.0                                                # for the gradient
        full = np.take(flat.reshape(2 * n, -1), tab["h_full"], axis=1).reshape(2, n, L, L)
        hess = full[0]
        grad = np.matmul(full[1], x[:, :, None])[:, :, 0]
        grad += self.g0
        # x^T S x for a symmetric S stored flat: sum_q S_q x_k x_l (2 for k != l)
        hv = 0.5 * self.h0 + h1x / 6.0 + h2x / 12.0
        val = np.einsum("nq,nq->n", hv, quad * tab["q_mult"])
        val += np.einsum("nk,nk->n", self.g0, x)
        val += self.p0
        return val, grad, hess


def _newton(quartic: _Quartic, x0, lo, hi, max_iter, xtol_newton=1e-3, xtol=1e-9,
            radius0=1.0, target=None, target_ok=None, join=0.1, compiled=None):
    """Bounded Newton iteration with a trust radius on chi2, for a batch of spectra.

    Each iteration takes the Newton step ``-H^-1 grad`` (batched Cholesky); where the Hessian is
    not positive definite (far from a minimum) it takes the saddle-free step with the absolute
    eigenvalues of H (a descent direction). A label on its bound whose gradient pushes outward is
    held there (projected Newton: its row and column of H replaced by the identity, its gradient
    by 0), so that a fit on a bound converges to the minimum over the other labels. The step is
    shortened to the star's trust radius (standardised units,
    2-norm), ``x + dx`` is clipped to the bounds and accepted if chi2 did not rise. An accepted
    step that was shortened doubles the radius; a rejected step sets it to a quarter of the step
    length. Converged: an accepted, full, positive-definite Newton step shorter than
    ``xtol_newton`` (quadratic convergence leaves an error of order its square, ~1e-6), or a
    radius below ``xtol``. With ``target`` (R, n, L) a run also stops (as converged) when it comes
    within ``join`` (max norm) of one of its star's targets where ``target_ok`` (R, n): it has
    joined a basin already explored. Stars that
    are done are dropped from the work arrays.

    Returns x (n, L), chi2 (n,), iterations (n,), converged (n,).

    ``compiled`` (default :func:`lamostcannon.kernels.ready`): the same iteration runs
    compiled, one spectrum at a time (:func:`lamostcannon.kernels.newton_fits`; the same steps,
    rounded differently only in the linear solves and sums).
    """
    n, L = x0.shape
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    if compiled is None:
        compiled = kernels.ready()
    if compiled and kernels.ENABLED and lo.shape == hi.shape == (L,):
        x = np.empty((n, L))
        f = np.empty(n)
        n_it = np.zeros(n, dtype=np.int64)
        conv = np.zeros(n, dtype=bool)
        if target is None:
            target, target_ok = np.zeros((0, n, L)), np.zeros((0, n), dtype=bool)
        tab = quartic.tab
        kernels.newton_fits(
            np.ascontiguousarray(quartic.p0), np.ascontiguousarray(quartic.g0),
            np.ascontiguousarray(quartic.h0), np.ascontiguousarray(quartic.h1),
            np.ascontiguousarray(quartic.h2), tab["qi"], tab["qj"], tab["q_mult"], tab["h_full"],
            np.ascontiguousarray(x0, dtype=float), lo, hi, int(max_iter), float(xtol_newton),
            float(xtol), float(radius0), np.ascontiguousarray(target, dtype=float),
            np.ascontiguousarray(target_ok, dtype=bool), float(join), x, f, n_it, conv)
        return x, f, n_it, conv
    x = np.clip(x0, lo, hi).astype(float)
    f, g, h = quartic.all(x)
    n_it = np.zeros(n, dtype=np.int64)
    conv = np.zeros(n, dtype=bool)
    idx = np.arange(n)                      # work row -> star
    live = np.ones(n, dtype=bool)
    rad = np.full(n, float(radius0))
    q = quartic
    xa, fa, ga, ha = x.copy(), f, g, h
    tol_f = 1e-13 * np.maximum(np.abs(q.p0), 1.0)
    lo_b, hi_b = lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo)     # on a bound (as AT_BOUND)
    diag = np.arange(L)
    for _ in range(max_iter):
        # projected Newton: a label on its bound whose gradient pushes outward is held there
        # (identity row and column, no gradient) and the step solves for the other labels, so
        # that a fit on a bound converges to the minimum over the free labels
        hs, gs = ha, ga
        held = ((xa <= lo_b) & (ga > 0)) | ((xa >= hi_b) & (ga < 0))
        if held.any():
            hs = np.where(held[:, :, None] | held[:, None, :], 0.0, ha)
            hs[:, diag, diag] += held
            gs = np.where(held, 0.0, ga)
        rows = np.flatnonzero(live)
        if rows.size == live.size:
            step, posdef = _newton_step(hs, gs)
            pd = posdef
        else:
            st, pd = _newton_step(hs[rows], gs[rows])
            step = np.zeros_like(xa)
            step[rows] = st
            posdef = np.zeros(xa.shape[0], dtype=bool)
            posdef[rows] = pd
        if not pd.all():
            # indefinite Hessian (far from the minimum): saddle-free step with |eigenvalues|
            r2 = rows[~pd]
            with np.errstate(invalid="ignore"):
                e, v = np.linalg.eigh(np.nan_to_num(hs[r2]))
            e = np.abs(e)
            e = np.maximum(e, 1e-6 * e.max(axis=1, keepdims=True) + 1e-300)
            step[r2] = -np.einsum("nij,nj->ni", v, np.einsum("nji,nj->ni", v, gs[r2]) / e)
        bad = ~np.all(np.isfinite(step), axis=1)
        if bad.any():                       # NaN/inf in the polynomial: give up on these
            step[bad] = 0.0
            live &= ~bad
            if not live.any():
                break
        length = np.sqrt(np.einsum("ni,ni->n", step, step))
        short = length > rad
        step *= np.where(short, rad / np.where(length > 0, length, 1.0), 1.0)[:, None]
        xt = np.clip(xa + step, lo, hi)
        ft, gt, ht = q.all(xt)
        accept = live & (ft <= fa + tol_f)
        dx = np.max(np.abs(xt - xa), axis=1)
        full = accept & posdef & ~short
        xa[accept] = xt[accept]
        fa = np.where(accept, ft, fa)
        ga[accept] = gt[accept]
        ha[accept] = ht[accept]
        n_it[idx[live]] += 1
        taken = np.minimum(length, rad)
        rad = np.where(accept, np.where(short, 2.0 * rad, rad), 0.25 * taken)
        done = live & ((full & (dx < xtol_newton)) | (rad < xtol) | (accept & (dx < xtol)))
        if target is not None:
            near = np.max(np.abs(xa[None] - target[:, idx]), axis=2) < join
            done |= live & np.any(near & target_ok[:, idx], axis=0)
        conv[idx[done]] = True
        x[idx[live]] = xa[live]
        f[idx[live]] = fa[live]
        live &= ~done
        if not live.any():
            break
        if live.sum() <= 0.5 * live.size:   # compact the work arrays
            q = q.subset(live)
            idx, xa, fa, ga, ha = idx[live], xa[live], fa[live], ga[live], ha[live]
            rad, tol_f = rad[live], tol_f[live]
            live = np.ones(idx.size, dtype=bool)
    return x, f, n_it, conv


#: The test step's degree 2-4 polynomial coefficients from a float32 product (the final labels
#: are polished on the exact float64 chi2 either way; False: a float64 product, for checks).
POLY_FLOAT32 = True


class _ExactChi2:
    """chi2, its gradient at x, in float64 from the weights (for :func:`_polish_exact`).

    With ``pred = Theta_c eta(x)`` (the model minus theta_0) and ``u = Theta_c^T W (f - theta_0
    - pred) = lin - Theta_c^T W pred``: ``chi2 = c - eta . (lin + u)`` and
    ``grad = -2 J_eta(x)^T u``. Two (n, T) x (T, P) products: ~0.5 M multiply-adds per spectrum
    against ~4 M for the polynomial.
    """

    def __init__(self, w, lin, c, arrs, work=None):
        self.w, self.lin, self.c, self.work = w, lin, c, work
        self.theta_c, self.theta_ct = arrs["theta_c"], arrs["theta_ct"]

    def value_grad(self, x, rows):
        """chi2 (m,) and gradient (m, L) at x (m, L) for the spectra ``rows`` (all: None)."""
        eta = vectorize(x)
        m = eta.shape[0]
        out = self.work[:m] if self.work is not None and len(self.work) >= m else None
        wp = np.matmul(eta, self.theta_ct, out=out)               # pred (m, P)
        wp *= self.w if rows is None else self.w[rows]
        u = (self.lin if rows is None else self.lin[rows]) - wp @ self.theta_c
        c = self.c if rows is None else self.c[rows]
        chi2 = c - np.einsum("mt,mt->m", eta, (self.lin if rows is None else self.lin[rows]) + u)
        grad = -2.0 * np.einsum("mt,mtl->ml", u, vectorize_jacobian(x))
        return chi2, grad


#: largest polishing step (standardised units, max norm); the float32 polynomial moves a
#: minimum by ~1e-5 of that, so a larger step means the point is not a clean minimum
_POLISH_MAX = 1e-2


def _polish_exact(exact, x, hess, eligible, lo, hi, pinned=None):
    """One Newton step ``-H^-1 grad`` with the exact gradient at the best fits ``x`` (n, L).

    The Newton iteration runs on the polynomial whose degree 2-4 coefficients are rounded to
    float32 (relative error ~1e-6): its minimum lies ~1e-5 formal errors (at most ~1e-3) from
    the minimum of the exact chi2. Newton converges quadratically, so one step with the exact
    gradient (the Hessian's rounding only scales the remaining error by ~1e-4) lands on the
    exact minimum to ~1e-8 formal errors, closer than the float64 iteration's own convergence
    tolerance (``xtol_newton``). Labels on a bound (``pinned`` (n, L)) stay there and the step is
    taken in the others (their block of the Hessian), as in :func:`_newton`. Stepped:
    ``eligible`` spectra (converged) with a positive definite Hessian (block), a step below
    :data:`_POLISH_MAX` that keeps every other label strictly inside its bounds. Returns ``(x, chi2, moved)``, chi2 exact (at the polished point to second order,
    ``chi2 - g^T H^-1 g / 2``; the neglected term is cubic in a ~1e-3 step).
    """
    x = np.array(x, dtype=float)
    n = x.shape[0]
    finite = np.all(np.isfinite(x), axis=1)
    chi2 = np.full(n, np.nan)
    moved = np.zeros(n, dtype=bool)
    if not finite.any():
        return x, chi2, moved
    rows = None if finite.all() else np.flatnonzero(finite)
    xf = x if rows is None else x[rows]
    c2, g = exact.value_grad(xf, rows)
    chi2[finite] = c2
    h = hess[finite]
    pin = np.zeros(xf.shape, dtype=bool) if pinned is None else pinned[finite]
    if pin.any():  # labels on a bound: identity in their rows and columns, no gradient
        h = np.where(pin[:, :, None] | pin[:, None, :], 0.0, h)
        h[:, np.arange(xf.shape[1]), np.arange(xf.shape[1])] += pin
        g = np.where(pin, 0.0, g)
    step, pd = _newton_step(h, g)
    cand = eligible[finite] & pd & np.all(np.isfinite(step), axis=1)
    cand &= np.max(np.abs(step), axis=1) < _POLISH_MAX
    span = hi - lo
    new = xf + step
    cand &= np.all(pin | ((new > lo + 1e-9 * span) & (new < hi - 1e-9 * span)), axis=1)
    idx = np.flatnonzero(finite)[cand]
    x[idx] = new[cand]
    chi2[idx] = c2[cand] + 0.5 * np.einsum("ml,ml->m", g[cand], step[cand])
    moved[idx] = True
    return x, chi2, moved


_JOIN = 0.1
#: rows per block in the test step's weights pass (a few MB of working set, in cache)
_WEIGHT_BLOCK = 16


def _fit_labels(poly, cand_m4, cand, lo, hi, tab, n_starts, max_iter, x_init=None, exact=None,
                compiled=None):
    """Multi-start Newton fits of the quartic chi2 for n spectra.

    ``cand`` (K, L) are the (clipped) starting points and ``cand_m4`` (K, K4) their monomials;
    chi2 at all of them is one product. The first run starts at the best candidate. Each further
    run (``n_starts - 1`` of them, plus one from ``x_init`` when given) starts at the best
    candidate more than 1 (standardised, max norm) away from every minimum found so far, to
    explore another basin, and stops early once it comes within 0.1 of a minimum already found.

    With ``exact`` (:class:`_ExactChi2`), the best fit of every converged spectrum inside the
    bounds is polished by one Newton step on the exact gradient (:func:`_polish_exact`), and
    the returned chi2 is the exact one.

    Returns x (n, L), chi2 (n,), n_iter, converged, flags, Hessian of chi2 at x (n, L, L).
    """
    n = poly.shape[0]
    c_chi2 = poly @ cand_m4.T                                  # (n, K): chi2 at every start
    order = np.argsort(c_chi2, axis=1)
    quartic = _Quartic(poly, tab)
    first = cand[order[:, 0]]
    results = [_newton(quartic, first, lo, hi, max_iter, compiled=compiled)]
    found = [results[0][0]]
    starts = ["far"] * (max(1, int(n_starts)) - 1) + (["init"] if x_init is not None else [])
    for kind in starts:
        if kind == "init":
            x0 = np.where(np.isfinite(x_init), x_init, first)
        else:
            x0 = cand[order[:, len(found)]]
        results.append(_newton(quartic, x0, lo, hi, max_iter, target=np.stack(found),
                               target_ok=np.stack([res[3] for res in results]), join=_JOIN,
                               compiled=compiled))
        found.append(results[-1][0])
    chis = np.stack([r[1] for r in results])                   # (R, n)
    best = np.argmin(chis, axis=0)
    pick = np.arange(n)
    x = np.stack([r[0] for r in results])[best, pick]
    n_iter = np.stack([r[2] for r in results])[best, pick]
    conv = np.stack([r[3] for r in results])[best, pick]
    flags = np.where(conv, 0, FLAG_NOT_CONVERGED)
    span = hi - lo
    pinned = (x <= lo + 1e-9 * span) | (x >= hi - 1e-9 * span)      # (n, L)
    at_bound = np.any(pinned, axis=1)
    flags |= np.where(at_bound, FLAG_AT_BOUND, 0)
    chi2, _, hess = quartic.all(x)
    if len(results) > 1:
        xs = np.stack([r[0] for r in results])
        convs = np.stack([r[3] for r in results])
        best_chi = chis[best, pick]
        dist = np.max(np.abs(xs - x[None]), axis=2)
        other = convs & (chis - best_chi[None] < 1.0) & (dist > 0.1)
        some = np.flatnonzero(other.any(axis=0))
        if some.size and MULTIPLE_MINIMA_SIGMA > 0:
            # a minimum inside the best fit's own error bars is the same solution: keep only
            # those more than MULTIPLE_MINIMA_SIGMA formal errors away in some label
            # (a Hessian with NaN or inf gives NaN errors, and the flag stays)
            h = hess[some]
            ok_h = np.isfinite(h).all(axis=(1, 2))
            var = np.full(h.shape[:2], np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                if ok_h.any():
                    var[ok_h] = 2.0 * np.diagonal(np.linalg.pinv(h[ok_h]), axis1=1, axis2=2)
                sig = np.sqrt(np.where(var > 0, var, np.nan))          # (m, L), standardised
                far = np.max(np.abs(xs[:, some] - x[None, some]) / sig[None], axis=2)
            other[:, some] &= ~(far <= MULTIPLE_MINIMA_SIGMA)
        flags |= np.where(other.any(axis=0), FLAG_MULTIPLE_MINIMA, 0)
    if exact is not None:
        x, chi2, moved = _polish_exact(exact, x, hess, conv, lo, hi, pinned)
        if moved.any():
            hess[moved] = quartic.subset(moved).all(x[moved])[2]
    return x, chi2, n_iter, conv, flags, hess
