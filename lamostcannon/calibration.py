r"""Temperature calibration of the dwarf abundances with stars born together (beyond the paper).

The paper's dwarf abundances carry spurious trends with effective temperature (section 5.2,
appendix B, Fig 17): the members of Praesepe, which share one chemistry, show a trend of
[alpha/Fe] with teff and a dispersion (0.07 dex) larger than the CV precision (0.06 dex), and wide
binaries look like random field pairs unless both stars have nearly the same teff. The authors
trace the trends to the training labels and propose to calibrate them out with open clusters and
wide binaries. This module does that.

Model
-----
For calibrator star *i* of group *g* (the high-probability members of one open cluster, or the
two stars of one wide binary), each dwarf abundance label *y* (``alpha_fe``, ``sc_fe``, ...) is

.. math:: y_i = \mu_g\,(1 + h_i) + f(T_i, g_i, S_i, F_i) + \epsilon_i, \qquad
          f = \sum_k c_k \phi_k, \qquad h = \sum_j a_j (\psi_j - \langle\psi_j\rangle_{\rm ref}),

where :math:`\mu_g` is the group's birth composition (a nuisance parameter, one per group),
:math:`f` a smooth additive correction and :math:`1 + h` a smooth *gain*. The additive terms
:math:`\phi_k` (:func:`design`, no constant): a cubic in ``u = (teff - 5500 K) / 1000 K`` with
``v = logg - 4.4`` and ``u v``; ``l, l u, l u^2`` with ``l = log10(S/N_z / 100)``, because the
model's own trends change with S/N (on the mock, cool dwarfs' [O/Fe] is biased by -0.2 dex at S/N
30 and by +0.05 at S/N 500); and ``F u, F u^2`` with ``F`` the star's [Fe/H]. A term that is
constant within a group (a pure [Fe/H] term) cannot enter: the group means would absorb it.

Why a gain: the model's response to a star's true abundance is compressed, by a factor that
changes with teff (on the small mock the slope of the raw on the true value, dwarfs with S/N >
100, is 0.47-1.01 for [alpha/Fe] and 0.07-0.49 for [Sc/Fe] between 4000 and 6500 K, largest
near 5000 K). Then a cluster's trend with teff depends on its own chemistry, :math:`h'(T)\,\mu_g`,
which no additive :math:`f` can remove for every cluster. The gain terms :math:`\psi_j` are
leading terms of :data:`GAIN_TERMS` (``u``, ``u^2``), per label (:data:`GAIN_LABELS`); they enter
less their mean over the reference set, so the gain averages 1 there. The fit alternates between
the group means with ``c`` (exact, for the current gain) and ``a`` (exact, for the current means
and ``c``), each step lowering the same penalised loss (:func:`_solve_gain`). The binaries, two
stars each with :math:`\mu_g` spread over the field's chemistry, and the clusters' different
compositions constrain the gain.

Inputs are clipped to the calibrators' ranges, so the correction never extrapolates a polynomial.
:math:`\epsilon_i \sim N(0, e_i^2 + s^2)` with :math:`e_i` the catalogue's uncertainty and
:math:`s` an extra scatter estimated from the residuals. Profiling out the :math:`\mu_g` turns
each step into weighted least squares on *within-group* deviations, so

* a group-level shift (a cluster richer in alpha than another, a binary richer than the field)
  never enters the additive fit and can never be fitted away;
* the coefficients carry a ridge penalty :math:`\lambda \sum_k (s_k c_k)^2` (``s_k`` the
  within-group spread of term *k*; the same for ``a``), with :math:`\lambda` chosen by
  leave-groups-out cross-validation (groups, never single stars, are held out); large
  :math:`\lambda` means "no correction";
* one round of sigma clipping (default 4 sigma) removes non-members and unresolved companions.

A star is calibrated by inverting the model: :math:`x_{\rm cal} = (x - f) / (1 + h) + c_0`, the
gain floored at :data:`GAIN_MIN`. The abundance scale stays GALAH's: :math:`c_0` makes the mean
change :math:`x_{\rm cal} - x` over the reference set zero: over its stars' catalogue rows
(:func:`reference_rows`, what the catalogue publishes for them), or over its own training labels
and terms when the catalogue holds too few of them.
The uncertainty comes from a bootstrap over groups (groups resampled with replacement, the fit
repeated with the chosen :math:`\lambda`): the covariance :math:`\Sigma` of ``(c, a, c0)``,
propagated linearly through the inversion, gives :math:`\sigma_f`, and the catalogue's
calibrated uncertainty is :math:`e_{\rm cal} = \sqrt{(e / (1 + h))^2 + \sigma_f^2}`.

How the gain's form is chosen: per label, on the calibrators at hand (:func:`select_gain_form`,
the default ``gain_labels="cv"``), never on the test clusters. Each candidate (no gain, ``u``,
``u, u^2``) is fitted, then judged by leave-one-cluster-out over the calibrating clusters with at
least :data:`GAIN_CV_MIN_MEMBERS` members: the mean (slope / error)^2 of a held-out cluster's
calibrated trend with teff. A gain is taken only where it lowers that score by more than noise
would, and only if held-out dispersions do not grow. The forms are not fixed once for all
because they are not the same from one data set to the next: on the small mock this gives a gain
to [Sc/Fe] (score 6.46 -> 0.94) and [Eu/Fe] (6.55 -> 4.02) of the skilled and calibrated labels,
with every seed tried (0-3, 2020), and a form fixed from the small mock (a quadratic gain for
[O/Fe]) left the ``large`` mock's Praesepe with its raw [O/Fe] trend (0.118 -> 0.108 dex per
1000 K, against 0.046 with the form chosen there). The ridge and the forms are chosen on CV
losses averaged over :data:`CV_REPEATS` partitions of the groups, with each label's own random
stream: with one partition, shared across labels, the small mock's [alpha/Fe] got a gain with
some seeds and none with others (Praesepe's calibrated trend -0.009 or -0.034 dex per 1000 K). The scores also say what the calibration cannot do: with
every form they stay well above 1 for most labels, i.e. the clusters' residual trends differ by
more than their noise, and a held-out cluster keeps a residual trend of that size.

Held out by design: the clusters in ``test_clusters`` (Praesepe, ``NGC_2632``, by default) are
never used for fitting, and the wide binaries are split deterministically
(:func:`lamostcannon.binaries.binary_split`) into a half that calibrates and a half that judges.

Products: ``processed/calibration_dwarf.json`` beside the models (coefficients, covariance,
anchor, chosen ridge, CV curve, provenance: package version, date, the dwarf model's training
hash, the groups used and those held out); the catalogue's ``<x>_cal`` and ``e_<x>_cal`` columns
for the dwarfs (:func:`apply`, called by :func:`lamostcannon.catalog.build_catalog`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import paths
from .labels import DWARF_LABELS

log = logging.getLogger(__name__)

#: The dwarf model's abundance labels: the labels the calibration corrects by default.
DWARF_ABUNDANCES = tuple(name for name in DWARF_LABELS if name.endswith("_fe"))
#: File name of the calibration beside the models.
FILE_NAME = "calibration_dwarf.json"
#: Clusters held out of every fit (the test of paper Fig 17): Praesepe.
TEST_CLUSTERS = ("NGC_2632",)
#: Default membership-probability threshold of cluster calibrators (Cantat-Gaudin ``proba``).
MIN_PROBA = 0.7
#: Pivots of the basis: ``u = (teff - TEFF0) / TEFF_SCALE``, ``v = logg - LOGG0``,
#: ``l = log10(snr_z / SNR0)``, ``f = [Fe/H]``.
TEFF0, TEFF_SCALE, LOGG0, SNR0 = 5500.0, 1000.0, 4.4, 100.0
#: Terms in teff and logg (no constant: that is each group's own mean).
TERMS_TEFF_LOGG = ("u", "u2", "u3", "v", "uv")
#: Terms in S/N: the model's own noise-driven trends change with S/N.
TERMS_SNR = ("l", "lu", "lu2")
#: Terms in [Fe/H]: how the teff trends change with metallicity.
TERMS_FEH = ("fu", "fu2")
#: Default terms of the correction.
TERMS = TERMS_TEFF_LOGG + TERMS_SNR + TERMS_FEH
#: Further terms :func:`design` knows (not in the default basis).
TERMS_EXTRA = ("u4", "lu3", "l2", "l2u")
#: Catalogue column each kind of term needs.
_INPUT_OF = {**{k: ("teff", "logg") for k in TERMS_TEFF_LOGG + ("u4",)},
             **{k: ("teff", "snr_z") for k in TERMS_SNR + ("lu3", "l2", "l2u")},
             **{k: ("teff", "fe_h") for k in TERMS_FEH}}
#: Default terms of the gain ``1 + h`` (:func:`fit`): a quadratic in ``u`` (chosen by
#: leave-one-cluster-out CV over the calibrating clusters, see the module docstring). The
#: model's true compression also changes with S/N, and ``gain_terms=("l", "u", "lu")`` fits
#: that (``l`` first), but from stars born together it came out with the wrong sign on the mock:
#: ``large``'s [alpha/Fe] gain at 5000 K was 1.68 at S/N 30 and 1.09 at S/N 300, where the slope
#: of the raw on the true values is 0.97-1.08 at every S/N (0.49 against 0.86 at 6000-7000 K).
#: It brought the faint stars closer to the truth only by shrinking them toward the reference
#: mean, and widened bright Praesepe's calibrated [alpha/Fe] (0.054 -> 0.074 dex).
GAIN_TERMS = ("u", "u2")
#: How each label's gain form is chosen: ``"cv"`` picks, per label and on the calibrators at
#: hand, among no gain and the leading terms of :data:`GAIN_TERMS` by leave-one-cluster-out CV
#: (:func:`select_gain_form`); a dict ``{label: terms}`` fixes the forms instead.
GAIN_LABELS = "cv"
#: Clusters with fewer calibrating members do not judge a gain form (their slope is noise).
GAIN_CV_MIN_MEMBERS = 10
#: A form with more gain terms is kept only if its held-out (slope / error)^2 is below this
#: fraction of the simpler form's; ties go to the simpler form.
GAIN_CV_MARGIN = 0.9
#: ... and only if the held-out clusters' dispersions grow by at most this factor on average.
GAIN_CV_MAX_DISPERSION = 1.05
#: Smallest gain the inversion divides by (guards a fitted gain that would cross zero).
GAIN_MIN = 0.5
#: Most alternating steps of the gain fit (:func:`_solve_gain`).
GAIN_ITERATIONS = 50
#: Ridge strengths tried by the leave-groups-out cross-validation (dimensionless).
LAMBDAS = tuple(np.r_[0.0, np.logspace(-4, 2, 25)])
#: The ridge's leave-groups-out CV loss is averaged over this many random partitions of the
#: groups into folds: one partition's choice of the ridge moved with the seed (on the small
#: mock, [alpha/Fe]'s ridge went from 0.001 to 0.18 between two draws, and with it the gain form
#: chosen and Praesepe's calibrated slope, -0.009 or -0.03 dex per 1000 K).
CV_REPEATS = 5
FORMAT_VERSION = 2


# ----------------------------------------------------------------------------- basis
def inputs(terms) -> tuple[str, ...]:
    """Catalogue columns the ``terms`` need (``teff``, ``logg``, ``snr_z``, ``fe_h``)."""
    unknown = [k for k in terms if k not in _INPUT_OF]
    if unknown:
        raise ValueError(f"unknown terms {unknown}; known: {TERMS + TERMS_EXTRA}")
    need = {"teff", "logg"} | {c for k in terms for c in _INPUT_OF[k]}
    return tuple(c for c in ("teff", "logg", "snr_z", "fe_h") if c in need)


def design(table, terms=TERMS, ranges=None) -> np.ndarray:
    """Terms of the correction for the rows of ``table``, inputs clipped to ``ranges``.

    Parameters
    ----------
    table : DataFrame, Table or dict of arrays (S,)
        ``teff`` (K), ``logg`` (dex) and, for the S/N and [Fe/H] terms, ``snr_z`` (LAMOST z-band
        S/N) and ``fe_h`` (dex).
    terms : sequence of str
        Any of ``u, u2, u3, v, uv`` (``u = (teff - 5500 K) / 1000 K``, ``v = logg - 4.4``),
        ``l, lu, lu2`` (``l = log10(snr_z / 100)``), ``fu, fu2`` (``f = [Fe/H]``) and the
        further ``u4, lu3, l2, l2u`` (:data:`TERMS_EXTRA`, for experiments: on the mock they
        change the held-out clusters' residual trends by less than their cluster-to-cluster
        scatter).
    ranges : dict ``{column: (lo, hi)}``, optional
        The calibrators' ranges; inputs outside are clipped to them (the correction is constant
        beyond the calibrated range rather than an extrapolated polynomial).

    Returns
    -------
    array (S, len(terms)); NaN where an input is missing or not finite (S/N <= 0 included).
    """
    need = inputs(terms)
    cols = {}
    for c in need:
        try:
            v = np.asarray(table[c], float)
        except (KeyError, ValueError):
            raise KeyError(f"the correction's terms {tuple(terms)} need column {c!r}") from None
        if c == "snr_z":
            with np.errstate(invalid="ignore", divide="ignore"):
                v = np.log10(np.where(v > 0, v, np.nan) / SNR0)
        if ranges is not None and c in ranges:
            lo, hi = ranges[c]
            if c == "snr_z":
                lo, hi = np.log10(lo / SNR0), np.log10(hi / SNR0)
            v = np.clip(v, lo, hi)
        cols[c] = v
    shapes = {v.shape for v in cols.values()}
    if len(shapes) != 1:
        raise ValueError(f"inputs {need} differ in shape: {shapes}")
    u = (cols["teff"] - TEFF0) / TEFF_SCALE
    v = cols["logg"] - LOGG0
    ll = cols.get("snr_z")
    f = cols.get("fe_h")
    make = {"u": lambda: u, "u2": lambda: u**2, "u3": lambda: u**3, "u4": lambda: u**4,
            "v": lambda: v, "uv": lambda: u * v, "l": lambda: ll, "lu": lambda: ll * u,
            "lu2": lambda: ll * u**2, "lu3": lambda: ll * u**3, "l2": lambda: ll**2,
            "l2u": lambda: ll**2 * u, "fu": lambda: f * u, "fu2": lambda: f * u**2}
    if not terms:
        return np.zeros((u.size, 0))
    return np.column_stack([make[k]() for k in terms])


def _group_center(values, codes, weights, n_groups):
    """Weighted within-group deviations of ``values`` (S,) or (S, K)."""
    v = np.asarray(values, float)
    two_d = v.ndim == 2
    vv = v if two_d else v[:, None]
    wsum = np.bincount(codes, weights=weights, minlength=n_groups)
    means = np.column_stack([np.bincount(codes, weights=weights * vv[:, k], minlength=n_groups)
                             for k in range(vv.shape[1])])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = means / wsum[:, None]
    out = vv - np.nan_to_num(means)[codes]
    return out if two_d else out[:, 0]


def _solve(Xc, yc, w, lam):
    """Ridge solution of ``yc ~ Xc c`` with weights ``w`` and penalty ``lam sum(w) sum (s_k c_k)^2``."""
    sw = w.sum()
    s2 = (w[:, None] * Xc**2).sum(axis=0) / max(sw, 1e-300)
    A = (Xc * w[:, None]).T @ Xc + lam * sw * np.diag(s2)
    b = (Xc * w[:, None]).T @ yc
    # tiny jitter keeps degenerate designs (e.g. one isochrone only) solvable at lam = 0
    A = A + 1e-10 * np.trace(A) / len(A) * np.eye(len(A))
    return np.linalg.solve(A, b)


def _wloss(r, w):
    return float(np.sum(w * r**2) / np.sum(w)) if np.sum(w) > 0 else np.nan


# ----------------------------------------------------------------------------- result
@dataclass
class LabelCalibration:
    """The fitted correction of one label (see the module docstring).

    ``coef`` (K,): coefficients ``c`` of the additive terms; ``gain_coef`` (J,): coefficients
    ``a`` of the gain terms; ``offset``: ``c0`` (dex), which makes the mean change over the
    reference set zero; ``cov`` (K+J+1, K+J+1): bootstrap covariance of ``(c, a, c0)``;
    ``anchor`` (K,), ``gain_anchor`` (J,): means of the additive and gain terms over the
    reference set (the gain terms enter less this mean, so the gain averages 1 there);
    ``ref_mean``: the reference set's mean value of the label (dex); ``lam``: the chosen ridge;
    ``cv_lambdas``, ``cv_loss``: the leave-groups-out CV curve (weighted within-group variance
    of held-out groups, dex^2); ``loss_none``: the same without correction; ``extra_scatter``:
    ``s`` (dex); ``n_stars``, ``n_groups``, ``n_clipped``; ``rms_before``, ``rms_after``: weighted
    within-group rms of the calibrators before and after the correction (dex).
    """

    label: str
    coef: np.ndarray
    cov: np.ndarray
    anchor: np.ndarray
    gain_coef: np.ndarray
    gain_anchor: np.ndarray
    offset: float
    ref_mean: float
    lam: float
    cv_lambdas: np.ndarray
    cv_loss: np.ndarray
    loss_none: float
    extra_scatter: float
    n_stars: int
    n_groups: int
    n_clipped: int
    rms_before: float
    rms_after: float

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                d[k] = v.tolist()
            elif isinstance(v, (np.floating, np.integer)):
                d[k] = v.item()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LabelCalibration":
        d = dict(d)
        for k in ("coef", "cov", "anchor", "gain_coef", "gain_anchor", "cv_lambdas", "cv_loss"):
            d[k] = np.asarray(d[k], float)
        return cls(**d)


@dataclass
class Calibration:
    """A temperature calibration of several dwarf abundance labels.

    Attributes
    ----------
    labels : dict ``{label: LabelCalibration}``
    ranges : dict ``{column: (lo, hi)}``: the calibrators' ranges of teff, logg (and snr_z,
        fe_h); inputs are clipped to them.
    terms : tuple of str, the additive basis ``f`` (:func:`design`).
    provenance : dict (package version, date, model training hash, groups used and held out, ...)
    gain_terms : tuple of str, the basis of the gain ``1 + h`` (empty: additive only). After
        :func:`fit`, only the leading terms some label uses; ``provenance["gain_terms_offered"]``
        holds the basis it chose from, ``provenance["gain_terms_of_label"]`` each label's terms.
    """

    labels: dict
    ranges: dict
    terms: tuple = TERMS
    provenance: dict = field(default_factory=dict)
    gain_terms: tuple = GAIN_TERMS

    @property
    def label_names(self) -> tuple:
        return tuple(self.labels)

    @property
    def inputs(self) -> tuple:
        """Catalogue columns the correction reads (besides the label)."""
        return inputs(self.terms + tuple(self.gain_terms))

    def design(self, table) -> np.ndarray:
        """:func:`design` with this calibration's additive terms and ranges."""
        return design(table, self.terms, self.ranges)

    def design_gain(self, table) -> np.ndarray:
        """:func:`design` with this calibration's gain terms and ranges (not less their anchor)."""
        return design(table, self.gain_terms, self.ranges)

    def gain(self, label, table) -> np.ndarray:
        """The gain ``1 + h`` (S,) of ``label`` at the rows of ``table`` (>= :data:`GAIN_MIN`)."""
        lc = self.labels[label]
        return _gain(self.design_gain(table) - lc.gain_anchor, lc.gain_coef)

    def _invert(self, label, table, values=None):
        """Raw and calibrated values, gain and the calibration's uncertainty, (S,) each."""
        if label not in self.labels:
            raise KeyError(f"no calibration for {label!r}; calibrated labels: {self.label_names}")
        lc = self.labels[label]
        X = self.design(table)
        P = self.design_gain(table) - lc.gain_anchor
        if values is None:
            try:
                values = np.asarray(table[label], float)
            except (KeyError, ValueError, IndexError):
                values = np.full(len(X), lc.ref_mean)
        x = np.broadcast_to(np.asarray(values, float), (len(X),))
        g = _gain(P, lc.gain_coef)
        z = x - X @ lc.coef
        x_cal = z / g + lc.offset
        # gradient of x_cal with respect to (c, a, c0); the gain floor has no gradient
        live = (g > GAIN_MIN)[:, None]
        jac = np.column_stack([-X / g[:, None], -(z / g**2)[:, None] * P * live,
                               np.ones(len(X))])
        sigma = np.sqrt(np.maximum(np.einsum("ik,kl,il->i", jac, lc.cov, jac), 0.0))
        return x, x_cal, g, sigma

    def correction(self, label, table, values=None):
        """Correction ``x - x_cal`` (dex, to be *subtracted*) and its uncertainty.

        Parameters
        ----------
        label : str
        table : DataFrame, Table or dict with the :attr:`inputs` columns, (S,) rows
        values : array (S,) or float, optional
            The raw values ``x`` of the label (the correction depends on them through the
            gain); default ``table[label]``, or the reference set's mean value when the table
            has no such column (e.g. a grid in teff).

        Returns
        -------
        delta, sigma : arrays (S,), dex. ``sigma`` is the calibration's uncertainty (bootstrap
        over groups, propagated linearly); the star's own error scales by ``1 / gain`` on top.
        """
        x, x_cal, _, sigma = self._invert(label, table, values)
        return x - x_cal, sigma

    def calibrate(self, table, labels=None) -> pd.DataFrame:
        """``<x>_cal`` and ``e_<x>_cal`` for every row of ``table`` (DataFrame, (S,) rows).

        Rows with ``giantmodel`` true, or with a missing input (teff, logg, snr_z, fe_h), get NaN:
        the calibration is for dwarfs only. ``<x>_cal = (x - f) / (1 + h) + c0`` and
        ``e_<x>_cal = sqrt((e_<x> / (1 + h))^2 + sigma_f^2)`` (``sigma_f`` the calibration's own
        uncertainty, :meth:`correction`); without an ``e_<x>`` column the first term is 0.
        """
        df = _frame(table)
        labels = self.label_names if labels is None else tuple(labels)
        dwarf = np.isfinite(self.design(df)).all(axis=1)
        if "giantmodel" in df.columns:
            dwarf &= ~df["giantmodel"].to_numpy(bool)
        out = {}
        for name in labels:
            if name not in df.columns:
                raise KeyError(f"table has no column {name!r} to calibrate")
            raw = df[name].to_numpy(float)
            _, x_cal, g, sigma = self._invert(name, df, raw)
            e = df[f"e_{name}"].to_numpy(float) if f"e_{name}" in df.columns else np.zeros(len(df))
            ok = dwarf & np.isfinite(raw)
            out[f"{name}_cal"] = np.where(ok, x_cal, np.nan)
            out[f"e_{name}_cal"] = np.where(ok, np.hypot(e / g, sigma), np.nan)
        return pd.DataFrame(out, index=df.index)

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "terms": list(self.terms),
                "gain_terms": list(self.gain_terms), "gain_min": GAIN_MIN,
                "pivots": {"teff0": TEFF0, "teff_scale": TEFF_SCALE, "logg0": LOGG0,
                           "snr0": SNR0},
                "ranges": {k: [float(a), float(b)] for k, (a, b) in self.ranges.items()},
                "provenance": self.provenance,
                "labels": {k: v.to_dict() for k, v in self.labels.items()}}

    def write(self, path=None) -> Path:
        """Write the calibration as JSON (temporary name, then renamed into place)."""
        path = Path(path) if path is not None else default_path()
        paths.ensure(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        log.info("wrote the calibration of %s to %s", ", ".join(self.label_names), path)
        return path

    @classmethod
    def read(cls, path=None) -> "Calibration":
        """Read a calibration written by :meth:`write`; a clear error for anything else."""
        path = Path(path) if path is not None else default_path()
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no calibration at {path}; notebook 05 fits it") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a calibration file (invalid JSON: {err})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a version-{FORMAT_VERSION} calibration file "
                             f"(format={d.get('format') if isinstance(d, dict) else None})")
        terms = tuple(d.get("terms", ()))
        gain_terms = tuple(d.get("gain_terms", ()))
        if not terms or any(k not in _INPUT_OF for k in terms + gain_terms):
            raise ValueError(f"{path} has unknown basis terms {terms} / gain {gain_terms}; "
                             f"known: {TERMS + TERMS_EXTRA}")
        if d.get("gain_min") != GAIN_MIN:
            raise ValueError(f"{path} was written with gain floor {d.get('gain_min')}, this code "
                             f"uses {GAIN_MIN}")
        want = {"teff0": TEFF0, "teff_scale": TEFF_SCALE, "logg0": LOGG0, "snr0": SNR0}
        if d.get("pivots") != want:
            raise ValueError(f"{path} uses basis pivots {d.get('pivots')}, this code {want}")
        try:
            labels = {k: LabelCalibration.from_dict(v) for k, v in d["labels"].items()}
            ranges = {k: tuple(v) for k, v in d["ranges"].items()}
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} lacks a field of a calibration: {err}") from None
        n = len(terms) + len(gain_terms) + 1
        for k, lc in labels.items():
            if (lc.coef.shape != (len(terms),) or lc.gain_coef.shape != (len(gain_terms),)
                    or lc.cov.shape != (n, n)):
                raise ValueError(f"{path}: {k} has {lc.coef.shape} + {lc.gain_coef.shape} "
                                 f"coefficients for {len(terms)} + {len(gain_terms)} terms")
        return cls(labels, ranges, terms, d.get("provenance", {}), gain_terms)


def default_path(directory=None) -> Path:
    """``processed/calibration_dwarf.json`` (beside ``model_dwarf.fits``)."""
    return (Path(directory) if directory is not None else paths.processed_dir()) / FILE_NAME


def _frame(table) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if hasattr(table, "to_pandas"):
        names = [n for n in table.colnames if len(table[n].shape) <= 1]
        return table[names].to_pandas()
    return pd.DataFrame(table)


def _columns(table):
    return list(getattr(table, "colnames", None) or getattr(table, "columns", []))


# ----------------------------------------------------------------------------- calibrators
def calibrators(catalog, members=None, binaries=None, *, labels=DWARF_ABUNDANCES,
                min_proba=MIN_PROBA, test_clusters=TEST_CLUSTERS, binary_half="fit",
                good=None) -> pd.DataFrame:
    """Calibrator stars: dwarfs of the catalogue that share a birth composition with others.

    Parameters
    ----------
    catalog : Table or DataFrame
        The catalogue (``source_id``, ``teff``, ``logg``, ``snr_z``, ``fe_h``, ``giantmodel``,
        the labels and their ``e_<label>``).
    members : Cantat-Gaudin-like table (``source_id``, ``cluster``, ``proba``), optional
        Members with ``proba >= min_proba`` of every cluster not in ``test_clusters`` become one
        group per cluster.
    binaries : El-Badry-like table (``source_id1``, ``source_id2``), optional
        Each pair whose two stars are catalogue dwarfs and whose half
        (:func:`lamostcannon.binaries.binary_split`) is ``binary_half`` becomes one group
        (``binary_half=None`` takes every pair).
    good : boolean array (S,), optional
        Rows of ``catalog`` usable for science (e.g. :func:`lamostcannon.maps.quality_mask`);
        default all.

    Returns
    -------
    DataFrame: ``group`` (cluster name or ``binary:<id1>-<id2>``), ``kind`` (cluster|binary),
    ``source_id``, the inputs (``teff``, ``logg``, ``snr_z``, ``fe_h`` where present), the labels
    and their errors. A star in two groups is kept once, in the first (clusters first); groups
    left with fewer than two stars are dropped.
    """
    from . import binaries as bin_mod

    cat = _frame(catalog)
    for col in ("source_id", "teff", "logg"):
        if col not in cat.columns:
            raise KeyError(f"catalogue needs {col!r}; it has {list(cat.columns)[:12]}...")
    missing = [n for n in labels if n not in cat.columns]
    if missing:
        raise KeyError(f"catalogue has no columns {missing} to calibrate")
    keep = np.ones(len(cat), bool) if good is None else np.asarray(good, bool)
    if keep.shape != (len(cat),):
        raise ValueError(f"good has shape {keep.shape}, expected ({len(cat)},)")
    dwarf = bin_mod.is_dwarf(cat) & keep
    cat = cat.loc[dwarf & (cat["source_id"].to_numpy() >= 0)]
    cols = ["source_id", *[c for c in ("teff", "logg", "snr_z", "fe_h") if c in cat.columns],
            *labels, *[f"e_{n}" for n in labels if f"e_{n}" in cat.columns]]
    cat = cat[cols].drop_duplicates("source_id")
    parts = []
    if members is not None:
        mem = _frame(members)
        names = mem["cluster"].astype(str).str.strip()
        sel = (mem["proba"].to_numpy(float) >= min_proba) & ~names.isin(list(test_clusters)).to_numpy()
        m = pd.DataFrame({"source_id": mem["source_id"].to_numpy(np.int64)[sel],
                          "group": names.to_numpy()[sel]}).drop_duplicates("source_id")
        parts.append(m.merge(cat, on="source_id").assign(kind="cluster"))
    if binaries is not None:
        b = _frame(binaries)
        if binary_half is not None:
            b = b.loc[bin_mod.binary_split(b) == binary_half]
        id1 = b["source_id1"].to_numpy(np.int64)
        id2 = b["source_id2"].to_numpy(np.int64)
        ok = np.isin(id1, cat["source_id"]) & np.isin(id2, cat["source_id"])
        gname = np.array([f"binary:{a}-{c}" for a, c in zip(id1[ok], id2[ok])], dtype=object)
        pairs = pd.DataFrame({"source_id": np.r_[id1[ok], id2[ok]], "group": np.r_[gname, gname]})
        parts.append(pairs.merge(cat, on="source_id").assign(kind="binary"))
    if not parts:
        raise ValueError("give members and/or binaries: there are no calibrators without groups")
    out = pd.concat(parts, ignore_index=True).drop_duplicates("source_id", keep="first")
    sizes = out["group"].map(out["group"].value_counts())
    out = out.loc[sizes >= 2].reset_index(drop=True)
    if np.isin(out["group"], list(test_clusters)).any():  # pragma: no cover - by construction
        raise AssertionError("a test cluster entered the calibrators")
    log.info("calibrators: %d stars in %d groups (%d clusters, %d binaries)", len(out),
             out["group"].nunique(), out.loc[out["kind"] == "cluster", "group"].nunique(),
             out.loc[out["kind"] == "binary", "group"].nunique())
    return out


# ----------------------------------------------------------------------------- fitting
def _folds(n_groups, k, rng, repeats=1):
    """(repeats, n_groups): each row assigns the groups to ``k`` folds (a random partition)."""
    fold = np.empty((repeats, n_groups), int)
    for r in range(repeats):
        fold[r, rng.permutation(n_groups)] = np.arange(n_groups) % k
    return fold


def _label_rng(seed, name: str) -> np.random.Generator:
    """The random stream of one label (its CV folds and bootstrap): seeded by ``seed`` and the
    label's name, so that a label's fit does not depend on which labels come before it or on how
    many draws their bootstraps took."""
    import zlib

    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _group_project(values, g, codes, weights, n_groups):
    """``z - g * m_g(z)`` with ``m_g = sum w g z / sum w g^2`` per group: the residual of ``z``
    (S,) or (S, K) after its best fit by ``mu_g * g`` (``g = 1``: within-group deviations)."""
    v = np.asarray(values, float)
    two_d = v.ndim == 2
    vv = v if two_d else v[:, None]
    wg = weights * g
    den = np.bincount(codes, weights=wg * g, minlength=n_groups)
    num = np.column_stack([np.bincount(codes, weights=wg * vv[:, k], minlength=n_groups)
                           for k in range(vv.shape[1])])
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.nan_to_num(num / den[:, None])
    out = vv - g[:, None] * m[codes]
    return out if two_d else out[:, 0]


def _group_means(z, g, codes, weights, n_groups):
    """``mu_g = sum w g z / sum w g^2`` per group (G,)."""
    wg = weights * g
    den = np.bincount(codes, weights=wg * g, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.bincount(codes, weights=wg * z, minlength=n_groups) / den)


def _solve_gain(X, P, y, w, codes, n_groups, lam, a0=None, n_iter=GAIN_ITERATIONS, tol=1e-4):
    """Fit ``y_i = mu_g (1 + P_i a) + X_i c`` by alternating least squares (see :func:`fit`).

    Each step solves the group means and ``c`` exactly for the current gain (profiling the
    means out), then ``a`` for the current means and ``c``; both steps minimise the same
    penalised weighted loss, which therefore never increases. ``P`` with no columns is the
    additive model (one step). Returns ``(c, a, mu)``.
    """
    J = P.shape[1]
    a = np.zeros(J) if a0 is None else np.asarray(a0, float).copy()
    for _ in range(n_iter if J else 1):
        g = np.maximum(1.0 + P @ a, GAIN_MIN) if J else np.ones(len(y))
        c = _solve(_group_project(X, g, codes, w, n_groups), _group_project(y, g, codes, w, n_groups),
                   w, lam)
        mu = _group_means(y - X @ c, g, codes, w, n_groups)
        if not J:
            break
        a_new = _solve(mu[codes][:, None] * P, y - mu[codes] - X @ c, w, lam)
        done = np.max(np.abs(a_new - a)) < tol
        a = a_new
        if done:
            break
    g = np.maximum(1.0 + P @ a, GAIN_MIN) if J else np.ones(len(y))
    c = _solve(_group_project(X, g, codes, w, n_groups), _group_project(y, g, codes, w, n_groups),
               w, lam)
    mu = _group_means(y - X @ c, g, codes, w, n_groups)
    return c, a, mu


def _gain(P, a):
    return np.maximum(1.0 + P @ a, GAIN_MIN) if P.shape[1] else np.ones(len(P))


def _fit_label(X, P, y, e, codes, n_groups, lambdas, n_folds, n_boot, clip, rng, ref):
    """Fit one label: weights, CV over lambda, clipping, refit, bootstrap. See :func:`fit`.

    With ``n_boot = 0`` there is no bootstrap and the result keeps (``_state``) what
    :func:`_bootstrap` needs to add one later.

    ``X`` (S, K) the additive terms, ``P`` (S, J) the gain terms less their reference mean,
    ``ref = (X_ref, P_ref, x_ref)``: the reference set's terms and labels (anchor).
    """
    ok = np.isfinite(y) & np.isfinite(X).all(axis=1) & np.isfinite(P).all(axis=1)
    X, P, y, codes = X[ok], P[ok], y[ok], codes[ok]
    e = np.where(np.isfinite(e[ok]), e[ok], np.nan)
    # keep groups with at least two stars
    cnt = np.bincount(codes, minlength=n_groups)
    ok2 = cnt[codes] >= 2
    X, P, y, e, codes = X[ok2], P[ok2], y[ok2], e[ok2], codes[ok2]
    uniq, codes = np.unique(codes, return_inverse=True)
    G = len(uniq)
    if G < 3 or len(y) < 3 * (X.shape[1] + P.shape[1]):
        raise ValueError(f"too few calibrators: {len(y)} stars in {G} groups (need >= 3 groups "
                         f"and >= {3 * (X.shape[1] + P.shape[1])} stars)")
    e_med = np.nanmedian(e) if np.isfinite(e).any() else 0.0
    e = np.where(np.isfinite(e), e, e_med)
    # one ridge: nothing to choose, no CV (the leave-one-cluster-out fits)
    folds = _folds(G, min(n_folds, G), rng, CV_REPEATS) if len(lambdas) > 1 else None

    def cv_curve(w):
        losses = np.zeros(len(lambdas))
        if folds is None:
            return losses
        for fold in folds:
            for f in range(fold.max() + 1):
                test = fold[codes] == f
                train = ~test
                a = None
                for j, lam in enumerate(lambdas):
                    c, a, _ = _solve_gain(X[train], P[train], y[train], w[train], codes[train],
                                          G, lam, a0=a)
                    gt = _gain(P[test], a)
                    r = _group_project(y[test] - X[test] @ c, gt, codes[test], w[test], G)
                    losses[j] += np.sum(w[test] * r**2)
        return losses / (len(folds) * np.sum(w))

    # two passes: unit weights, then 1/(e^2 + s^2); each estimates s and clips the outliers
    w = np.ones(len(y))
    keep = np.ones(len(y), bool)
    for _ in range(2):
        losses = cv_curve(w)
        lam = float(lambdas[int(np.argmin(losses))])
        c, a, mu = _solve_gain(X, P, y, w, codes, G, lam)
        r = y - mu[codes] * _gain(P, a) - X @ c
        n_g = np.bincount(codes, weights=keep.astype(float), minlength=G)
        infl = np.sqrt(n_g[codes] / np.maximum(n_g[codes] - 1, 1))  # dof of the group means
        r_corr = r * infl
        s2 = max(np.average((r_corr**2)[keep]) - np.mean(e[keep] ** 2), (0.25 * e_med) ** 2)
        sig = np.sqrt(e**2 + s2)
        if clip:
            mad = 1.4826 * np.median(np.abs(r_corr[keep] / sig[keep]))
            keep = np.abs(r_corr / sig) <= clip * max(mad, 1.0)
        w = np.where(keep, 1.0 / sig**2, 0.0)
    n_clipped = int((~keep).sum())
    losses = cv_curve(w)
    j = int(np.argmin(losses))
    lam = float(lambdas[j])
    coef, gain_coef, mu = _solve_gain(X, P, y, w, codes, G, lam)
    X_ref, P_ref, x_ref = ref

    def offset(c, a):  # zero mean change over the reference set
        return float(np.mean(x_ref - (x_ref - X_ref @ c) / _gain(P_ref, a)))

    c0 = offset(coef, gain_coef)
    # in-sample rms before and after (weighted, within groups, kept stars)
    yc = _group_center(y, codes, w, G)
    r_after = y - mu[codes] * _gain(P, gain_coef) - X @ coef
    before = np.sqrt(_wloss(yc, w))
    after = np.sqrt(_wloss(r_after, w))
    loss_none = float(np.sum(w * yc**2) / np.sum(w))
    out = dict(coef=coef, gain_coef=gain_coef, offset=c0, lam=lam,
               cv_lambdas=np.asarray(lambdas, float), cv_loss=losses, loss_none=loss_none,
               extra_scatter=float(np.sqrt(s2)), n_stars=int(keep.sum()), n_groups=int(G),
               n_clipped=n_clipped, rms_before=float(before), rms_after=float(after),
               _state=(X, P, y, w, codes, G, offset))
    return _bootstrap(out, n_boot, rng) if n_boot else out  # else: _bootstrap later


def _bootstrap(out: dict, n_boot: int, rng) -> dict:
    """``out`` of :func:`_fit_label` with ``cov``: the covariance of the coefficients and the
    offset over ``n_boot`` resamplings of the groups (each enters with its multiplicity as
    weight; zeros for ``n_boot < 2``)."""
    out = dict(out)
    X, P, y, w, codes, G, offset = out.pop("_state")
    boots = np.empty((n_boot, X.shape[1] + P.shape[1] + 1))
    for b in range(n_boot):
        mult = np.bincount(rng.integers(G, size=G), minlength=G).astype(float)
        wb = w * mult[codes]
        sel = wb > 0
        cb, ab, _ = _solve_gain(X[sel], P[sel], y[sel], wb[sel], codes[sel], G, out["lam"],
                                a0=out["gain_coef"])
        boots[b] = np.r_[cb, ab, offset(cb, ab)]
    out["cov"] = np.cov(boots, rowvar=False) if n_boot > 1 else np.zeros((boots.shape[1],) * 2)
    return out


def _loco_scores(X, P, y, e, codes, n_groups, teff, clusters, lam, n_folds, clip, rng, ref):
    """Leave-one-cluster-out scores of one gain form: for each cluster in ``clusters`` (group
    codes), the fit without it (ridge ``lam``) calibrates its members, which share one
    composition: ``(slope / error)^2`` of their calibrated values with teff (0 when the
    calibration removed every trend) and their dispersion calibrated over raw."""
    from .binaries import teff_trend

    finite = np.isfinite(y) & np.isfinite(X).all(axis=1) & np.isfinite(P).all(axis=1)
    z2, disp = [], []
    for k in clusters:
        fit_rows = codes != k
        test = ~fit_rows & finite
        out = _fit_label(X[fit_rows], P[fit_rows], y[fit_rows], e[fit_rows], codes[fit_rows],
                         n_groups, np.array([lam]), n_folds, 0, clip, rng, ref)
        x_cal = (y[test] - X[test] @ out["coef"]) / _gain(P[test], out["gain_coef"])
        tr = teff_trend(teff[test], x_cal)
        z2.append((tr.slope / tr.slope_err) ** 2)
        disp.append(tr.dispersion / np.std(y[test], ddof=1))
    return float(np.mean(z2)), float(np.mean(disp))


def select_gain_form(X, P, y, e, codes, n_groups, teff, clusters, lambdas, n_folds, clip,
                     make_rng, ref, max_terms) -> tuple[int, dict, dict]:
    """Choose how many leading gain terms (0 = additive) one label gets, from its calibrators.

    Each form is fitted to every calibrator (its ridge by the usual leave-groups-out CV), then
    judged by leave-one-cluster-out: each cluster with at least :data:`GAIN_CV_MIN_MEMBERS`
    members is left out in turn, the rest fitted with that ridge, and the held-out members'
    calibrated values scored by the mean ``(slope / error)^2`` of their trend with teff (their
    composition is one, so any trend is a systematic left over) and by their dispersion over the
    raw one. Going from ``j`` to ``j + 1`` terms needs a score below :data:`GAIN_CV_MARGIN`
    times the best simpler form's, lower by more than twice the scatter of such a score when
    only noise is left (``2 sqrt(2 / K)`` for ``K`` clusters: a mean of ``K`` chi^2_1 values),
    and held-out dispersions that grow by at most
    :data:`GAIN_CV_MAX_DISPERSION` against the additive form's. With fewer than three such
    clusters the gain cannot be judged and the form is additive.

    Every form's fit draws its CV folds from a fresh ``make_rng()``: the forms are compared on
    the same partitions, and the chosen form's fit is the one :func:`fit` keeps.

    Returns ``(n_terms, scores, fits)``: ``scores[j] = {"lam", "loco_z2",
    "loco_dispersion_ratio"}``, ``fits[j]`` the :func:`_fit_label` result of form ``j``
    (without bootstrap).
    """
    scores, fits = {}, {}
    if len(clusters) < 3 or max_terms == 0:
        return 0, scores, fits
    best = None
    for j in range(max_terms + 1):
        full = fits[j] = _fit_label(X, P[:, :j], y, e, codes, n_groups, lambdas, n_folds, 0,
                                    clip, make_rng(), (ref[0], ref[1][:, :j], ref[2]))
        z2, disp = _loco_scores(X, P[:, :j], y, e, codes, n_groups, teff, clusters, full["lam"],
                                n_folds, clip, make_rng(), (ref[0], ref[1][:, :j], ref[2]))
        scores[j] = {"lam": full["lam"], "loco_z2": z2, "loco_dispersion_ratio": disp}
        # under "only noise is left" each score is a mean of len(clusters) chi^2_1 values, whose
        # standard deviation is sqrt(2 / len(clusters)): a gain must beat that twice over
        noise = 2.0 * np.sqrt(2.0 / len(clusters))
        if best is None or (z2 < GAIN_CV_MARGIN * scores[best]["loco_z2"]
                            and scores[best]["loco_z2"] - z2 > noise
                            and disp <= GAIN_CV_MAX_DISPERSION * scores[0]["loco_dispersion_ratio"]):
            best = j
    return best, scores, fits


def _n_gain_terms(name, gain_terms, gain_labels) -> int:
    """How many leading ``gain_terms`` label ``name`` is fitted with (see :func:`fit`)."""
    if gain_labels is None or not gain_terms:
        return len(gain_terms)
    if isinstance(gain_labels, str):
        raise ValueError(f"gain_labels {gain_labels!r} is chosen in fit(), not here")
    mine = tuple(dict(gain_labels).get(name, ())) if hasattr(gain_labels, "keys") else (
        tuple(gain_terms) if name in gain_labels else ())
    if mine != tuple(gain_terms)[:len(mine)]:
        raise ValueError(f"gain terms of {name}, {mine}, must be leading terms of {tuple(gain_terms)}")
    return len(mine)


def fit(calib: pd.DataFrame, labels=DWARF_ABUNDANCES, *, reference=None, terms=TERMS,
        gain_terms=GAIN_TERMS, gain_labels=GAIN_LABELS, lambdas=LAMBDAS, n_folds=5, n_boot=200, clip=4.0, seed=0, provenance=None) -> Calibration:
    """Fit the temperature calibration of each label from calibrator groups.

    Parameters
    ----------
    calib : DataFrame
        :func:`calibrators` output: ``group``, the inputs of ``terms`` (``teff`` [K], ``logg``,
        ``snr_z``, ``fe_h``), the labels and (optional) their ``e_<label>`` (dex).
    labels : sequence of str
        Labels to calibrate (the dwarf model's abundances by default; pass the list of labels
        with CV skill).
    reference : Table or DataFrame with the same inputs, optional
        The reference set (training stars), over which the correction has zero mean: the
        abundance scale stays that of the training labels (GALAH). Default: the calibrators.
    terms : sequence of str
        Basis terms (:func:`design`); :data:`TERMS_TEFF_LOGG` for a correction in teff and logg
        only.
    gain_terms : sequence of str
        Terms of the gain ``h`` (:func:`design`, less their mean over the reference set, so the
        gain averages 1 there); empty for the additive model ``y = mu_g + f``.
    gain_labels : ``"cv"``, dict ``{label: terms}``, sequence of str or None
        Which labels get a gain, and with which of ``gain_terms`` (leading terms, e.g. ``("u",)``
        of ``("u", "u2")``). ``"cv"`` (default): chosen per label from these calibrators by
        leave-one-cluster-out CV (:func:`select_gain_form`; the scores go to the provenance); a
        dict: those forms; a sequence: those labels with all ``gain_terms``; None: every label
        with all. The others get ``h = 0`` (the additive model).
    lambdas : sequence of float
        Ridge strengths tried by leave-groups-out CV (``n_folds`` folds of groups, the loss
        averaged over :data:`CV_REPEATS` random partitions).
    n_boot : int
        Bootstrap resamplings of the groups for the coefficients' covariance.
    clip : float or None
        Sigma-clipping threshold (None: no clipping).
    seed : int
        Seeds the CV folds and the bootstrap (each label its own stream, from the seed and its
        name).
    provenance : dict, optional
        Extra provenance (e.g. ``model_training_hash``) stored with the fit.

    Returns
    -------
    Calibration
    """
    df = _frame(calib)
    labels = tuple(labels)
    terms = tuple(terms)
    gain_terms = tuple(gain_terms)
    need = inputs(terms + gain_terms)
    for col in ("group", *need, *labels):
        if col not in df.columns:
            raise KeyError(f"calibrator table needs {col!r}; it has {list(df.columns)}")
    X0 = np.column_stack([design(df, terms), design(df, gain_terms)])
    fin = np.isfinite(X0).all(axis=1)
    if fin.sum() < 6:
        raise ValueError(f"need calibrators with finite {need}, got {int(fin.sum())}")
    ranges = {c: (float(np.nanmin(df[c].to_numpy(float)[fin])),
                  float(np.nanmax(df[c].to_numpy(float)[fin]))) for c in need}
    cal = Calibration({}, ranges, terms, gain_terms=gain_terms)
    X = cal.design(df)
    P = cal.design_gain(df)
    X[~fin] = np.nan
    P[~fin] = np.nan
    codes, group_names = pd.factorize(df["group"].astype(str))
    if reference is not None:
        ref = _frame(reference)
        missing = [c for c in need if c not in ref.columns]
        if missing:
            raise KeyError(f"the reference set needs {missing} for the terms {terms + gain_terms}")
        R, RP = cal.design(ref), cal.design_gain(ref)
        rok = np.isfinite(R).all(axis=1) & np.isfinite(RP).all(axis=1)
        if not rok.any():
            raise ValueError(f"the reference set has no star with finite {need}")
        n_ref = int(rok.sum())
    else:
        ref, R, RP, rok = df, X, P, fin
        n_ref = 0
    anchor, gain_anchor = R[rok].mean(axis=0), RP[rok].mean(axis=0)
    by_cv = isinstance(gain_labels, str)
    if by_cv and gain_labels != "cv":
        raise ValueError(f"gain_labels must be 'cv', a dict, a sequence or None, not {gain_labels!r}")
    kind = df["kind"].to_numpy() if "kind" in df.columns else np.full(len(df), "")
    # without a kind column every group may judge a gain form (if it is large enough)
    cl = kind == "cluster" if "kind" in df.columns else np.ones(len(df), bool)
    sizes = np.bincount(codes, minlength=len(group_names))
    judges = np.unique(codes[cl & (sizes[codes] >= GAIN_CV_MIN_MEMBERS)])
    teff_in = df["teff"].to_numpy(float)
    chosen, selection = {}, {}
    for name in labels:
        y = df[name].to_numpy(float)
        e = df[f"e_{name}"].to_numpy(float) if f"e_{name}" in df.columns else np.full(len(df), np.nan)
        # the reference set's own values of the label (its training labels) fix the offset; a
        # reference without them takes the calibrators' mean value for every star
        x_ref = (ref[name].to_numpy(float)[rok] if name in ref.columns
                 else np.full(int(rok.sum()), np.nanmean(y)))
        x_ref = np.where(np.isfinite(x_ref), x_ref, np.nanmean(x_ref) if np.isfinite(x_ref).any()
                         else np.nanmean(y))
        def make_rng(name=name):
            return _label_rng(seed, name)

        fits = {}
        if by_cv:
            J, sc, fits = select_gain_form(X, P - gain_anchor, y, e, codes, len(group_names),
                                           teff_in, judges, np.asarray(lambdas, float), n_folds,
                                           clip, make_rng, (R[rok], RP[rok] - gain_anchor, x_ref),
                                           len(gain_terms))
            selection[name] = {"chosen": list(gain_terms[:J]),
                               **{"+".join(gain_terms[:j]) or "none": v for j, v in sc.items()}}
        else:
            J = _n_gain_terms(name, gain_terms, gain_labels)
        chosen[name] = list(gain_terms[:J])
        out = fits.get(J) or _fit_label(X, (P - gain_anchor)[:, :J], y, e, codes,
                                        len(group_names), np.asarray(lambdas, float), n_folds, 0,
                                        clip, make_rng(),
                                        (R[rok], (RP[rok] - gain_anchor)[:, :J], x_ref))
        out = _bootstrap(out, n_boot, _label_rng(seed, "bootstrap " + name))
        if J < len(gain_terms):  # the gain terms this label does not use are exactly zero
            K, n_all = X.shape[1], X.shape[1] + len(gain_terms) + 1
            cov = np.zeros((n_all, n_all))
            keep = np.r_[np.arange(K + J), n_all - 1]
            cov[np.ix_(keep, keep)] = out["cov"]
            out.update(gain_coef=np.r_[out["gain_coef"], np.zeros(len(gain_terms) - J)], cov=cov)
        cal.labels[name] = LabelCalibration(label=name, anchor=anchor.copy(),
                                            gain_anchor=gain_anchor.copy(),
                                            ref_mean=float(np.mean(x_ref)), **out)
        g = out["gain_coef"]
        log.info("%s: lambda %.3g, within-group rms %.4f -> %.4f dex (%d stars, %d groups, "
                 "%d clipped), gain coefficients %s", name, out["lam"], out["rms_before"],
                 out["rms_after"], out["n_stars"], out["n_groups"], out["n_clipped"],
                 np.round(g, 3).tolist())
    # gain terms no label uses are dropped, so that applying the calibration needs only the inputs
    # it uses (no gain at all: none of the gain's inputs)
    n_used = max((len(v) for v in chosen.values()), default=0)
    if n_used < len(gain_terms):
        K, n_all = len(terms), len(terms) + len(gain_terms) + 1
        keep = np.r_[np.arange(K + n_used), n_all - 1]
        for lc in cal.labels.values():
            lc.gain_coef, lc.gain_anchor = lc.gain_coef[:n_used], lc.gain_anchor[:n_used]
            lc.cov = lc.cov[np.ix_(keep, keep)]
        cal.gain_terms = gain_terms[:n_used]
    from . import __version__

    cal.provenance = {
        "gain_terms_offered": list(gain_terms),
        "lamostcannon_version": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": int(seed), "n_folds": int(n_folds), "cv_repeats": int(CV_REPEATS),
        "n_boot": int(n_boot), "clip": clip,
        "gain_min": GAIN_MIN,
        "gain_terms_of_label": chosen,
        "gain_selection": ({"method": "leave-one-cluster-out", "clusters": sorted(
            str(group_names[k]) for k in judges), "margin": GAIN_CV_MARGIN,
            "max_dispersion": GAIN_CV_MAX_DISPERSION, "labels": selection} if by_cv
            else {"method": "given"}),
        "n_reference": n_ref,
        "clusters_used": {str(k): int(v) for k, v in
                          df.loc[kind == "cluster", "group"].value_counts().sort_index().items()},
        "n_binaries_used": int(df.loc[kind == "binary", "group"].nunique()),
        "groups_used": sorted(map(str, group_names)),
        **(provenance or {})}
    return cal


# ----------------------------------------------------------------------------- the pipeline step
def model_training_hash(directory=None) -> str | None:
    """``TRNHASH`` of ``model_dwarf.fits`` in ``directory`` (None when there is no model)."""
    from astropy.io import fits

    path = (Path(directory) if directory is not None else paths.processed_dir()) / "model_dwarf.fits"
    if not path.is_file():
        return None
    return str(fits.getheader(path, 0).get("TRNHASH", "")) or None


def reference_dwarfs(reference=None) -> pd.DataFrame:
    """The dwarfs of the reference set with the inputs of the correction (their own labels).

    ``teff``, ``logg``, ``fe_h`` and the abundances (:data:`DWARF_ABUNDANCES`) are the training
    (GALAH) labels, ``snr_z`` the LAMOST ``lamost_snrz``: the stars over which the correction
    has zero mean.
    """
    if reference is None:
        from .cleaning import read_reference_set

        reference = read_reference_set()
    ref = _frame(reference)
    if "giant" in ref.columns:
        ref = ref.loc[~ref["giant"].to_numpy(bool)]
    out = ref[[c for c in ("teff", "logg", "fe_h", *DWARF_ABUNDANCES) if c in ref.columns]].copy()
    if "snr_z" in ref.columns:
        out["snr_z"] = ref["snr_z"].to_numpy(float)
    elif "lamost_snrz" in ref.columns:
        out["snr_z"] = ref["lamost_snrz"].to_numpy(float)
    return out.reset_index(drop=True)


#: Fewest catalogue rows of reference dwarfs the anchor needs; with fewer, the reference set's
#: own (training) labels anchor the scale instead.
MIN_ANCHOR_ROWS = 50


def reference_rows(catalog, reference=None, good=None, *, key="designation") -> pd.DataFrame:
    """The catalogue rows of the reference set's dwarfs (dwarf-model rows, ``good`` ones only):
    where :func:`calibrate` anchors the scale, so that the mean of the calibrated abundances over
    the reference stars, as the catalogue gives them, is the raw mean (which the model was trained
    to put on the training labels' scale)."""
    if reference is None:
        from .cleaning import read_reference_set

        reference = read_reference_set()
    ref = _frame(reference)
    if "giant" in ref.columns:
        ref = ref.loc[~ref["giant"].to_numpy(bool)]
    cat = _frame(catalog)
    # a copy: the caller's mask must not be narrowed to the reference rows in place
    keep = np.ones(len(cat), bool) if good is None else np.array(good, bool)
    if "giantmodel" in cat.columns:
        keep &= ~cat["giantmodel"].to_numpy(bool)
    if key not in cat.columns or key not in ref.columns:
        return cat.iloc[:0]
    keep &= cat[key].isin(ref[key]).to_numpy()
    return cat.loc[keep].reset_index(drop=True)


def calibrate(catalog, *, raw_dir=None, directory=None, reference=None, labels=DWARF_ABUNDANCES,
              terms=TERMS, gain_terms=GAIN_TERMS, gain_labels=GAIN_LABELS, test_clusters=TEST_CLUSTERS, min_proba=MIN_PROBA, good=None, seed=0,
              n_boot=200, write=True) -> Calibration:
    """The whole fitting step of notebook 05: calibrators from the raw tables, fit, write.

    Parameters
    ----------
    catalog : Table or DataFrame
        The raw catalogue (:func:`lamostcannon.catalog.build_catalog` with ``calibration=False``).
    raw_dir : path, optional
        Folder with ``clusters/members.fits`` (Cantat-Gaudin 2018 layout) and
        ``binaries/wide_binaries.fits`` (El-Badry et al. layout); default ``paths.raw_dir()``.
    directory : path, optional
        Where the models are and the calibration is written (default ``paths.processed_dir()``).
    reference : Table, optional
        Reference set of the anchor; default ``interim/reference_set.fits``. The anchor is the
        catalogue rows of its dwarfs (:func:`reference_rows`), or, with fewer than
        :data:`MIN_ANCHOR_ROWS` of them, its own training labels (:func:`reference_dwarfs`).
    good : boolean array, optional
        Catalogue rows usable for science (default :func:`lamostcannon.maps.quality_mask`).
    labels, terms, gain_terms, gain_labels, test_clusters, min_proba, seed, n_boot : see
        :func:`calibrators`, :func:`fit`.

    Returns
    -------
    Calibration (also written to ``directory/calibration_dwarf.json`` when ``write``).
    """
    from astropy.table import Table

    from . import maps

    raw = Path(raw_dir) if raw_dir is not None else paths.raw_dir()
    members = Table.read(raw / "clusters" / "members.fits")
    wide = Table.read(raw / "binaries" / "wide_binaries.fits")
    if good is None:
        good = maps.quality_mask(catalog)
    calib = calibrators(catalog, members, wide, labels=labels, min_proba=min_proba,
                        test_clusters=test_clusters, good=good)
    anchor = reference_rows(catalog, reference, good)
    if len(anchor) >= MIN_ANCHOR_ROWS:
        how = f"catalogue rows of {len(anchor)} reference dwarfs"
    else:
        log.warning("only %d catalogue rows of reference dwarfs: the reference set's own labels "
                    "anchor the scale", len(anchor))
        anchor = reference_dwarfs(reference)
        how = f"training labels of {len(anchor)} reference dwarfs"
    cal = fit(calib, labels, reference=anchor, terms=terms,
              gain_terms=gain_terms, gain_labels=gain_labels, seed=seed,
              n_boot=n_boot,
              provenance={"model_training_hash": model_training_hash(directory), "anchor": how,
                          "test_clusters": list(test_clusters), "min_proba": min_proba,
                          "binary_split": "lamostcannon.binaries.binary_split == 'fit'",
                          "members_file": "clusters/members.fits",
                          "binaries_file": "binaries/wide_binaries.fits"})
    if write:
        cal.write(default_path(directory))
    return cal


# ----------------------------------------------------------------------------- catalogue columns
def describe_column(name: str) -> tuple[str, str]:
    """(unit, description) of a ``<x>_cal`` or ``e_<x>_cal`` catalogue column (<= 68 characters,
    the FITS comment's room)."""
    if name.startswith("e_") and name.endswith("_cal"):
        return "dex", f"error of {name[2:]}: catalogue and calibration errors combined"
    if name.endswith("_cal"):
        return "dex", f"{name[:-4]} calibrated with clusters+binaries (dwarfs; NaN giants)"
    raise ValueError(f"{name!r} is not a calibration column")


def apply(table, calibration=True, *, directory=None):
    """Add ``<x>_cal`` and ``e_<x>_cal`` beside each calibrated raw label of a catalogue.

    Parameters
    ----------
    table : astropy Table or DataFrame
        The catalogue (dwarf rows: ``giantmodel`` false) with the correction's inputs.
    calibration : True, Calibration, path or False
        ``True`` (or ``None``): the file ``calibration_dwarf.json`` in ``directory`` (default
        ``paths.processed_dir()``) when it exists *and* was fitted on the current dwarf model
        (its training hash matches ``model_dwarf.fits`` there); otherwise the table is returned
        unchanged (a stale calibration is never applied). A path or a Calibration: that one.
        ``False``: unchanged.

    Returns
    -------
    The same kind of table with the new columns (units and descriptions set for a Table) placed
    after the raw ones; ``table.meta['calibration']`` records the file and its provenance.
    """
    if calibration is False:
        return table
    auto = calibration is True or calibration is None
    source = None
    if auto or isinstance(calibration, (str, Path)):
        path = default_path(directory) if auto else Path(calibration)
        if not path.is_file():
            if not auto:
                raise FileNotFoundError(f"no calibration at {path}")
            log.info("no calibration at %s: the catalogue keeps the raw abundances only", path)
            return table
        cal = Calibration.read(path)
        if auto:
            current = model_training_hash(path.parent)
            stored = cal.provenance.get("model_training_hash")
            if current is None or stored != current:
                log.warning("calibration %s was fitted on dwarf model %s, the current one is %s:"
                            " not applied", path, stored, current)
                return table
        source = str(path)
    elif isinstance(calibration, Calibration):
        cal = calibration
    else:
        raise TypeError(f"calibration must be True, False, a Calibration or a path, not "
                        f"{type(calibration).__name__}")
    labels = [n for n in cal.label_names if n in _columns(table)]
    new = cal.calibrate(table, labels)
    if isinstance(table, pd.DataFrame):
        out = table.copy()
        for c in new.columns:
            out[c] = new[c].to_numpy()
        return out
    out = table.copy(copy_data=False)
    for name in labels:
        for col in (f"{name}_cal", f"e_{name}_cal"):
            if col in out.colnames:
                out.remove_column(col)
        at = out.colnames.index(name) + 1
        out.add_column(new[f"{name}_cal"].to_numpy(), name=f"{name}_cal", index=at)
        out.add_column(new[f"e_{name}_cal"].to_numpy(), name=f"e_{name}_cal", index=at + 1)
        for col in (f"{name}_cal", f"e_{name}_cal"):
            out[col].unit, out[col].description = describe_column(col)
    out.meta["calibration"] = {"file": source or "in memory", "labels": labels,
                               **{k: cal.provenance.get(k) for k in
                                  ("lamostcannon_version", "date", "model_training_hash")}}
    return out


# ----------------------------------------------------------------------------- judging (notebook 06)
def cluster_trends(stars, labels=DWARF_ABUNDANCES, *, suffix="_cal") -> pd.DataFrame:
    """Trends with teff of the raw and calibrated labels of one cluster's members (paper Fig 17).

    Parameters
    ----------
    stars : DataFrame of one cluster's dwarfs (``teff``, ``logg``, ``<label>``, ``<label><suffix>``)
    labels : sequence of str

    Returns
    -------
    DataFrame indexed by label: ``n``; ``slope_raw``, ``slope_err_raw``, ``slope_cal``,
    ``slope_err_cal`` (dex per 1000 K, :func:`lamostcannon.binaries.teff_trend`);
    ``disp_raw``, ``disp_cal`` (standard deviations, dex); ``floor``: the scatter about the
    best smooth function of teff and logg fitted to these very stars (a constant plus the terms
    :data:`TERMS_TEFF_LOGG`, ddof-corrected): what the stars' noise alone leaves, the limit no
    correction in teff and logg can beat.
    """
    from .binaries import teff_trend

    df = _frame(stars)
    rows = {}
    for name in labels:
        y = df[name].to_numpy(float)
        yc = df[f"{name}{suffix}"].to_numpy(float)
        t = df["teff"].to_numpy(float)
        ok = np.isfinite(y) & np.isfinite(yc) & np.isfinite(t) & np.isfinite(df["logg"].to_numpy(float))
        if ok.sum() < len(TERMS_TEFF_LOGG) + 3:
            raise ValueError(f"{name}: only {int(ok.sum())} stars with raw and calibrated values")
        tr, tc = teff_trend(t[ok], y[ok]), teff_trend(t[ok], yc[ok])
        X = np.column_stack([np.ones(ok.sum()), design(df.loc[ok], TERMS_TEFF_LOGG)])
        coef, *_ = np.linalg.lstsq(X, y[ok], rcond=None)
        r = y[ok] - X @ coef
        floor = float(np.sqrt(r @ r / (ok.sum() - X.shape[1])))
        rows[name] = dict(n=int(ok.sum()), slope_raw=tr.slope_per_1000K,
                          slope_err_raw=1000 * tr.slope_err, slope_cal=tc.slope_per_1000K,
                          slope_err_cal=1000 * tc.slope_err, disp_raw=tr.dispersion,
                          disp_cal=tc.dispersion, floor=floor)
    return pd.DataFrame.from_dict(rows, orient="index")


def reference_change(catalog, reference=None, labels=DWARF_ABUNDANCES, *, key="designation",
                     suffix="_cal") -> pd.Series:
    """Mean change ``<x>_cal - <x>`` (dex) over the catalogue rows of the reference set's dwarfs.

    The abundance scale is tied to the training labels (GALAH) by this being zero. :func:`calibrate`
    anchors on the same stars' catalogue rows (:func:`reference_rows`), so it is zero up to which
    rows ``catalog`` holds (e.g. a stricter quality cut) and the calibration's own arithmetic.
    """
    rows = reference_rows(catalog, reference, key=key)
    out = {}
    for name in labels:
        d = rows[f"{name}{suffix}"].to_numpy(float) - rows[name].to_numpy(float)
        out[name] = float(np.nanmean(d)) if np.isfinite(d).any() else np.nan
    return pd.Series(out, name="mean change over the reference set (dex)")


def true_labels(truth, labels=DWARF_ABUNDANCES, *, reference=None) -> pd.DataFrame:
    """The mock's true values of ``labels``, with ``alpha_fe`` and ``s_fe`` formed as in training.

    The derived labels are error-weighted means (:func:`lamostcannon.cleaning.add_derived_labels`)
    with the reference set's median GALAH error of each element as weights, so that they mean
    what the training labels mean. Returns ``designation`` and the labels. Mock only.
    """
    from astropy.table import Table

    from .cleaning import add_derived_labels, read_reference_set
    from .labels import ELEMENTS

    t = _frame(truth)
    ref = _frame(reference if reference is not None else read_reference_set())
    tab = Table()
    tab["designation"] = t["designation"].astype(str).to_numpy()
    for x in ELEMENTS:
        tab[f"{x}_fe"] = t[f"{x}_fe"].to_numpy(float)
        tab[f"e_{x}_fe"] = np.full(len(t), float(np.nanmedian(ref[f"e_{x}_fe"].to_numpy(float))))
    add_derived_labels(tab)
    keep = ["designation", *[n for n in labels if n in tab.colnames]]
    return tab[keep].to_pandas()


def compare_with_truth(catalog, truth, labels=DWARF_ABUNDANCES, *, reference=None,
                       exclude_ids=None, key="designation", suffix="_cal", teff_bin=300.0,
                       min_per_bin=50) -> pd.DataFrame:
    """Raw and calibrated dwarf abundances against the mock's truth (mock only).

    Parameters
    ----------
    catalog : DataFrame (the usable catalogue rows; dwarfs are taken)
    truth : the mock's ``truth/truth.fits``
    exclude_ids : ``source_id`` of stars to leave out (the calibrators)

    Returns
    -------
    DataFrame indexed by label: ``n``, ``rms_raw``, ``rms_cal`` (root mean square of inferred
    minus true, dex), ``bias_raw``, ``bias_cal`` (means), ``sd_raw``, ``sd_cal`` (scatter);
    ``trend_raw``, ``trend_cal``: the systematic with teff, the root mean square over teff bins
    (``teff_bin`` K wide, those with at least ``min_per_bin`` stars) of the bin's mean inferred
    minus true value (dex), what the calibration is meant to remove; ``response_raw``,
    ``response_cal``: the least-squares slope of the inferred on the true values (1 for values
    on the true scale; the model compresses, so raw values sit below 1).
    """
    from .binaries import is_dwarf

    cat = _frame(catalog)
    cat = cat.loc[is_dwarf(cat)]
    if exclude_ids is not None:
        cat = cat.loc[~cat["source_id"].isin(np.asarray(exclude_ids))]
    tl = true_labels(truth, labels, reference=reference)
    j = cat.merge(tl, on=key, how="inner", suffixes=("", "_true"))
    rows = {}
    for name in labels:
        d_raw = j[name].to_numpy(float) - j[f"{name}_true"].to_numpy(float)
        d_cal = j[f"{name}{suffix}"].to_numpy(float) - j[f"{name}_true"].to_numpy(float)
        ok = np.isfinite(d_raw) & np.isfinite(d_cal)
        tbin = np.floor(j["teff"].to_numpy(float)[ok] / teff_bin)
        true = j[f"{name}_true"].to_numpy(float)[ok]

        def trend(d):
            m = pd.Series(d).groupby(tbin).agg(["mean", "size"])
            m = m.loc[m["size"] >= min_per_bin, "mean"]
            return float(np.sqrt(np.mean(m**2))) if len(m) else np.nan

        def response(d):
            return float(np.polyfit(true, true + d, 1)[0]) if np.ptp(true) > 0 else np.nan

        rows[name] = dict(n=int(ok.sum()), rms_raw=float(np.sqrt(np.mean(d_raw[ok] ** 2))),
                          rms_cal=float(np.sqrt(np.mean(d_cal[ok] ** 2))),
                          bias_raw=float(np.mean(d_raw[ok])), bias_cal=float(np.mean(d_cal[ok])),
                          sd_raw=float(np.std(d_raw[ok])), sd_cal=float(np.std(d_cal[ok])),
                          trend_raw=trend(d_raw[ok]), trend_cal=trend(d_cal[ok]),
                          response_raw=response(d_raw[ok]), response_cal=response(d_cal[ok]))
    return pd.DataFrame.from_dict(rows, orient="index")
